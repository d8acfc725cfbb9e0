"""`dataset=folder`: your own image and label folders, evaluated like a benchmark.

The numbers are checked against a direct numpy computation on label maps written here (the targets are made
from the raw files by hand, not by the lab's loader); predictions come from ``predictions=DIR`` so they are
exact. The configs are composed in-process (see test_evaluate.py) with ``paths.root_dir`` as the folder the
command was "started from".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from scoring import np_boundary_miou, np_miou

from lposs_lab.errors import ConfigError
from lposs_lab.lab.data import DatasetError, SegmentationDataset
from lposs_lab.lab.data.benchmarks import encode_label, reduce_zero_label
from lposs_lab.lab.data.folder import folder_benchmark, unpaired_files
from lposs_lab.lab.tasks import run_task
from lposs_lab.lab.tasks.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "cat;kitty", "dog"]
IDS = ["a", "b", "sub/c", "sub/d"]
SIZE = (18, 25)


def compose_cfg(start: Path, *overrides: str):
    """The run config of ``overrides``, started from ``start`` (relative paths), outputs in ``start/out``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[
                f"paths.root_dir={start}",
                f"paths.output_dir={start / 'out'}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "num_workers=0",
                "dataset=folder",
                *overrides,
            ],
        )


def write_folder(
    root: Path, ids=IDS, *, num_classes: int = 3, low: int = 0, ignore: int = 255, seed: int = 0
) -> dict[str, np.ndarray]:
    """``root/images/<id>.jpg`` and ``root/labels/<id>.png`` (raw values ``low..low+C-1`` and ``ignore``);
    returns the raw label maps by id."""
    rng = np.random.default_rng(seed)
    raws = {}
    for key in ids:
        raw = rng.integers(low, low + num_classes, SIZE).astype(np.uint8)
        raw[rng.random(SIZE) < 0.1] = ignore
        for folder, name, arr in (
            ("images", f"{key}.jpg", rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
            ("labels", f"{key}.png", raw),
        ):
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
        raws[key] = raw
    return raws


def write_preds(folder: Path, ids, num_classes: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    preds = {}
    for key in ids:
        pred = rng.integers(0, num_classes, SIZE).astype(np.uint8)
        path = folder / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(path)
        preds[key] = pred
    return preds


def test_folder_numbers_equal_numpy_and_relative_paths_resolve_against_the_start_folder(
    tmp_path, monkeypatch
):
    raws = write_folder(tmp_path)
    preds = write_preds(tmp_path / "preds", IDS, 3)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    monkeypatch.chdir(tmp_path / "images")  # the process's cwd is not what relative paths mean
    res = evaluate(
        compose_cfg(
            tmp_path, "dataset.images=images", "dataset.labels=labels", "dataset.classes=classes.txt",
            f"predictions={tmp_path / 'preds'}", "metrics.boundary=true",
        )
    )  # fmt: skip
    gts = [raws[k] for k in IDS]  # classes 0..2 and 255: the raw maps are the targets
    pred_list = [preds[k] for k in IDS]
    ref, _, _ = np_miou(pred_list, gts, 3)
    assert res["boundary_iou"] == pytest.approx(100 * np_boundary_miou(pred_list, gts, 3), abs=1e-9)
    assert res["dataset"] == "folder" and res["num_images"] == 4 and res["errors"] == []
    assert res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert list(res["per_class_iou"]) == ["background", "cat", "dog"]
    assert [r["id"] for r in res["per_image"]] == IDS
    for rec in res["per_image"]:
        k = rec["id"]
        assert rec["mIoU"] == pytest.approx(100 * np_miou([preds[k]], [raws[k]], 3)[0], abs=1e-9)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["vocabulary"] == "default" and saved["mIoU"] == res["mIoU"]
    meta = json.loads((tmp_path / "out" / "states" / "meta.json").read_text())
    assert meta["data"]["images"] == str(tmp_path / "images") and meta["classes"] == CLASSES


def test_unpaired_files_are_listed_in_one_warning_and_not_scored(tmp_path, capsys):
    write_folder(tmp_path, IDS + ["x1", "x2"])
    for key in ("x1", "x2"):
        (tmp_path / "labels" / f"{key}.png").unlink()
    write_folder(tmp_path / "extra", ["y"])  # a label without an image
    (tmp_path / "extra" / "labels" / "y.png").rename(tmp_path / "labels" / "y.png")
    write_preds(tmp_path / "preds", IDS, 3)
    res = evaluate(
        compose_cfg(
            tmp_path, f"dataset.images={tmp_path / 'images'}", f"dataset.labels={tmp_path / 'labels'}",
            "dataset.classes=[a,b,c]", f"predictions={tmp_path / 'preds'}",
        )
    )  # fmt: skip
    assert res["num_images"] == 4 and [r["id"] for r in res["per_image"]] == IDS
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        "warning: dataset=folder: 2 image(s) without a label (x1, x2); 1 label(s) without an image (y) "
        "are not scored"
    ]


def test_unpaired_message_shows_the_first_few_names_and_a_split_file_selects_ids(tmp_path):
    ids = [f"i{n:02d}" for n in range(8)]
    write_folder(tmp_path, ids)
    for key in ids[:7]:
        (tmp_path / "labels" / f"{key}.png").unlink()
    info = folder_benchmark(tmp_path / "images", tmp_path / "labels", ["a", "b", "c"])
    assert unpaired_files(info).message() == (
        "7 image(s) without a label (i00, i01, i02, i03, i04, ... (2 more)) are not scored"
    )
    assert SegmentationDataset(info, info.images).ids == ["i07"]
    (tmp_path / "split.txt").write_text("i07\ni06\nmissing\n")
    split = tmp_path / "split.txt"
    info = folder_benchmark(tmp_path / "images", tmp_path / "labels", ["a", "b", "c"], split=split)
    unpaired = unpaired_files(info)
    assert unpaired.images_without_label == ("i06",) and unpaired.labels_without_image == ("missing",)
    assert SegmentationDataset(info, info.images).ids == ["i07"]


def test_a_label_value_outside_the_classes_is_a_per_image_error_naming_file_and_value(tmp_path):
    raws = write_folder(tmp_path)
    bad = raws["sub/c"].copy()
    bad[3, 4] = 7
    Image.fromarray(bad).save(tmp_path / "labels" / "sub" / "c.png")
    preds = write_preds(tmp_path / "preds", IDS, 3)
    res = evaluate(
        compose_cfg(
            tmp_path, "dataset.images=images", "dataset.labels=labels", "dataset.classes=[a,b,c]",
            f"predictions={tmp_path / 'preds'}",
        )
    )  # fmt: skip
    assert [e["id"] for e in res["errors"]] == ["sub/c"]
    msg = res["errors"][0]["error"]
    assert str(tmp_path / "labels" / "sub" / "c.png") in msg and "holds value 7" in msg and "0..2" in msg
    kept = ["a", "b", "sub/d"]
    ref, _, _ = np_miou([preds[k] for k in kept], [raws[k] for k in kept], 3)
    assert res["num_images"] == 3 and res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)


def test_reduce_zero_label_and_another_ignore_index(tmp_path):
    # raw 0 = ignored (reduce_zero_label), 1..3 = classes 0..2, 9 = the ignore index; 255 would be a bad value
    raws = write_folder(tmp_path, low=1, ignore=9)
    for raw in raws.values():
        raw[0, 0] = 0
    for key, raw in raws.items():
        Image.fromarray(raw).save(tmp_path / "labels" / f"{key}.png")
    preds = write_preds(tmp_path / "preds", IDS, 3)
    res = evaluate(
        compose_cfg(
            tmp_path, "dataset.images=images", "dataset.labels=labels", "dataset.classes=[a,b,c]",
            "dataset.reduce_zero_label=true", "dataset.ignore_index=9", f"predictions={tmp_path / 'preds'}",
        )
    )  # fmt: skip
    gts = []
    for k in IDS:
        raw = raws[k].astype(np.int64)
        gts.append(np.where((raw == 0) | (raw == 9), 255, raw - 1).astype(np.uint8))
    ref, _, _ = np_miou([preds[k] for k in IDS], gts, 3)
    assert res["errors"] == [] and res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)


def test_encode_label_with_the_defaults_equals_the_benchmark_rule():
    raw = np.array([[0, 1, 2, 255], [3, 0, 255, 1]], dtype=np.uint8)
    label, bad = encode_label(raw, 3, reduce_zero=True)
    assert bad is None and np.array_equal(label, reduce_zero_label(raw))
    label, bad = encode_label(raw, 4)
    assert bad is None and np.array_equal(label, raw)
    assert encode_label(raw, 3)[1] == 3  # value 3 with 3 classes
    assert encode_label(raw, 3, ignore_index=0)[1] == 255  # 255 is a value when another value is ignored


def test_classes_from_a_file_with_synonyms_or_inline(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "classes.txt").write_text("background\n  cat ; kitty \ndog\n")
    info = folder_benchmark(tmp_path / "images", tmp_path / "labels", tmp_path / "classes.txt")
    assert info.classes == ("background", "cat;kitty", "dog") and info.name == "folder" and not info.strict
    for inline in (["background", "cat;kitty", "dog"], "background,cat;kitty,dog"):
        assert folder_benchmark(tmp_path / "images", tmp_path / "labels", inline).classes == info.classes
    with pytest.raises(ConfigError, match="dataset.classes file .*nope.txt not found"):
        folder_benchmark(tmp_path / "images", tmp_path / "labels", str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="'cat' is given twice"):
        folder_benchmark(tmp_path / "images", tmp_path / "labels", ["cat", "dog", "cat"])


def _exit_line(capsys, cfg) -> str:
    with pytest.raises(SystemExit) as exc:
        run_task(cfg)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_empty_or_missing_folders_are_one_error_line_exit_2_before_any_model(tmp_path, capsys):
    write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    base = ["dataset.classes=[a,b,c]", "vm=tiny_random", "vlm=tiny_random", "device=cpu"]
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.images=empty", "dataset.labels=labels", *base))
    assert line == f"error: dataset.images={tmp_path / 'empty'} holds no file ending in '.jpg' (it is empty)"
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.images=images", "dataset.labels=labels",
                                          "dataset.image_suffix=.png", *base))  # fmt: skip
    assert "no file ending in '.png' (it holds 4 '.jpg' file(s): pass dataset.image_suffix=.jpg)" in line
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.images=images", "dataset.labels=nowhere", *base))
    assert line == f"error: dataset.labels={tmp_path / 'nowhere'} is not a folder; pass the folder of your " \
        "labels"
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.labels=labels", *base))
    assert "dataset=folder needs dataset.images=DIR" in line
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.images=images", "dataset.labels=labels"))
    assert "dataset=folder needs its classes" in line
    # images and labels that never pair: nothing to score
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(tmp_path / "other" / "zzz.png")
    line = _exit_line(capsys, compose_cfg(tmp_path, "dataset.images=images", "dataset.labels=other", *base))
    assert "has a label <id>.png" in line
    assert not (tmp_path / "out" / "states").exists()  # nothing was written


def test_images_and_labels_in_one_folder(tmp_path):
    write_folder(tmp_path)
    for p in (tmp_path / "labels").rglob("*.png"):
        target = tmp_path / "images" / p.relative_to(tmp_path / "labels")
        p.rename(target.with_name(target.stem + "_mask.png"))
    info = folder_benchmark(
        tmp_path / "images", tmp_path / "images", ["a", "b", "c"], image_suffix=".png",
        label_suffix="_mask.png",
    )
    for p in (tmp_path / "images").rglob("*.jpg"):
        Image.open(p).save(p.with_suffix(".png"))
        p.unlink()
    ds = SegmentationDataset(info, info.images)
    assert ds.ids == IDS and not unpaired_files(info)
    assert ds[0]["label"].shape == SIZE and "error" not in ds[0]


@pytest.mark.slow
def test_folder_with_a_model_saves_scores_uses_the_cache_and_resumes(tmp_path):
    write_folder(tmp_path)
    common = [
        "dataset.images=images", "dataset.labels=labels", "dataset.classes=[a,'b;bee',c]",
        "vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=32", "text_cache_dir=null",
        "cache.enabled=true", f"cache.dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    res = evaluate(compose_cfg(tmp_path, *common, "save_scores=true"))
    assert res["num_images"] == 4 and res["errors"] == [] and 0 <= res["mIoU"] <= 100
    folder = tmp_path / "out" / "scores"
    scores = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.npz"))
    assert scores == [f"{k}.npz" for k in IDS]
    assert any((tmp_path / "cache").rglob("*.arrow"))
    again = evaluate(compose_cfg(tmp_path, *common, "resume=true"))
    assert again["resumed"] == 4 and again["mIoU"] == res["mIoU"]


def test_folder_description_errors():
    with pytest.raises(DatasetError, match="is not a folder"):
        folder_benchmark("/nonexistent/images", "/nonexistent/labels", ["a"])
