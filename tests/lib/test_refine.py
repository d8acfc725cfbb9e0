"""`lposs_lab.refine`: the predictor's own pixel stage on any scores, and the abstain rule of `predict`."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import cuda
from PIL import Image
from reference import ref_refine_patches, ref_refine_pixels, rel_err

from lposs_lab import (
    LPOSS,
    UNKNOWN,
    Abstain,
    LPConfig,
    LPOSSConfig,
    PixelConfig,
    Refinement,
    WindowConfig,
    abstain,
    refine,
    refine_patches,
    refine_pixels,
)
from lposs_lab.refine import _default_device, resized_image_tensor
from lposs_lab.viz import UNKNOWN_COLOUR, label_image, legend_entries, overlay, palette
from lposs_lab.windows import patch_positions, resize_argmax, stitch_windows

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def models():
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=112))
    plus = LPOSS.from_config(cfg)
    lposs = LPOSS(plus.vm, plus.vlm, cfg, method="lposs")
    for m in (plus, lposs):
        m.set_classes(CLASSES)
    return plus, lposs


def _photo(h=75, w=130, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 3] = (200, 40, 30)
    arr[h // 2 :, w // 2 :] = (20, 90, 200)
    return arr


def test_refine_is_the_predictors_pixel_stage(models):
    plus, lposs = models
    img = _photo()
    feats = plus.extract(img)
    stitched, _ = lposs.propagate(feats)  # LPOSS: the stitched patch scores at the resized size
    own, _ = plus.propagate(feats)  # LPOSS+: the same, then its pixel stage
    pred = plus.predict(img)
    out = refine(img, stitched, short_side=112)
    assert isinstance(out, Refinement)
    assert out.low_res_scores.shape == own.shape == (4, 112, 194)
    assert torch.equal(out.low_res_scores, own)  # one code path: bit-identical
    assert torch.equal(out.labels, pred.labels)
    assert out.image_size == (75, 130)
    assert torch.equal(out.scores, pred.scores)
    # not a no-op: the pixel stage changed the scores
    assert (out.low_res_scores - stitched).abs().max() > 1e-3


def test_refine_numpy_and_torch_inputs_agree(models):
    plus, lposs = models
    img = _photo(seed=1)
    stitched, _ = lposs.propagate(plus.extract(img))
    ref = refine(img, stitched, short_side=112)
    for scores in (stitched.numpy(), stitched.numpy().astype(np.float64), stitched.double(), stitched.half()):
        for image in (img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1)):
            out = refine(image, scores, short_side=112)
            assert out.low_res_scores.dtype == torch.float32
            if scores.dtype in (np.float16, torch.float16):  # the input itself is rounded to half
                assert rel_err(out.low_res_scores, ref.low_res_scores) < 2e-3
            else:
                assert torch.equal(out.low_res_scores, ref.low_res_scores)
                assert torch.equal(out.labels, ref.labels)


def test_low_resolution_scores_are_resized_bilinearly_first():
    img = _photo(60, 90, seed=2)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(3, 7, 11, generator=g)
    out = refine(img, low, short_side=40, r=5, tau=0.05)
    image, size = resized_image_tensor(img, short_side=40)
    assert size == (60, 90) and image.shape == (3, 40, 60)
    up = F.interpolate(low[None], size=(40, 60), mode="bilinear", align_corners=False)[0]
    expect = ref_refine_pixels(image.numpy(), up.numpy(), r=5, tau=0.05)
    assert out.low_res_scores.shape == (3, 40, 60)
    assert rel_err(out.low_res_scores, expect) <= 1e-4
    labels, _ = resize_argmax(out.low_res_scores, 60, 90)
    assert torch.equal(out.labels, labels) and out.labels.shape == (60, 90)
    # every keyword reaches the solve: another alpha/max_iter gives other numbers, again as the reference
    other = refine(img, low, short_side=40, r=3, tau=0.2, alpha=0.8, max_iter=5, spatial="rbf", sigma_s=2.0)
    expect = ref_refine_pixels(
        image.numpy(), up.numpy(), r=3, tau=0.2, alpha=0.8, max_iter=5, spatial="rbf", sigma_s=2.0
    )
    assert rel_err(other.low_res_scores, expect) <= 1e-4


def test_defaults_are_the_pixel_config_defaults():
    import inspect

    params = inspect.signature(refine).parameters
    px = PixelConfig()
    for name in ("r", "tau", "alpha", "max_iter", "tol", "spatial", "sigma_s", "backend", "max_bytes"):
        assert params[name].default == getattr(px, name)
    assert (px.r, px.tau, px.alpha, px.max_iter) == (13, 0.01, 0.95, 10)
    assert params["short_side"].default == 448 and params["long_side"].default == 2048


def test_patch_stage_matches_the_float64_reference():
    img = _photo(48, 64, seed=3)
    g = torch.Generator().manual_seed(1)
    gh, gw = 3, 4
    feats = torch.randn(gh, gw, 8, generator=g)
    patch = torch.randn(2, gh, gw, generator=g)
    lp = LPConfig(k=5)
    out = refine(img, patch, patch_features=feats, lp=lp, short_side=48, r=5, tau=0.05)
    image, _ = resized_image_tensor(img, short_side=48)
    centres = np.array([[(i + 0.5) * 16, (j + 0.5) * 16] for i in range(gh) for j in range(gw)])
    lp_ref = ref_refine_patches(feats.reshape(-1, 8).numpy(), centres, patch.reshape(2, -1).T.numpy(), k=5)
    grid = torch.from_numpy(lp_ref.T.reshape(2, gh, gw)).float()
    up = F.interpolate(grid[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    expect = ref_refine_pixels(image.numpy(), up.numpy(), r=5, tau=0.05)
    assert rel_err(out.low_res_scores, expect) <= 1e-4
    # [N, C] patch scores with a [gh, gw, D] feature grid are the same input
    flat = refine(
        img, patch.reshape(2, -1).T, patch_features=feats, lp={"k": 5}, short_side=48, r=5, tau=0.05
    )
    assert torch.equal(flat.low_res_scores, out.low_res_scores)


@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        (torch.zeros(4, 5), {}, r"scores must be \[C, h, w\]"),
        (torch.zeros(2, 3, 4, 5), {}, r"scores must be \[C, h, w\]"),
        (torch.zeros(0, 4, 5), {}, "at least one class"),
        (torch.zeros(2, 0, 5), {}, "non-empty"),
        (np.zeros((2, 4, 5), dtype=np.int64), {}, "floating-point array"),
        (torch.zeros(2, 4, 5, dtype=torch.int32), {}, "floating-point tensor"),
        ([[[0.0]]], {}, "torch.Tensor or a numpy array"),
        (torch.full((2, 4, 5), float("nan")), {}, "NaN"),
        (torch.zeros(2, 4, 5), {"features": torch.zeros(3, 4, 5)}, r"features must be \[F, 32, 48\]"),
        (torch.zeros(2, 4, 5), {"positions": torch.zeros(20, 2)}, "only used with patch_features"),
        (torch.zeros(2, 4, 5), {"lp": {"k": 3}}, "only used with patch_features or vm"),
        (torch.zeros(2, 4, 5), {"vm": 3}, "vm must be a VM name"),
        (torch.zeros(2, 4, 5), {"vm": "tiny_random", "window": (224,)}, r"window must be \(size, stride\)"),
        (torch.zeros(2, 4, 5), {"patch_features": torch.zeros(3, 5, 8)}, "does not match"),
        (torch.zeros(20, 2), {"patch_features": torch.zeros(20, 8)}, r"scores as a grid"),
        (
            torch.zeros(2, 4, 5),
            {"patch_features": torch.zeros(20, 8), "positions": torch.zeros(20, 3)},
            r"positions must be \[N=20, 2\]",
        ),
        (
            torch.zeros(2, 4, 5),
            {"patch_features": torch.zeros(20, 8), "lp": {"kk": 1}},
            "unknown patch-stage",
        ),
    ],
)
def test_bad_inputs_raise_clear_value_errors(scores, kwargs, message):
    img = np.zeros((32, 48, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        refine(img, scores, short_side=32, **kwargs)


def test_device_follows_the_scores():
    # the rule, on a device other than the CPU even on a CPU-only machine (meta tensors carry no data)
    meta = torch.zeros(2, 5, 5, device="meta")
    assert _default_device(meta, None) == torch.device("meta")
    assert _default_device(meta, "cpu") == torch.device("cpu")  # an explicit device wins
    assert _default_device(np.zeros((2, 5, 5), np.float32), None) == torch.device("cpu")
    img = _photo(20, 30)
    out = refine(img, np.random.default_rng(0).standard_normal((2, 5, 5)).astype(np.float32), short_side=20)
    assert out.labels.device.type == "cpu" and out.low_res_scores.device.type == "cpu"
    out = refine(img, torch.zeros(2, 5, 5), short_side=20, device="cpu")
    assert torch.equal(out.labels, torch.zeros(20, 30, dtype=torch.long))


@cuda
def test_refine_on_cuda_matches_cpu():
    img = _photo(40, 60)
    low = torch.randn(5, 10, 15, generator=torch.Generator().manual_seed(0))
    cpu = refine(img, low, short_side=40, backend="torch")
    gpu = refine(img, low.cuda(), short_side=40, backend="torch")
    assert gpu.labels.device.type == "cuda" and gpu.low_res_scores.device.type == "cuda"
    assert rel_err(gpu.low_res_scores.cpu(), cpu.low_res_scores) <= 1e-5
    auto = refine(img, low, short_side=40, device="cuda", backend="torch")
    assert auto.low_res_scores.device.type == "cuda"


# ---------------------------------------------------------------------------------------- abstain
def _hand_made():
    """Two names, a 2 x 3 map: probabilities softmax(10 * s) are known exactly."""
    s = torch.zeros(2, 2, 3)
    s[0] = torch.tensor([[1.0, 0.0, 0.05], [0.5, 0.0, 0.0]])
    s[1] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.02, 0.3]])
    return s


def test_abstain_marks_exactly_the_uncertain_pixels():
    s = _hand_made()
    # top probabilities with logit scale 10: sigmoid(10 * |s0 - s1|)
    top = torch.sigmoid(10 * (s[0] - s[1]).abs())
    assert torch.allclose(
        top, torch.tensor([[0.99995, 0.99995, 0.62246], [0.99331, 0.54983, 0.95257]]), atol=1e-5
    )
    labels = abstain(s, Abstain(threshold=0.9, logit_scale=10.0))
    assert labels.tolist() == [[0, 1, UNKNOWN], [0, UNKNOWN, 1]]
    labels = abstain(s, Abstain(threshold=0.9, logit_scale=10.0, background=1))
    assert labels.tolist() == [[0, 1, 1], [0, 1, 1]]
    labels = abstain(s, Abstain(threshold=0.6, logit_scale=10.0))
    assert labels.tolist() == [[0, 1, 0], [0, UNKNOWN, 1]]
    assert abstain(s, Abstain(threshold=0.0, logit_scale=10.0)).tolist() == [[0, 1, 0], [0, 1, 1]]


def test_abstain_softmax_over_all_names_then_max_per_class():
    # names 0 and 1 are synonyms of class 0, name 2 is class 1: softmax over the 3 names, then max
    s = torch.tensor([[0.5], [0.5], [0.0]]).view(3, 1, 1)
    p = torch.softmax(torch.tensor([20.0, 20.0, 0.0]), 0)  # logit scale 40
    rule = Abstain(threshold=float(p[0]) + 1e-4)
    assert abstain(s, rule, owner=[0, 0, 1]).item() == UNKNOWN  # 0.49999999: max of names, not sum
    rule = Abstain(threshold=float(p[0]) - 1e-4)
    assert abstain(s, rule, owner=[0, 0, 1]).item() == 0


def test_area_filter_moves_small_classes_to_the_next_best():
    s = torch.zeros(3, 4, 5)
    s[0] = 0.5  # background everywhere a little
    s[1, :, :4] = 1.0  # class 1: 16 pixels
    s[2, 0, 4] = 1.0  # class 2: 1 pixel, <= 0.1 * 17 foreground pixels
    rule = Abstain(threshold=0.0, background=0, area_threshold=0.1)
    labels = abstain(s, rule)
    expect = torch.ones(4, 5, dtype=torch.long)
    expect[:, 4] = 0
    assert torch.equal(labels, expect)


def test_abstain_rule_validation():
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        Abstain(threshold=1.5)
    with pytest.raises(ValueError, match="logit_scale"):
        Abstain(threshold=0.5, logit_scale=0)
    with pytest.raises(ValueError, match="cannot also mean unknown"):
        abstain(torch.zeros(256, 1, 1), Abstain(threshold=0.5))
    with pytest.raises(ValueError, match="out of range"):
        abstain(torch.zeros(2, 1, 1), Abstain(threshold=0.5, background=2))


def test_predict_abstain_off_is_unchanged_and_on_marks_unknown(models):
    plus, _ = models
    img = _photo(seed=4)
    base = plus.predict(img)
    again = plus.predict(img, abstain=None)
    assert torch.equal(base.labels, again.labels)
    # threshold 0: nothing abstains, labels are the paper's
    assert torch.equal(plus.predict(img, abstain=Abstain(threshold=0.0)).labels, base.labels)
    rule = Abstain(threshold=0.5, logit_scale=40.0)
    pred = plus.predict(img, abstain=rule)
    full = F.interpolate(pred.low_res_scores[None], size=(75, 130), mode="bilinear", align_corners=False)[0]
    top = torch.softmax(40.0 * full, dim=0).max(dim=0).values
    expect = torch.where(top < 0.5, torch.full_like(base.labels, UNKNOWN), base.labels)
    assert torch.equal(pred.labels, expect)
    n_unknown = int((pred.labels == UNKNOWN).sum())
    assert 0 < n_unknown < pred.labels.numel()  # the tiny random model is unsure in places, not everywhere
    bg = plus.predict(img, abstain=Abstain(threshold=0.5, logit_scale=40.0, background=2))
    assert torch.equal(bg.labels, torch.where(top < 0.5, torch.full_like(base.labels, 2), base.labels))
    labels = pred.labels.numpy()
    entries = legend_entries(labels, pred.class_names)
    assert ("unknown", UNKNOWN_COLOUR) in entries
    present = {name for name, _ in entries}
    assert present == {"unknown"} | {CLASSES[i] for i in np.unique(labels) if i != UNKNOWN}
    assert UNKNOWN_COLOUR not in [tuple(c) for c in palette(256)[:UNKNOWN]]  # not a class colour
    image = overlay(img, labels, pred.class_names)
    assert image.size[0] > 130
    arr = np.asarray(image)
    # the unknown pixels are blended with the neutral grey, the legend shows its swatch
    mask = labels == UNKNOWN
    grey = (img.astype(np.float32) * 0.5 + 160 * 0.5 + 0.5).astype(np.uint8)
    assert np.array_equal(arr[:75, :130][mask], grey[mask])
    assert (arr[:, 130:] == np.array(UNKNOWN_COLOUR, np.uint8)).all(axis=-1).sum() > 20
    # label PNGs keep 255 as is
    assert np.array_equal(np.asarray(label_image(labels)), labels.astype(np.uint8))


def test_predict_abstain_uses_all_names_before_the_synonym_max(models):
    plus, _ = models
    img = _photo(seed=5)
    classes = ["a;b", "c", "d"]
    base = plus.predict(img, classes=classes)
    names, _ = plus.propagate_names(plus.extract(img))  # [4 names, h, w]
    assert names.shape[0] == 4
    full = F.interpolate(names[None], size=(75, 130), mode="bilinear", align_corners=False)[0]
    prob = torch.softmax(40.0 * full.double(), dim=0)  # the rule compares float64 probabilities
    top = prob.max(dim=0).values  # max over classes of (max over their names) = max over all names
    threshold = float(top.median())
    assert threshold < 1.0  # (a threshold of 1 abstains everywhere: tested in tests/lab/test_refine_task.py)
    pred = plus.predict(img, abstain=Abstain(threshold=threshold))
    expect = torch.where(top < threshold, torch.full_like(base.labels, UNKNOWN), base.labels)
    assert torch.equal(pred.labels, expect)
    assert 0.3 < float((pred.labels == UNKNOWN).float().mean()) < 0.7
    # softmax over the reduced classes would give other probabilities: the order matters here
    reduced = torch.softmax(40.0 * base.scores.double(), dim=0).max(dim=0).values
    assert not torch.allclose(reduced, top, atol=1e-3)


def test_predict_abstain_with_a_window_ensemble():
    cfg = LPOSSConfig(
        vm="tiny_random",
        vlm="tiny_random",
        device="cpu",
        window=WindowConfig(short_side=112, ensemble=((112, 56),)),
    )
    model = LPOSS.from_config(cfg)
    img = _photo(seed=6)
    base = model.predict(img, classes=CLASSES)
    assert torch.equal(model.predict(img, abstain=Abstain(threshold=0.0)).labels, base.labels)
    full = F.interpolate(base.low_res_scores[None], size=(75, 130), mode="bilinear", align_corners=False)[0]
    top = torch.softmax(40.0 * full, dim=0).max(dim=0).values
    pred = model.predict(img, abstain=Abstain(threshold=0.6, background=0))
    assert torch.equal(pred.labels, torch.where(top < 0.6, torch.zeros_like(base.labels), base.labels))
    assert int((pred.labels != base.labels).sum()) > 50  # some pixels did move to the background


def test_vm_patch_stage_whole_image_equals_given_patch_features(models):
    plus, _ = models
    img = _photo(64, 96, seed=7)  # resized at short side 64: 64 x 96, a 4 x 6 grid of 16-pixel patches
    vm = plus.vm
    grid = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    pixels = grid.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # constant over each patch
    lp = {"k": 10}
    out = refine(img, pixels, vm=vm, window=(0, 0), lp=lp, short_side=64, r=5)
    image, _ = resized_image_tensor(img, short_side=64)
    feats = vm(image[None])[0]  # [4, 6, D]
    given = refine(img, grid, patch_features=feats, lp=lp, short_side=64, r=5)
    # float32 rounding only: the patch means of a constant block need not be bit-equal to the constant
    assert rel_err(out.low_res_scores, given.low_res_scores) <= 1e-5
    assert torch.equal(out.labels, given.labels)
    # the patch stage did something
    no_lp = refine(img, pixels, short_side=64, r=5)
    assert (no_lp.low_res_scores - out.low_res_scores).abs().max() > 1e-3


def test_vm_patch_stage_with_windows_is_the_predictors_composition(models):
    plus, _ = models
    img = _photo(seed=8)
    low = torch.randn(4, 9, 15, generator=torch.Generator().manual_seed(3))
    out = refine(img, low, vm="tiny_random", short_side=224, lp={"k": 30}, r=5)
    # the same VM (the tiny random init is seeded) through the predictor's extract, 224/112 windows
    cfg = LPOSSConfig(device="cpu", window=WindowConfig(short_side=224))
    feats = LPOSS(plus.vm, plus.vm, cfg, method="lposs").extract(img)
    image = feats.image
    assert image.shape == (3, 224, 388) and len(feats.windows) == 3
    up = F.interpolate(low[None], size=image.shape[1:], mode="bilinear", align_corners=False)[0]
    b, gh, gw, d = feats.vm.shape
    y = torch.stack(
        [F.adaptive_avg_pool2d(up[:, wd.y1 : wd.y2, wd.x1 : wd.x2], (gh, gw)) for wd in feats.windows]
    )
    pos = patch_positions(feats.windows, (gh, gw), 16)
    # the library's float32 patch stage: this random VM's features have exact ties at the k-th
    # neighbour (overlapping flat windows), where a float64 kNN may pick another tied neighbour
    lp_out = refine_patches(feats.vm.reshape(-1, d), pos, y.permute(0, 2, 3, 1).reshape(-1, 4), k=30)
    grids = lp_out.reshape(b, gh, gw, 4).permute(0, 3, 1, 2)
    stitched = stitch_windows(grids, feats.windows, *image.shape[1:])
    expect = refine_pixels(image, stitched, r=5)
    assert rel_err(out.low_res_scores, expect) <= 1e-6
    assert (out.low_res_scores - refine(img, low, short_side=224, r=5).low_res_scores).abs().max() > 1e-2
    assert out.labels.shape == (75, 130)
    with pytest.raises(ValueError, match="not both"):
        refine(img, low, vm="tiny_random", patch_features=torch.zeros(20, 8))
