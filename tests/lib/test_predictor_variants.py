"""The paper's variants in the library: kernels and pixel features against the float64 reference, window
setups (ensemble, per-window graphs), CLIP's own features as the graph, depth models built offline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pipeline import scores_by_hand
from reference import ref_lab_features, ref_refine_patches, ref_refine_pixels, rel_err

from lposs_lab.config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from lposs_lab.errors import ConfigError
from lposs_lab.pixels import pixel_features, refine_pixels
from lposs_lab.predictor import LPOSS
from lposs_lab.propagation import propagate_patches, refine_patches
from lposs_lab.text import text_embeddings
from lposs_lab.windows import patch_positions, stitch_windows


@pytest.mark.parametrize(
    "kernel",
    [{"appearance": "power"}, {"appearance": "exp", "sigma_a": 0.3}, {"spatial": "linear", "sigma": 0.004},
     {"spatial": "none"}, {"appearance": "exp", "spatial": "none", "sigma_a": 0.5}],
)  # fmt: skip
def test_patch_kernel_variants_match_the_float64_reference(kernel):
    g = torch.Generator().manual_seed(3)
    n = 60
    feats = torch.randn(n, 8, generator=g)
    pos = torch.rand(n, 2, generator=g) * 200
    y = torch.randn(n, 4, generator=g)
    got = refine_patches(feats, pos, y, k=12, **kernel)
    want = ref_refine_patches(feats.numpy(), pos.numpy(), y.numpy(), k=12, **kernel)
    assert rel_err(got.numpy(), want) < 1e-4
    assert rel_err(y.numpy(), want) > 1e-2  # propagation changed the scores


@pytest.mark.parametrize("feature", ["lab", "depth", "lab+depth"])
@pytest.mark.parametrize("spatial", ["binary", "rbf"])
def test_pixel_variants_match_the_float64_reference(feature, spatial):
    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 12, 15, generator=g)
    depth = torch.rand(12, 15, generator=g)
    scores = torch.randn(3, 12, 15, generator=g)
    feats = pixel_features(img, depth, feature, depth_weight=0.5)
    assert feats.shape[0] == {"lab": 3, "depth": 1, "lab+depth": 4}[feature]
    got = refine_pixels(img, scores, r=5, tau=0.05, spatial=spatial, sigma_s=2.0, features=feats)
    # the reference's own features: scikit-image Lab and / or the scaled depth channel
    ref_feats = {
        "lab": ref_lab_features(img.numpy()),
        "depth": 0.5 * depth.double().numpy()[None],
        "lab+depth": np.concatenate([ref_lab_features(img.numpy()), 0.5 * depth.double().numpy()[None]]),
    }[feature]
    want = ref_refine_pixels(img.numpy(), scores.numpy(), r=5, tau=0.05, spatial=spatial, sigma_s=2.0,
                             features=ref_feats)
    assert rel_err(got.numpy(), want) < 1e-3


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return tiny_encoders


def _image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)


WIN = WindowConfig(size=32, stride=16, short_side=48, long_side=96)
# windows of 4x4 patches over a 96x134 image: 15 windows, 240 patches
WIDE = WindowConfig(size=64, stride=32, short_side=96, long_side=160)


def test_ensemble_is_the_mean_of_its_window_setups(encoders):
    vm, vlm = encoders
    win = replace(WIN, ensemble=((48, 24),))
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=win)
    classes = ["a", "b", "c"]
    ens = LPOSS(vm, vlm, cfg).predict(_image(), classes)
    one = LPOSS(vm, vlm, replace(cfg, window=WIN)).predict(_image(), classes)
    two = LPOSS(vm, vlm, replace(cfg, window=WindowConfig(48, 24, 48, 96))).predict(_image(), classes)
    assert not torch.allclose(one.low_res_scores, two.low_res_scores, atol=1e-3)
    assert torch.allclose(ens.low_res_scores, (one.low_res_scores + two.low_res_scores) / 2, atol=1e-6)
    hand = scores_by_hand(LPOSS(vm, vlm, cfg), cfg, "lposs_plus", _image(), classes)
    assert torch.allclose(ens.low_res_scores, hand, atol=1e-5)


def test_per_window_graphs_equal_separate_solves_and_differ_from_the_joint_graph(encoders):
    vm, vlm = encoders
    lp = LPConfig(k=8)
    cfg = LPOSSConfig(
        vm="tiny_random", vlm="tiny_random", device="cpu", lp=lp, window=replace(WIDE, joint=False)
    )
    classes = ["a", "b", "c"]
    model = LPOSS(vm, vlm, cfg, method="lposs")
    model.set_classes(classes)
    feats = model.extract(_image())
    per, _ = model.propagate(feats)
    b, gh, gw, _ = feats.vm.shape
    n = gh * gw
    assert b >= 4 and n >= 16
    # each window solved on its own, with the library's solver and with the float64 reference
    text = text_embeddings(vlm, classes).float()
    y = feats.vlm.reshape(b, n, -1) @ text.T
    pos = patch_positions(feats.windows, (gh, gw), feats.patch_size).reshape(b, n, 2)
    solves = [propagate_patches(feats.vm[i].reshape(n, -1), pos[i], y[i], lp) for i in range(b)]
    for i in (0, b - 1):
        want = ref_refine_patches(feats.vm[i].reshape(n, -1).numpy(), pos[i].numpy(), y[i].numpy(), k=8)
        assert rel_err(solves[i].numpy(), want) < 1e-4
    grids = torch.stack(solves).reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
    _, h, w = feats.image.shape
    assert torch.allclose(per, stitch_windows(grids, feats.windows, h, w), atol=1e-6)
    # the joint graph (the default) is one solve over all windows' patches, and gives other numbers
    joint_model = LPOSS(vm, vlm, replace(cfg, window=WIDE), method="lposs")
    joint_model.set_classes(classes)
    joint, _ = joint_model.propagate(feats)
    one = refine_patches(feats.vm.reshape(b * n, -1), pos.reshape(-1, 2), y.reshape(b * n, -1), k=8)
    joint_grids = one.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
    assert torch.allclose(joint, stitch_windows(joint_grids, feats.windows, h, w), atol=1e-6)
    assert not torch.allclose(per, joint, atol=1e-4)


def test_clip_b16_uses_the_vlm_features_as_graph_features(encoders):
    vm, vlm = encoders
    base = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WIN)
    clip = LPOSS(vlm, vlm, replace(base, vm="clip_b16"), method="lposs")
    via_flag = LPOSS(vm, vlm, replace(base, lp=replace(base.lp, graph_features="vlm")), method="lposs")
    dino = LPOSS(vm, vlm, base, method="lposs")
    a = clip.predict(_image(), ["a", "b", "c"]).low_res_scores
    b = via_flag.predict(_image(), ["a", "b", "c"]).low_res_scores
    c = dino.predict(_image(), ["a", "b", "c"]).low_res_scores
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c)
    feats = clip.extract(_image())
    assert feats.vm is feats.vlm  # one forward pass, shared
    hand = scores_by_hand(via_flag, replace(base, lp=replace(base.lp, graph_features="vlm")), "lposs",
                          _image(), ["a", "b", "c"])
    assert torch.allclose(b, hand, atol=1e-5)


def test_from_config_builds_clip_b16_and_depth_variants_offline():
    cfg = LPOSSConfig(vm="clip_b16", vlm="tiny_random", device="cpu", window=WIN,
                      pixel=PixelConfig(feature="lab+depth", depth_model="tiny_random"))
    model = LPOSS.from_config(cfg)
    assert model.vm is model.vlm and model.depth_model is not None
    pred = model.predict(_image(), ["a", "b"])
    assert pred.labels.shape == (40, 56)
    assert torch.allclose(pred.low_res_scores, scores_by_hand(model, cfg, "lposs_plus", _image(), ["a", "b"]),
                          atol=1e-5)
    lab_only = LPOSS(model.vm, model.vlm, replace(cfg, pixel=PixelConfig()))
    assert not torch.allclose(pred.low_res_scores, lab_only.predict(_image(), ["a", "b"]).low_res_scores)
    with pytest.raises(ConfigError, match=r"pixel.feature='rgb' is out of range; valid: lab \| depth"):
        PixelConfig(feature="rgb")
