"""The Runs tab's data: runs found below a folder, their table, worst-first images, comparisons, the
files behind one image, and the command line's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lposs_lab.app.__main__ import main, parse_args
from lposs_lab.app.runs import (
    TABLE_COLUMNS,
    allowed_folders,
    compare_rows,
    image_files,
    pct1,
    per_image_rows,
    runs_table,
    scan_runs,
)
from lposs_lab.app.runs_tab import class_bars_html
from lposs_lab.lab.data import SegmentationDataset


def test_every_results_json_is_found_and_tabled(runs_dir):
    runs, problems = scan_runs(runs_dir)
    assert [r.key for r in runs] == ["lposs_plus", "maskclip"]
    assert problems == ["broken/results.json: unreadable (JSONDecodeError)"]
    rows = {row[0]: dict(zip(TABLE_COLUMNS, row, strict=True)) for row in runs_table(runs)}
    for r in runs:
        saved = json.loads(r.source.read_text())
        row = rows[r.key]
        assert row["mIoU"] == f"{saved['mIoU']:.1f}" and row["images"] == saved["num_images"] == 4
        assert row["dataset"] == "voc20" and row["vm"] == row["vlm"] == "tiny_random"
    assert rows["lposs_plus"]["Boundary IoU"] == pct1(runs[0].data["boundary_iou"])
    assert rows["maskclip"]["Boundary IoU"] == "-" and rows["maskclip"]["method"] == "MaskCLIP"
    assert rows["lposs_plus"]["differs"] == "metrics.boundary=true"


def test_images_worst_first_equal_the_records_and_their_files(runs_dir):
    runs, _ = scan_runs(runs_dir)
    plus = runs[0]
    saved = json.loads(plus.source.read_text())["per_image"]
    order = per_image_rows(plus)
    assert [r["id"] for r in order] == [r["id"] for r in sorted(saved, key=lambda r: (r["mIoU"], r["id"]))]
    assert [r["mIoU"] for r in order] == sorted(r["mIoU"] for r in saved)
    ds = SegmentationDataset("voc20", plus.data_root)
    worst = order[0]["id"]
    files = image_files(plus, worst)
    sample = ds[ds.ids.index(worst)]
    np.testing.assert_array_equal(files.image, sample["image"])
    np.testing.assert_array_equal(files.truth, sample["label"])
    kept = np.asarray(Image.open(plus.predictions_dir / f"{worst}.png"))
    np.testing.assert_array_equal(files.prediction, kept)
    assert files.class_names[0] == "aeroplane" and files.note == ""
    other = image_files(runs[1], worst)
    assert other.prediction is None and "save_predictions=DIR" in other.note
    assert set(allowed_folders(runs)) == {plus.data_root.resolve(), plus.predictions_dir.resolve()}


def test_two_runs_compare_image_by_image(runs_dir):
    a, b = scan_runs(runs_dir)[0]
    rows = compare_rows(a, b)
    ma = {r["id"]: r["mIoU"] for r in a.data["per_image"]}
    mb = {r["id"]: r["mIoU"] for r in b.data["per_image"]}
    assert sorted(r["id"] for r in rows) == sorted(ma)
    for r in rows:
        assert r["delta"] == pytest.approx(mb[r["id"]] - ma[r["id"]])
    assert [r["delta"] for r in rows] == sorted(r["delta"] for r in rows)


def test_refine_runs_read_their_after_numbers_and_other_datasets_do_not_compare(tmp_path, runs_dir):
    folder = tmp_path / "refine"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "dataset": "ade20k", "task": "refine", "refiner": "lposs_plus", "num_images": 2,
        "before": {"mIoU": 10.0}, "after": {"mIoU": 12.345, "boundary_iou": 7.06},
        "config": {"data_root": str(tmp_path)},
        "per_image": [{"id": "a", "mIoU_before": 5.0, "mIoU_after": 9.0, "seconds": 0.1},
                      {"id": "b", "mIoU_before": 15.0, "mIoU_after": 2.5, "seconds": 0.1}],
    }))  # fmt: skip
    (run,), _ = scan_runs(tmp_path)
    row = dict(zip(TABLE_COLUMNS, runs_table([run])[0], strict=True))
    assert row["mIoU"] == "12.3" and row["Boundary IoU"] == "7.1" and row["method"] == "refine: lposs_plus"
    assert [r["id"] for r in per_image_rows(run)] == ["b", "a"]
    with pytest.raises(ValueError, match="different datasets"):
        compare_rows(run, scan_runs(runs_dir)[0][0])


def test_class_bars_are_sorted_best_first():
    out = class_bars_html({"cat": 10.0, "dog": None, "sky": 55.5, "sea": 0.0})
    assert out.index(">sky<") < out.index(">cat<") < out.index(">sea<")
    assert "no pixels in ground truth or prediction: dog" in out


def test_the_command_line_defaults_to_loopback_and_refuses_bad_values(capsys, tmp_path):
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and not args.share and args.runs is None
    assert main(["--vm", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown --vm 'nope'; valid: dino_b16")
    assert main(["--runs", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["--port", "70000", "--vm", "tiny_random", "--vlm", "tiny_random"]) == 2
    assert "--port 70000 is out of range" in capsys.readouterr().err
