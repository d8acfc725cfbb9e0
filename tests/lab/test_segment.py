"""`run.py task=segment` end to end with the tiny random models, and its bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lposs_lab import LPOSS, LPOSSConfig, PixelConfig, WindowConfig

TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=112"]
CONF = Path(__file__).resolve().parents[2] / "conf"


def run(repo, tmp_path, *args, task="segment"):
    cmd = [
        sys.executable,
        str(repo / "run.py"),
        *([f"task={task}"] if task else []),
        *TINY,
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=96))
    return LPOSS.from_config(cfg)


def _img(tmp_path, name="img.png", size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = (200, 30, 30)
    path = tmp_path / name
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.mark.slow
def test_segment_end_to_end_writes_label_overlay_and_scores(repo_root, tmp_path):
    img = _img(tmp_path, size=(64, 48))
    out = tmp_path / "out"
    # no task=: an image= run segments
    res = run(
        repo_root, tmp_path, f"image={img}", 'classes="cat,dog;puppy,sky"', f"out={out}", "save_scores=true",
        task=None,
    )
    assert res.returncode == 0, res.stderr
    label = Image.open(out / "img.labels.png")
    assert label.mode == "P" and label.size == (64, 48)
    assert set(np.unique(np.asarray(label))) <= {0, 1, 2}
    overlay = Image.open(out / "img.overlay.png")
    assert overlay.size[1] >= 48 and overlay.size[0] > 64  # legend on the right
    scores = np.load(out / "img.scores.npz")
    assert scores["scores"].shape == (3, 48, 64) and list(scores["classes"]) == ["cat", "dog", "sky"]
    # labels are the argmax of the scores (float16 rounding may flip near-ties only)
    agree = (scores["scores"].astype(np.float32).argmax(0) == np.asarray(label)).mean()
    assert agree > 0.99
    # and they are what the predictor of the same config gives in-process
    direct = LPOSS.from_config(
        LPOSSConfig(vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=112)),
        text_cache_dir=None,
    )
    want = direct.predict(np.asarray(Image.open(img).convert("RGB")), ["cat", "dog;puppy", "sky"]).labels
    assert np.array_equal(np.asarray(label), want.numpy())
    summary = json.loads((out / "segment.json").read_text())
    assert summary["classes"] == ["cat", "dog;puppy", "sky"] and summary["method"] == "lposs_plus"
    assert summary["images"][0]["outputs"]["labels"] == str(out / "img.labels.png")
    assert sum(summary["images"][0]["pixels_per_class"].values()) == 64 * 48
    assert "img.labels.png" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "img.labels.png",
        "img.overlay.png",
        "img.scores.npz",
        "segment.json",
    ]


def _write(path, data):
    path.write_bytes(data)
    return path


BAD_INPUTS = [
    (lambda d: d / "missing.png", '"a,b"', "image not found"),
    (lambda d: d, '"a,b"', "directory"),
    (lambda d: _write(d / "empty.png", b""), '"a,b"', "empty"),
    (lambda d: _write(d / "bad.jpg", b"nope"), '"a,b"', "not a readable image"),
    (lambda d: _img(d), "' '", "class list is empty"),
    (lambda d: _img(d), "';,;'", "class list is empty"),
]


@pytest.mark.parametrize(("make", "classes", "message"), BAD_INPUTS)
def test_bad_input_one_line_error_no_output(tmp_path, capsys, monkeypatch, make, classes, message):
    """In-process through run_task (what run.py calls): exit 2, one line, nothing written."""
    from hydra import compose, initialize_config_dir

    from lposs_lab.lab.tasks import run_task

    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))  # run_task sets it
    path = make(tmp_path)
    out = tmp_path / "out"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[
            f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'hydra'}", *TINY,
            f"image={path}", f"classes={classes}", f"out={out}",
        ])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_task(cfg)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
def test_bad_input_through_run_py_is_one_line_exit_2(repo_root, tmp_path):
    out = tmp_path / "out"
    res = run(repo_root, tmp_path, f"image={tmp_path / 'missing.png'}", 'classes="a,b"', f"out={out}")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "image not found" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.slow
def test_truncated_image_fails_cleanly(repo_root, tmp_path):
    good = _img(tmp_path, "good.png", size=(128, 128))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    res = run(repo_root, tmp_path, f"image=[{good},{tmp_path / 'trunc.png'}]", "classes=a", f"out={out}")
    assert res.returncode == 2 and "trunc.png" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # nothing written, not even for the good image


@pytest.mark.parametrize(
    ("size", "mode"),
    [
        ((1, 1), "RGB"),
        ((3000, 12), "RGB"),
        ((33, 21), "RGBA"),
        ((33, 21), "P"),
        ((33, 21), "L"),
        ((33, 21), "I;16"),
        ((33, 21), "CMYK"),
    ],
)
def test_odd_images_work(tiny_model, tmp_path, size, mode):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    pred = tiny_model.predict(img, classes=["a", "b;c", "d"])
    assert tuple(pred.labels.shape) == (size[1], size[0])
    assert pred.labels.min() >= 0 and pred.labels.max() < 3
    assert pred.scores.shape == (3, size[1], size[0])


def test_predictor_order_error_and_synonym_max(tiny_model):
    fresh = LPOSS(tiny_model.vm, tiny_model.vlm, tiny_model.config)
    with pytest.raises(RuntimeError, match="set_classes"):
        fresh.predict(np.zeros((8, 8, 3), np.uint8))
    img = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    joint = tiny_model.predict(img, classes=["a;b", "c"])
    split = tiny_model.predict(img, classes=["a", "b", "c"])
    low = split.low_res_scores
    assert np.allclose(joint.low_res_scores[0].numpy(), np.maximum(low[0], low[1]).numpy(), atol=1e-6)
    assert np.allclose(joint.low_res_scores[1].numpy(), low[2].numpy(), atol=1e-6)


def test_methods_differ_and_lposs_has_no_pixel_stage(tiny_model):
    img = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    cfg = tiny_model.config
    outs = {}
    for method in ("maskclip", "lposs", "lposs_plus"):
        m = LPOSS(tiny_model.vm, tiny_model.vlm, cfg, method=method)
        outs[method] = m.predict(img, classes=["a", "b", "c"]).low_res_scores
    assert not np.allclose(outs["maskclip"], outs["lposs"])
    assert not np.allclose(outs["lposs"], outs["lposs_plus"])
    off = LPOSS(
        tiny_model.vm, tiny_model.vlm, LPOSSConfig(**{**cfg.__dict__, "pixel": PixelConfig(enabled=False)})
    )
    assert off.method == "lposs"
