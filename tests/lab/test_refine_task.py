"""`task=refine` on saved score maps (the export round trip, bad files, PAMR/none, saved labels) and
abstaining (`predict.unknown_threshold`) in the library, task=segment and task=evaluate.

Most runs are in-process through :func:`lposs_lab.lab.tasks.run_task` (what run.py calls) on composed
configs; the run.py ones are marked ``slow``. One text cache is shared by every run of the file.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from scoring import np_boundary_miou, np_miou
from synthetic_data import make_dataset

import lposs_lab
from lposs_lab import LPOSS, UNKNOWN, Abstain, LPOSSConfig, WindowConfig
from lposs_lab.lab.data import SegmentationDataset
from lposs_lab.lab.tasks import run_task
from lposs_lab.postprocess import PAMRStep
from lposs_lab.score_files import PatchGrids, read_score_file
from lposs_lab.viz import legend_entries

REPO = Path(__file__).resolve().parents[2]
TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "num_workers=0"]
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# A cheaper pixel stage (shared by the direct LPOSS+ run and task=refine, so they stay the same computation).
PIXEL = ["pixel.r=5", "pixel.max_iter=3"]
N = 2
# window.short_side stays 448 (the default) in the round trip: task=refine resizes the image with
# lposs_lab.refine's defaults (short side 448), see the note in test_export_then_refine_equals_lposs_plus.
SHORT = "window.short_side=448"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic voc20 (seed 1: the random model's classes 4 and 8 occur, so the mIoUs are not all 0)."""
    base = tmp_path_factory.mktemp("refine")
    root = make_dataset(base / "data", "voc20", n_images=N, size=(32, 40), seed=1)
    return {"base": base, "root": root, "text": base / "text", "ds": SegmentationDataset("voc20", root)}


def compose_cfg(out: Path, env: dict, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[
                f"paths.root_dir={out}",
                f"paths.output_dir={out}",
                *TINY,
                *QUIET,
                f"text_cache_dir={env['text']}",
                f"data_root={env['root']}",
                *overrides,
            ],
        )


def task(env: dict, name: str, *overrides: str):
    """Run a task in-process; its results.json and states land in ``<base>/<name>``."""
    out = env["base"] / name
    return run_task(compose_cfg(out, env, *overrides)), out


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def gts(env: dict) -> dict[str, np.ndarray]:
    ds = env["ds"]
    return {str(ds[i]["id"]): np.asarray(ds[i]["label"]) for i in range(len(ds))}


def miou(preds: dict[str, np.ndarray], env: dict) -> float:
    g = gts(env)
    return 100.0 * np_miou([preds[k] for k in g], list(g.values()), 20)[0]


@pytest.fixture(scope="module")
def exported(env):
    """``method=lposs`` with save_scores, ``method=lposs_plus`` directly, and the two task=refine runs."""
    e = env["base"]
    lposs, _ = task(
        env, "lposs", "dataset=voc20", SHORT, *PIXEL, "method=lposs",
        f"save_scores={e / 'scores'}", f"save_predictions={e / 'pred_lposs'}",
    )  # fmt: skip
    plus, _ = task(
        env, "plus", "dataset=voc20", SHORT, *PIXEL, "method=lposs_plus",
        f"save_scores={e / 'scores_plus'}", f"save_predictions={e / 'pred_plus'}",
    )  # fmt: skip
    # no task=: dataset= and scores= select task=refine
    refined, out = task(
        env, "refined", "dataset=voc20", SHORT, *PIXEL, f"scores={e / 'scores'}", "refiner=lposs_plus",
        f"save_predictions={e / 'pred_refined'}",
    )  # fmt: skip
    none, _ = task(
        env,
        "none",
        "dataset=voc20",
        f"scores={e / 'scores'}",
        "refiner=none",
        f"save_predictions={e / 'pred_none'}",
    )
    assert json.loads((out / "results.json").read_text())["after"] == refined["after"]
    return {"lposs": lposs, "plus": plus, "refined": refined, "none": none}


# ------------------------------------------------------------------------------- export -> refine
def _pixel_scores(path: Path) -> torch.Tensor:
    """The [C, h, w] scores of a score file in either form (window grids stitched)."""
    scores, _ = read_score_file(path)
    return scores.scores() if isinstance(scores, PatchGrids) else scores


def test_saved_scores_are_the_float16_patch_stage_scores(env, exported):
    """method=lposs saves its window grids (stitched: [C, h, w] at the resized image, 448 x 560), LPOSS+
    its full-resolution scores, float16 both."""
    ids = sorted(gts(env))
    assert sorted(p.stem for p in (env["base"] / "scores").iterdir()) == ids
    for key in ids:
        with np.load(env["base"] / "scores" / f"{key}.npz") as data:
            # 448 x 560 in 224/112 windows: 3 x 4 windows of 14 x 14 patches, 20 classes (VOC20: no synonyms)
            assert str(data["form"]) == "window_grids" and data["grids"].dtype == np.float16
            assert data["grids"].shape == (12, 20, 14, 14) and data["size"].tolist() == [448, 560]
            assert list(data["classes"]) == [c.split(";")[0] for c in env["ds"].info.classes]
        with np.load(env["base"] / "scores_plus" / f"{key}.npz") as data:
            assert str(data["form"]) == "full" and data["scores"].dtype == np.float16
            assert data["scores"].shape == (20, 448, 560)
        scores = _pixel_scores(env["base"] / "scores" / f"{key}.npz")
        assert scores.shape == (20, 448, 560)
        # their argmax (resized to the image) is what method=lposs predicted
        labels = F.interpolate(scores[None], size=(32, 40), mode="bilinear", align_corners=False)[0]
        assert np.array_equal(labels.argmax(0).numpy(), pngs(env["base"] / "pred_lposs")[key])


def test_save_scores_says_where_and_how_much(env, tmp_path, capsys):
    folder = tmp_path / "scores"
    res, _ = task(env, "maskclip_scores", "dataset=voc20", "method=maskclip", f"save_scores={folder}")
    files = sorted(folder.glob("*.npz"))
    assert [p.stem for p in files] == sorted(gts(env)) and res["num_images"] == N
    total = sum(p.stat().st_size for p in files)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("scores: ")]
    assert len(line) == 1, line
    assert f"scores: {N} file(s), " in line[0] and line[0].endswith(f"in {folder.resolve()}")
    shown = line[0].split(", ")[1].split(" in all")[0]  # "12.3 kB" or "1.23 MB"
    value, unit = shown.split()
    assert float(value) * {"kB": 1e3, "MB": 1e6}[unit] == pytest.approx(total, rel=0.01)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_refine_shows_a_progress_bar_on_a_terminal(env, exported, tmp_path, monkeypatch, terminal):
    e = env["base"]
    cfg = compose_cfg(
        tmp_path / "bar", env, "dataset=voc20", f"scores={e / 'scores'}", "refiner=none",
        "trainer.enable_progress_bar=true",
    )  # fmt: skip
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    run_task(cfg)
    text = err.getvalue()
    if terminal:
        assert "Refining voc20" in text and f"{N}/{N}" in text and "img/s" in text
    else:  # a log file or a pipe: no bar
        assert "Refining" not in text


def test_export_then_refine_equals_lposs_plus(env, exported):
    """method=lposs save_scores -> task=refine refiner=lposs_plus == method=lposs_plus, up to float16.

    The saved scores are the stitched patch-stage scores at the resized image, the very input of
    LPOSS+'s pixel stage, and refine() runs the same pixel_stage call with the same pixel.* options,
    so the only difference is the float16 rounding of the stored scores: at most 2^-11 relative,
    i.e. <= 2^-11 * max|y| per element. The pixel stage combines its inputs with non-negative
    weights summing to at most 1 per pixel (and so does the bilinear resize), so each refined score moves
    by <= ~2^-11 * max|y| and a top-2 margin by <= ~2^-10 * max|y|. Reading the margins back from the
    float16 LPOSS+ scores adds as much again: a label may change only where that margin is below
    2^-9 * max|y|; we allow 2^-8 * max|y| (2x slack for CG's max_iter-truncated, mildly nonlinear solve).
    On these images no label changes, so the numbers are equal exactly.

    Note: task=refine calls lposs_lab.refine without window.short_side / long_side (it resizes to
    short side 448 whatever the scores' run used), so the round trip holds at the default window only.
    """
    base = env["base"]
    direct, refined = pngs(base / "pred_plus"), pngs(base / "pred_refined")
    assert sorted(direct) == sorted(refined) == sorted(gts(env))
    changed = 0
    for key, want in direct.items():
        plus = torch.from_numpy(np.load(base / "scores_plus" / f"{key}.npz")["scores"].astype(np.float32))
        full = F.interpolate(plus[None], size=want.shape, mode="bilinear", align_corners=False)[0]
        top2 = full.topk(2, dim=0).values
        near_tie = (top2[0] - top2[1]).numpy() <= 2.0**-8 * float(plus.abs().max())
        diff = refined[key] != want
        assert not (diff & ~near_tie).any(), f"{key}: labels differ away from near-ties"
        changed += int(diff.sum())
    assert changed == 0
    res, plus = exported["refined"], exported["plus"]
    assert res["refiner"] == "lposs_plus" and res["num_images"] == N and res["errors"] == []
    assert res["after"]["mIoU"] == pytest.approx(plus["mIoU"], abs=1e-9)
    assert res["after"]["pixel_accuracy"] == pytest.approx(plus["pixel_accuracy"], abs=1e-9)
    assert res["after"]["mIoU"] == pytest.approx(miou(refined, env), abs=1e-9)
    assert 0 < res["after"]["mIoU"] < 100  # a number that can tell two label maps apart
    by_id = {r["id"]: r for r in res["per_image"]}
    for r in plus["per_image"]:
        assert by_id[r["id"]]["mIoU_after"] == pytest.approx(r["mIoU"], abs=1e-9)
    # before = argmax of the resized saved scores = method=lposs (the same float16 argument, margins of
    # the saved lposs scores; no label changes here either)
    assert res["before"]["mIoU"] == pytest.approx(exported["lposs"]["mIoU"], abs=1e-9)
    assert res["before"]["pixel_accuracy"] == pytest.approx(exported["lposs"]["pixel_accuracy"], abs=1e-9)


def test_refiner_none_after_equals_before_equals_lposs(env, exported):
    res, lposs = exported["none"], exported["lposs"]
    assert res["refiner"] == "none" and res["after"] == res["before"]
    assert res["before"]["mIoU"] == pytest.approx(lposs["mIoU"], abs=1e-9)
    assert res["before"]["mIoU"] == exported["refined"]["before"]["mIoU"]
    none = pngs(env["base"] / "pred_none")
    assert none.keys() == pngs(env["base"] / "pred_lposs").keys()
    for key, labels in pngs(env["base"] / "pred_lposs").items():
        assert np.array_equal(none[key], labels)
    for r in res["per_image"]:
        assert r["mIoU_before"] == r["mIoU_after"]


def test_saved_refined_labels_equal_refine_by_hand(env, exported):
    """save_predictions PNGs == lposs_lab.refine(image, saved scores, pixel.*) labels."""
    ds = env["ds"]
    saved = pngs(env["base"] / "pred_refined")
    for i in range(len(ds)):
        sample = ds[i]
        path = env["base"] / "scores" / f"{sample['id']}.npz"  # window grids: refine() stitches them
        want = lposs_lab.refine(sample["image"], path, r=5, max_iter=3, device="cpu").labels
        assert np.array_equal(saved[str(sample["id"])], want.numpy())


def test_refiner_pamr_with_boundary_iou(env, exported, capsys):
    e = env["base"]
    res, _ = task(
        env, "pamr", "dataset=voc20", f"scores={e / 'scores'}", "refiner=pamr", "metrics.boundary=true",
        f"save_predictions={e / 'pred_pamr'}",
    )  # fmt: skip
    table = capsys.readouterr().out
    assert "Boundary IoU" in table and "after (pamr)" in table
    # before: the same argmax as refiner=none; boundary IoU in both rows
    assert res["before"]["mIoU"] == exported["none"]["before"]["mIoU"]
    assert set(res["before"]) == set(res["after"]) == {"mIoU", "pixel_accuracy", "boundary_iou"}
    ds, saved = env["ds"], pngs(e / "pred_pamr")
    g = gts(env)
    for i in range(len(ds)):
        sample = ds[i]
        key = str(sample["id"])
        scores = _pixel_scores(e / "scores" / f"{key}.npz")
        full = F.interpolate(scores[None], size=g[key].shape, mode="bilinear", align_corners=False)[0]
        rgb = torch.from_numpy(sample["image"]).permute(2, 0, 1).float() / 255.0
        assert np.array_equal(saved[key], PAMRStep()(rgb, full).argmax(0).numpy())
    assert res["after"]["mIoU"] == pytest.approx(miou(saved, env), abs=1e-9)
    before = pngs(e / "pred_none")
    keys = list(g)
    for part, preds in (("before", before), ("after", saved)):
        want = 100.0 * np_boundary_miou([preds[k] for k in keys], [g[k] for k in keys], 20)
        assert res[part]["boundary_iou"] == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------- bad score files
def _missing(d: Path, key: str) -> Path:
    (d / f"{key}.npz").unlink()
    return d / f"{key}.npz"


def _no_scores(d: Path, key: str) -> Path:
    np.savez(d / f"{key}.npz", logits=np.zeros((20, 4, 5), np.float32))
    return d / f"{key}.npz"


def _two_d(d: Path, key: str) -> Path:
    (d / f"{key}.npz").unlink()
    np.save(d / f"{key}.npy", np.zeros((4, 5), np.float32))
    return d / f"{key}.npy"


def _wrong_classes(d: Path, key: str) -> Path:
    np.savez(d / f"{key}.npz", scores=np.zeros((21, 4, 5), np.float16))
    return d / f"{key}.npz"


def _unreadable(d: Path, key: str) -> Path:
    (d / f"{key}.npz").write_bytes(b"not numpy data at all")
    return d / f"{key}.npz"


def _truncated(d: Path, key: str) -> Path:  # an interrupted copy of a real .npz
    path = d / f"{key}.npz"
    path.write_bytes(path.read_bytes()[:40])
    return path


BAD = [
    (_missing, "not found"),
    (_no_scores, "no 'scores' or 'grids' array"),
    (_two_d, "expected [C, h, w]"),
    (_wrong_classes, "has 21 classes, the benchmark 20"),
    (_unreadable, "cannot read score file"),
    pytest.param(_truncated, "cannot read score file", id="truncated_npz"),
]


def _fake_scores(env: dict, folder: Path) -> list[str]:
    folder.mkdir()
    keys = sorted(gts(env))
    for key in keys:
        np.savez(folder / f"{key}.npz", scores=np.random.default_rng(0).random((20, 4, 5)).astype(np.float16))
    return keys


@pytest.mark.parametrize(
    ("make", "message"),
    BAD,
    ids=["missing", "no_scores", "two_d", "wrong_classes", "unreadable", "truncated_npz"],
)
def test_bad_score_file_one_line_error_exit_2_no_results(env, tmp_path, capsys, monkeypatch, make, message):
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))  # run_task sets it
    folder = tmp_path / "scores"
    keys = _fake_scores(env, folder)
    bad = make(folder, keys[-1])  # the last image: the first one is refined before the error
    cfg = compose_cfg(
        tmp_path / "run", env, "task=refine", "dataset=voc20", f"scores={folder}", "refiner=none"
    )
    with pytest.raises(SystemExit) as exc:
        run_task(cfg)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert str(bad) in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_bad_score_file_through_run_py(env, tmp_path):
    folder = tmp_path / "scores"
    keys = _fake_scores(env, folder)
    bad = _wrong_classes(folder, keys[0])
    cmd = [
        sys.executable, str(REPO / "run.py"), "dataset=voc20", f"data_root={env['root']}", f"scores={folder}",
        *TINY, f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: score file {bad} has 21 classes, the benchmark 20; save scores in the "
                     "benchmark's class order"]  # fmt: skip
    assert not (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------------------- abstaining
def _known_scores(h: int = 24, w: int = 36) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Two classes: p(top) = softmax(40 s) is 0.5 on rectangle A, sigmoid(0.8) ~ 0.690 on rectangle B and
    sigmoid(4) ~ 0.982 elsewhere; class 1 wins on the right half, class 0 on the left.

    Returns ``(scores [2, h, w], mask of A, mask of B)``.
    """
    s = torch.full((2, h, w), 0.3)
    margin = torch.full((h, w), 0.1)
    a = np.zeros((h, w), bool)
    b = np.zeros((h, w), bool)
    a[2:9, 3:30] = True
    b[14:20, 10:34] = True
    margin[torch.from_numpy(a)] = 0.0
    margin[torch.from_numpy(b)] = 0.02
    right = torch.zeros(h, w, dtype=torch.bool)
    right[:, w // 2 :] = True
    s[0] = torch.where(right, 0.3 - margin, 0.3)
    s[1] = torch.where(right, 0.3, 0.3 - margin)
    return s, a, b


def _argmax_of(s: torch.Tensor) -> np.ndarray:
    labels = np.zeros(s.shape[1:], np.int64)
    labels[:, s.shape[2] // 2 :] = 1
    labels[(s[0] == s[1]).numpy()] = 0  # rectangle A: a tie, argmax takes the first class
    return labels


@pytest.mark.parametrize(("threshold", "marked"), [(0.9, "ab"), (0.6, "a"), (0.4, "")])
def test_abstain_marks_exactly_the_low_probability_pixels(threshold, marked):
    s, a, b = _known_scores()
    mask = np.zeros_like(a)
    for name, m in (("a", a), ("b", b)):
        if name in marked:
            mask |= m
    want = np.where(mask, UNKNOWN, _argmax_of(s))
    got = lposs_lab.abstain(s, Abstain(threshold)).numpy()
    assert np.array_equal(got, want)
    got_bg = lposs_lab.abstain(s, Abstain(threshold, background=1)).numpy()
    assert np.array_equal(got_bg, np.where(mask, 1, _argmax_of(s)))
    # the probabilities themselves: 0.5, sigmoid(0.8), sigmoid(4)
    top = lposs_lab.postprocess.class_probabilities(s).max(0).values.numpy()
    assert np.allclose(top[a], 0.5) and np.allclose(top[b], 1 / (1 + np.exp(-0.8)))
    assert np.allclose(top[~(a | b)], 1 / (1 + np.exp(-4.0)))


def test_predict_abstain_on_known_scores(monkeypatch, tmp_path):
    """LPOSS.predict(abstain=...) with its propagation replaced by the known map (image at the resized size,
    so the final resize is the identity)."""
    model = LPOSS.from_config(
        LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=24)),
        text_cache_dir=str(tmp_path / "text"),
    )
    model.set_classes(["cat", "dog"])
    s, a, b = _known_scores()
    monkeypatch.setattr(model, "propagate_names", lambda feats: (s.clone(), {}))
    image = np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    plain = model.predict(image).labels.numpy()
    assert np.array_equal(plain, _argmax_of(s))
    got = model.predict(image, abstain=Abstain(0.9)).labels.numpy()
    assert np.array_equal(got, np.where(a | b, UNKNOWN, plain))
    got = model.predict(image, abstain=Abstain(0.6, background=0)).labels.numpy()
    assert np.array_equal(got, np.where(a, 0, plain))


# LPOSS+ scores of the tiny random model are propagated sums in ~[8, 123]: at the default logit_scale=40 the
# softmax rounds to exactly 1.0 even in float64; threshold 1.0 must still abstain everywhere (every
# probability is below 1 with two names or more). logit_scale=0.01 checks the plain comparison path.
SCALE = "predict.logit_scale=0.01"


def _segment(env, tmp_path, *overrides):
    img = tmp_path / "img.png"
    Image.fromarray(env["ds"][0]["image"]).save(img)
    out = tmp_path / "out"
    cfg = compose_cfg(
        tmp_path / "run", env, "window.short_side=64", f"image={img}", 'classes="cat,dog;puppy,sky"',
        f"out={out}", "predict.unknown_threshold=1.0", *overrides,
    )  # fmt: skip
    run_task(cfg)
    return np.asarray(Image.open(out / "img.labels.png")), json.loads((out / "segment.json").read_text())


def test_segment_threshold_one_marks_every_pixel_unknown(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))
    labels, summary = _segment(env, tmp_path, SCALE)
    assert labels.shape == (32, 40) and (labels == UNKNOWN).all()
    assert [name for name, _ in legend_entries(labels, ["cat", "dog", "sky"])] == ["unknown"]
    assert summary["images"][0]["pixels_per_class"] == {"unknown": 32 * 40}


def test_segment_threshold_one_at_default_logit_scale(env, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))
    labels, _ = _segment(env, tmp_path)
    assert (labels == UNKNOWN).all()


def test_evaluate_voc_threshold_one_predicts_background_everywhere(tmp_path, env, monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))
    root = make_dataset(tmp_path / "voc", "voc", n_images=N, size=(32, 40), seed=1)
    common = ["dataset=voc", f"data_root={root}", "window.short_side=64", SCALE]
    run_task(compose_cfg(tmp_path / "plain", env, *common, f"save_predictions={tmp_path / 'plain_pred'}"))
    plain = pngs(tmp_path / "plain_pred")
    assert any((p != 0).any() for p in plain.values())  # without the rule some pixels are not background
    cfg = compose_cfg(
        tmp_path / "run",
        env,
        *common,
        "predict.unknown_threshold=1.0",
        f"save_predictions={tmp_path / 'pred'}",
    )
    res = run_task(cfg)
    preds = pngs(tmp_path / "pred")
    assert sorted(preds) == sorted(plain) and all((p == 0).all() for p in preds.values())
    ds = SegmentationDataset("voc", root)
    g = [np.asarray(ds[i]["label"]) for i in range(len(ds))]
    want = 100.0 * np_miou([preds[str(ds[i]["id"])] for i in range(len(ds))], g, 21)[0]
    assert res["mIoU"] == pytest.approx(want, abs=1e-6)
