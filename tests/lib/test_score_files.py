"""Score files at the lowest resolution that loses nothing: window grids for MaskCLIP / LPOSS, full maps for
LPOSS+, both read back by `read_score_file` and `lposs_lab.refine`."""

from __future__ import annotations

import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pipeline import scores_by_hand

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig, refine
from lposs_lab.score_files import PatchGrids, ScoreFileError, read_score_file, write_score_file
from lposs_lab.windows import Window

# synonyms ("b;bee"): the class max must come after the stitching, so the grids are kept per name
CLASSES = ["a", "b;bee", "c", "d;dee;delta"]
CFG = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=224))


@pytest.fixture(scope="module")
def models():
    plus = LPOSS.from_config(CFG)
    out = {"lposs_plus": plus}
    for method in ("lposs", "maskclip"):
        out[method] = LPOSS(plus.vm, plus.vlm, CFG, method=method)
    for m in out.values():
        m.set_classes(CLASSES)
    return out


def _photo(h=75, w=130, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 3] = (200, 40, 30)
    arr[h // 2 :, w // 2 :] = (20, 90, 200)
    return arr


@pytest.mark.parametrize("method", ["lposs", "maskclip"])
def test_stitched_grids_are_the_predictors_pixel_scores(models, method):
    model, img = models[method], _photo()
    pred = model.predict(img)
    grids = pred.patch_grids
    assert isinstance(grids, PatchGrids)
    # resized to 224 x 388: three overlapping 224/112 windows; one row per name (7 names, 4 classes)
    assert len(grids.windows) == grids.grids.shape[0] == 3 and grids.grids.shape[1] == 7
    assert grids.size == tuple(pred.low_res_scores.shape[1:]) == (224, 388)
    torch.testing.assert_close(grids.scores(), pred.low_res_scores, rtol=0, atol=1e-6)
    # and the pipeline composed by hand (docs/method.md §2-5 from the stage functions) agrees
    by_hand = scores_by_hand(model, CFG, method, img, CLASSES)
    torch.testing.assert_close(grids.scores(), by_hand, rtol=1e-5, atol=1e-5)
    # the class max after the stitching is not the stitching of the class max: the per-name rows matter
    owner = grids.owner.view(1, -1, 1, 1).expand_as(grids.grids)
    class_max = grids.grids.new_full((3, 4, *grids.grids.shape[2:]), float("-inf"))
    class_max = class_max.scatter_reduce(1, owner, grids.grids, "amax")
    wrong = PatchGrids(class_max, grids.windows, grids.size, torch.arange(4), 4).scores()
    assert float((wrong - pred.low_res_scores).abs().max()) > 1e-3


def test_no_grid_form_where_it_would_lose_something(models):
    img = _photo()
    assert models["lposs_plus"].predict(img).patch_grids is None  # the pixel stage: full resolution
    base = models["lposs"]
    for window in (replace(CFG.window, ensemble=((112, 56),)), replace(CFG.window, size=0)):
        model = LPOSS(base.vm, base.vlm, replace(CFG, window=window), method="lposs")
        model.set_classes(CLASSES)
        assert model.predict(img).patch_grids is None  # an average of setups; no windows (already a grid)


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scores")
    img = _photo()
    pred = models["lposs"].predict(img)
    names = pred.class_names
    sizes = {
        "grid": write_score_file(folder / "grid.npz", pred.patch_grids, names),
        "full": write_score_file(folder / "full.npz", pred.low_res_scores, names),
    }
    return {"folder": folder, "img": img, "pred": pred, "sizes": sizes}


def test_files_are_compressed_float16_and_the_grid_form_is_smaller(saved):
    folder, sizes = saved["folder"], saved["sizes"]
    for name in ("grid", "full"):
        path = folder / f"{name}.npz"
        assert path.stat().st_size == sizes[name]
        with zipfile.ZipFile(path) as zf:
            assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    assert not list(folder.glob(".*.tmp"))  # atomic: no temporary left behind
    with np.load(folder / "grid.npz") as data:
        assert str(data["form"]) == "window_grids" and data["grids"].dtype == np.float16
        assert str(data["mode"]) == "bilinear" and not bool(data["align_corners"])
        assert list(data["classes"]) == ["a", "b", "c", "d"]
        assert data["owner"].tolist() == [0, 1, 1, 2, 3, 3, 3]
    with np.load(folder / "full.npz") as data:
        assert str(data["form"]) == "full" and data["scores"].dtype == np.float16
        assert data["scores"].shape == tuple(saved["pred"].low_res_scores.shape)
    assert sizes["grid"] < sizes["full"]


def test_read_back_both_forms(saved):
    folder, want = saved["folder"], saved["pred"].low_res_scores
    grids, classes = read_score_file(folder / "grid.npz")
    full, classes_full = read_score_file(folder / "full.npz")
    assert isinstance(grids, PatchGrids) and classes == classes_full == ["a", "b", "c", "d"]
    scale = float(want.abs().max())
    # float16 storage: 2^-11 relative per value; bilinear weights and the window average sum to 1
    assert float((grids.scores() - want).abs().max()) <= 2.0**-10 * scale
    assert float((full - want).abs().max()) <= 2.0**-10 * scale


def test_refine_from_the_grid_form_equals_refine_from_the_full_form(saved):
    folder, img = saved["folder"], saved["img"]
    from_grid = refine(img, folder / "grid.npz", short_side=224, device="cpu")
    from_full = refine(img, folder / "full.npz", short_side=224, device="cpu")
    grids, _ = read_score_file(folder / "grid.npz")
    assert torch.equal(refine(img, grids, short_side=224).low_res_scores, from_grid.low_res_scores)
    # The two inputs are within 2^-10 * max|Y| of each other (float16 rounding of the grids before the
    # stitching, of the pixel scores after it). The solve (I - alpha S_hat)^-1 amplifies scores and their
    # rounding alike, by about 1 / (1 - alpha) = 20 (max|X| / max|Y| here), so the refined scores agree
    # to 2^-10 * max|X|.
    scale = float(from_full.low_res_scores.abs().max())
    assert scale > 5 * float(saved["pred"].low_res_scores.abs().max())  # the gain is there
    diff = (from_grid.low_res_scores - from_full.low_res_scores).abs().max()
    assert float(diff) <= 2.0**-10 * scale
    top2 = from_full.scores.topk(2, dim=0).values
    near_tie = (top2[0] - top2[1]) <= 2.0**-8 * scale
    changed = from_grid.labels != from_full.labels
    assert not (changed & ~near_tie).any()


def test_a_foreign_resize_rule_or_a_broken_file_is_refused(saved, tmp_path):
    with np.load(saved["folder"] / "grid.npz") as data:
        arrays = {k: data[k] for k in data.files}
    np.savez_compressed(tmp_path / "nearest.npz", **{**arrays, "mode": np.array("nearest")})
    with pytest.raises(ScoreFileError, match="mode=nearest"):
        read_score_file(tmp_path / "nearest.npz")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ScoreFileError, match="cannot read score file"):
        read_score_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", logits=np.zeros((2, 3, 3)))
    with pytest.raises(ScoreFileError, match="no 'scores' or 'grids' array"):
        read_score_file(tmp_path / "other.npz")


def test_patch_grids_rule_by_hand():
    # two overlapping windows on a 4 x 6 canvas, one class with two names: stitch per name, then max
    g = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    windows = (Window(0, 4, 0, 4), Window(0, 4, 2, 6))
    grids = PatchGrids(g, windows, (4, 6), torch.tensor([0, 0]), 1)
    canvas = torch.zeros(2, 4, 6, dtype=torch.float64)
    count = torch.zeros(4, 6, dtype=torch.float64)
    for grid, w in zip(g.double(), windows, strict=True):
        canvas[:, w.y1 : w.y2, w.x1 : w.x2] += F.interpolate(
            grid[None], size=(4, 4), mode="bilinear", align_corners=False
        )[0]
        count[w.y1 : w.y2, w.x1 : w.x2] += 1
    want = (canvas / count).amax(0, keepdim=True)
    torch.testing.assert_close(grids.scores().double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="owner"):
        PatchGrids(g, windows, (4, 6), torch.tensor([0, 1]), 1)
