"""Intervals in results.json and ``report compare`` on runs that scored saved predictions (``predictions=``).

The runs are real in-process evaluations of a synthetic VOC20 split: a good method (90 % of the pixels
right), a poor one (30 %), the poor one scored twice (identical runs), and the poor one on fewer images.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from scoring import write_predictions
from synthetic_data import make_dataset

from lposs_lab.lab import report
from lposs_lab.lab.data import SegmentationDataset
from lposs_lab.lab.records import StateStore
from lposs_lab.lab.stats import bootstrap_metrics, record_counts, score_rows
from lposs_lab.lab.tasks.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]
N = 12


def evaluate_in(out: Path, *overrides: str) -> dict:
    """evaluate() on a composed config; results.json and states/ land in ``out``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            "config",
            overrides=[
                f"paths.root_dir={out}",
                f"paths.output_dir={out}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "num_workers=0",
                *overrides,
            ],
        )
    return evaluate(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    root = make_dataset(tmp / "data", "voc20", n_images=N, size=(40, 56))
    ds = SegmentationDataset("voc20", root)
    write_predictions(ds, tmp / "good_preds", seed=1, keep=0.9)
    write_predictions(ds, tmp / "poor_preds", seed=2, keep=0.3)
    base = ["dataset=voc20", f"data_root={root}"]
    out = {}
    for name, preds, extra in [
        ("good", "good_preds", []),
        ("poor", "poor_preds", []),
        ("poor_again", "poor_preds", ["metrics.boundary=true"]),
        ("poor_fewer", "poor_preds", ["limit=8"]),
        ("no_ci", "poor_preds", ["metrics.ci.resamples=0"]),
    ]:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            evaluate_in(tmp / name, *base, f"predictions={tmp / preds}", *extra)
        out[name] = tmp / name
        out[f"{name}_printed"] = printed.getvalue()
    out["tmp"] = tmp
    return out


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_results_json_carries_intervals_in_percent(runs):
    res = load(runs["poor_again"])
    keys = list(res)
    assert keys[keys.index("mIoU") : keys.index("mIoU") + 2] == ["mIoU", "mIoU_ci"]
    assert res["ci"] == {"level": 0.95, "resamples": 1000, "seed": 0}
    for key in ("mIoU", "boundary_iou", "pixel_accuracy"):
        low, high = res[f"{key}_ci"]
        assert 0 <= low < high <= 100, key
    assert res["pixel_accuracy_ci"][0] < res["pixel_accuracy"] < res["pixel_accuracy_ci"][1]
    assert list(res["per_class_iou_ci"]) == list(res["per_class_iou"])
    for name, value in res["per_class_iou"].items():
        assert (value is None) == (res["per_class_iou_ci"][name] is None)
    assert list(res["per_class_boundary_iou_ci"]) == list(res["per_class_boundary_iou"])
    # the interval is the bootstrap of the states the run wrote (and their sum is the run's score)
    _, counts = record_counts(StateStore(res["state_dir"]).load([p["id"] for p in res["per_image"]]))
    assert score_rows(counts)["mIoU"] == pytest.approx(res["mIoU"], abs=1e-9)
    assert bootstrap_metrics(counts, resamples=1000, seed=0)["mIoU"] == res["mIoU_ci"]
    # the interval does not depend on Boundary IoU being on, nor on the run folder: same seed, same numbers
    assert load(runs["poor"])["mIoU_ci"] == res["mIoU_ci"]
    assert "boundary_iou_ci" not in load(runs["poor"])


def test_the_printed_table_shows_the_interval_and_says_when_the_score_lies_outside(runs):
    good = load(runs["good"])
    low, high = good["mIoU_ci"]
    text = runs["good_printed"]
    assert f"{good['mIoU']:.1f} [{low:.1f}, {high:.1f}]" in text.splitlines()[2]
    assert "[low, high]: 95 % bootstrap interval over the images (1000 resamples)" in text
    # 12 images, noise spread over all 20 classes: resamples that miss a class's images score it 0
    assert high < good["mIoU"] and "note: the mIoU lies outside its interval" in text
    assert "bootstrap interval" not in runs["no_ci_printed"]


def test_intervals_off(runs):
    res = load(runs["no_ci"])
    assert res["ci"] is None and not [k for k in res if k.endswith("_ci")]


def test_a_clearly_better_method_is_significant(runs, tmp_path, capsys):
    out = tmp_path / "d" / "good_vs_poor.json"
    assert (
        report.main(["compare", str(runs["good"]), str(runs["poor"] / "results.json"), "--json", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    good, poor = load(runs["good"]), load(runs["poor"])
    assert res["delta"] == pytest.approx(good["mIoU"] - poor["mIoU"], abs=1e-9) and res["delta"] > 20
    assert res["ci"][0] > 0 and res["significant"] is True
    assert res["p_value"] == pytest.approx(2 / 1001) and res["level"] == 0.95 and res["num_images"] == N
    assert {"delta", "ci", "p_value", "significant", "level", "num_images", "per_class"} <= set(res)
    deltas = [abs(v["delta"]) for v in res["per_class"].values()]
    assert deltas == sorted(deltas, reverse=True) and len(deltas) > 3
    for name, v in res["per_class"].items():
        assert v["delta"] == pytest.approx(
            good["per_class_iou"][name] - poor["per_class_iou"][name], abs=1e-9
        )
        assert v["ci"][0] <= v["delta"] <= v["ci"][1]
    assert f"ΔmIoU = A - B = {res['delta']:+.2f} [{res['ci'][0]:+.2f}, {res['ci'][1]:+.2f}]" in text
    assert "significant at 95 %" in text and "not significant" not in text


def test_identical_runs_are_not_significant(runs, tmp_path, capsys):
    out = tmp_path / "same.json"
    assert report.main(["compare", str(runs["poor"]), str(runs["poor_again"]), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["delta"] == 0.0 and res["ci"] == [0.0, 0.0]
    assert res["p_value"] == 1.0 and res["significant"] is False
    assert all(v["delta"] == 0.0 for v in res["per_class"].values())
    assert "not significant at 95 %" in capsys.readouterr().out


def test_runs_that_scored_different_images_or_data_are_refused(runs, tmp_path, capsys):
    out = tmp_path / "never.json"
    assert report.main(["compare", str(runs["poor"]), str(runs["poor_fewer"]), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot compare")
    assert "they scored different images (12 vs 8): 4 only in A (first: " in err
    assert not out.exists()
    other = load(runs["poor"])
    other["dataset"] = "voc"
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "results.json").write_text(json.dumps(other))
    assert report.main(["compare", str(runs["poor"]), str(tmp_path / "voc")]) == 2
    assert "they scored different datasets: A voc20, B voc" in capsys.readouterr().err
    moved = tmp_path / "moved"  # a run folder without its states
    moved.mkdir()
    shutil.copy(runs["good"] / "results.json", moved / "results.json")
    data = load(moved)
    data["state_dir"] = str(tmp_path / "gone")
    (moved / "results.json").write_text(json.dumps(data))
    assert report.main(["compare", str(moved), str(runs["poor"])]) == 2
    assert "no per-image states for" in capsys.readouterr().err
    assert report.main(["compare", str(runs["poor"]), str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main(["compare", str(runs["poor"]), str(runs["good"]), "--level", "2"]) == 2
    assert "error: --level=2.0 is out of range" in capsys.readouterr().err


def test_a_moved_run_folder_finds_its_states_beside_results(runs, tmp_path, capsys):
    moved = tmp_path / "moved_good"
    shutil.copytree(runs["good"], moved)
    data = load(moved)
    data["state_dir"] = str(tmp_path / "gone")
    (moved / "results.json").write_text(json.dumps(data))
    assert report.main(["compare", str(moved), str(runs["good"]), "--top", "0"]) == 0
    assert "ΔmIoU = A - B = +0.00 [+0.00, +0.00]" in capsys.readouterr().out


def _labelled(run_dir: Path, row: str, dest: Path) -> None:
    data = load(run_dir)
    data.setdefault("config", {})["report"] = {"row": row}
    dest.mkdir(parents=True)
    (dest / "results.json").write_text(json.dumps(data))


def test_report_marks_the_best_row_and_the_rows_not_distinguishable_from_it(runs, tmp_path, capsys):
    for name, row in (("good", "good"), ("poor", "poor"), ("poor_again", "poor twin")):
        _labelled(runs[name], row, tmp_path / "runs" / name)
    out = tmp_path / "report.md"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--compare-to", "best"]) == 0
    text = out.read_text()
    good, poor = load(runs["good"]), load(runs["poor"])
    miou_table = text.split("Boundary IoU (%)")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[7].strip() for line in miou_table.splitlines()
            if line.startswith("| good") or line.startswith("| poor")}  # fmt: skip
    half = (good["mIoU_ci"][1] - good["mIoU_ci"][0]) / 2
    assert rows["good"] == f"{good['mIoU']:.1f} ±{half:.1f}*"
    assert rows["poor"].endswith(f"±{(poor['mIoU_ci'][1] - poor['mIoU_ci'][0]) / 2:.1f}")  # worse: no mark
    assert "±: half the width of the run's 95 % bootstrap interval" in text
    # against the poor row, its twin is not distinguishable, the good row is
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--compare-to", "poor"]) == 0
    miou_table = out.read_text().split("Boundary IoU (%)")[0]
    cells = {line.split("|")[1].strip(): line.split("|")[7].strip() for line in miou_table.splitlines()
             if line.startswith("| ")}  # fmt: skip
    assert cells["poor"].endswith("*") and cells["poor twin"].endswith(" ≈") and cells["good"][-1].isdigit()
    assert out.read_text().count("`≈`: not distinguishable") == 1  # the Boundary IoU table has no 'poor' row
    assert report.main([str(tmp_path / "runs"), "--compare-to", "nobody"]) == 2
    err = capsys.readouterr().err
    assert "error: --compare-to 'nobody' names no row; valid: best or one of: " in err and "poor twin" in err


def test_runs_with_other_class_names_compare_by_class_index(runs, tmp_path, capsys):
    renamed = load(runs["good"])  # e.g. another vocabulary: the benchmark's classes, other names
    renamed["per_class_iou"] = {f"name{i}": v for i, v in enumerate(renamed["per_class_iou"].values())}
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "results.json").write_text(json.dumps(renamed))
    out = tmp_path / "r.json"
    assert report.main(["compare", str(tmp_path / "renamed"), str(runs["good"]), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["delta"] == 0.0 and set(res["per_class"]) <= set(renamed["per_class_iou"])
    fewer = dict(renamed, per_class_iou=dict(list(renamed["per_class_iou"].items())[:5]))
    (tmp_path / "renamed" / "results.json").write_text(json.dumps(fewer))
    assert report.main(["compare", str(tmp_path / "renamed"), str(runs["good"])]) == 2
    assert "different numbers of classes (5 vs 20)" in capsys.readouterr().err
