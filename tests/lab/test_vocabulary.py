"""`dataset.vocabulary=default|plain|first|FILE`, `experiment=vocabulary`, the report's robustness table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from scoring import write_predictions
from synthetic_data import make_dataset

from lposs_lab.errors import ConfigError
from lposs_lab.lab.data import BENCHMARKS, SegmentationDataset, get_benchmark
from lposs_lab.lab.data.vocabulary import PLAIN_SOURCES, plain_names, vocabulary_classes, with_vocabulary
from lposs_lab.lab.report import main as report_main
from lposs_lab.lab.tasks import run_task
from lposs_lab.lab.tasks.evaluate import evaluate
from lposs_lab.lab.vocab_table import robustness_table

REPO = Path(__file__).resolve().parents[2]
VOC20 = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def compose_cfg(tmp_path: Path, *overrides: str, config_name: str = "config"):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            config_name,
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'out'}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "num_workers=0",
                *overrides,
            ],
        )


# ------------------------------------------------------------------------------------------ the names
def test_plain_and_first_names_of_voc():
    voc = get_benchmark("voc")
    name, plain = vocabulary_classes(voc, "plain")
    assert name == "plain" and plain == ("background", *VOC20)
    assert plain_names("voc20") == tuple(VOC20)
    name, first = vocabulary_classes(voc, "first")
    assert name == "first" and first[0] == "sky" and first[11] == "dining table" and len(first) == 21
    assert not any(";" in c for c in first + plain)
    assert vocabulary_classes(voc, "default") == ("default", voc.classes) and ";" in voc.classes[0]


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_plain_names_fit_every_benchmark_and_cite_their_source(name):
    info = get_benchmark(name)
    plain = plain_names(name)
    assert len(plain) == info.num_classes and len(set(plain)) == len(plain)
    assert all(n == n.strip() and n and ";" not in n for n in plain)
    source = PLAIN_SOURCES[name]
    assert "MMSegmentation" in source and "github.com/open-mmlab/mmsegmentation" in source


def test_plain_context59_is_context_without_background_and_coco_object_is_background_plus_coco_things():
    context = plain_names("context")
    assert context[1:] == plain_names("context59") and context[0] == "background"
    assert plain_names("coco_object") == ("background", *plain_names("coco_stuff")[:80])
    assert plain_names("voc")[1:] == plain_names("voc20")
    with pytest.raises(ConfigError, match="folder has no plain vocabulary .*valid: default, first, or"):
        plain_names("folder")


def test_a_vocabulary_file_with_another_count_or_a_misspelt_name_is_refused(tmp_path):
    voc20 = get_benchmark("voc20")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(VOC20[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"has 19 classes; voc20 needs 20, one a line .*first 'aeroplane'"):
        vocabulary_classes(voc20, short)
    with pytest.raises(ConfigError, match="neither a vocabulary nor a file; valid: default, plain, first"):
        vocabulary_classes(voc20, "plian")
    with pytest.raises(ConfigError, match="vocabulary file .*missing.txt not found"):
        vocabulary_classes(voc20, tmp_path / "missing.txt")
    dup = tmp_path / "dup.txt"
    dup.write_text("\n".join(["cat", *VOC20[1:-1], "cat"]))
    with pytest.raises(ConfigError, match="'cat' is given twice"):
        vocabulary_classes(voc20, dup)


def test_a_vocabulary_file_keeps_synonyms_and_names_itself_by_its_path(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("\n".join(["plane;airplane", *VOC20[1:]]) + "\n")
    info = with_vocabulary(get_benchmark("voc20"), f)
    assert info.classes[0] == "plane;airplane" and info.vocabulary == str(f.resolve())
    assert with_vocabulary(get_benchmark("voc20"), "default") is get_benchmark("voc20")


# ------------------------------------------------------------------------------------------ evaluate
def test_vocabulary_file_renames_per_class_keys_and_changes_no_count(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=3)
    write_predictions(SegmentationDataset("voc20", root), tmp_path / "preds", seed=2)
    names = [f"thing {i}" for i in range(20)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    common = ["dataset=voc20", f"data_root={root}", f"predictions={tmp_path / 'preds'}"]
    base = evaluate(compose_cfg(tmp_path / "a", *common))
    res = evaluate(compose_cfg(tmp_path, *common, "dataset.vocabulary=names.txt"))  # relative: start folder
    assert list(res["per_class_iou"]) == names and list(base["per_class_iou"]) == VOC20[:10] + [
        "dining table", *VOC20[11:15], "potted plant", *VOC20[16:]
    ]
    assert list(res["per_class_iou"].values()) == list(base["per_class_iou"].values())
    assert res["mIoU"] == base["mIoU"] and base["vocabulary"] == "default"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["vocabulary"] == str(tmp_path / "names.txt") and "vocabulary=names.txt" in saved["label"]
    plain = evaluate(compose_cfg(tmp_path / "b", *common, "dataset.vocabulary=plain"))
    assert list(plain["per_class_iou"]) == VOC20 and plain["vocabulary"] == "plain"


def test_a_wrong_vocabulary_is_one_error_line_exit_2(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", "voc20", n_images=1)
    (tmp_path / "short.txt").write_text("a\nb\n")
    for vocab, expected in (
        ("short.txt", f"error: vocabulary file {tmp_path / 'short.txt'} has 2 classes; voc20 needs 20"),
        ("plian", "error: dataset.vocabulary='plian' is neither a vocabulary nor a file"),
    ):
        cfg = compose_cfg(tmp_path, "dataset=voc20", f"data_root={root}", f"dataset.vocabulary={vocab}")
        with pytest.raises(SystemExit) as exc:
            run_task(cfg)
        assert exc.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(expected)
    assert not (tmp_path / "out" / "states").exists()


def test_experiment_vocabulary_sweeps_three_vocabularies_over_the_8_benchmarks(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            "config",
            overrides=["experiment=vocabulary", f"paths.root_dir={tmp_path}"],
            return_hydra_config=True,
        )
    params = cfg.hydra.sweeper.params
    assert params["dataset.vocabulary"] == "default,plain,first"
    assert sorted(params["dataset"].split(",")) == sorted(BENCHMARKS)
    assert cfg.report.table == "vocabulary" and cfg.method.name == "lposs_plus" and cfg.cache.enabled
    assert "${dataset.vocabulary}" in str(cfg.hydra.sweep._get_node("subdir")._value())


# ------------------------------------------------------------------------------------------ the table
def _run(dataset: str, vocabulary: str, miou: float, ci: list[float] | None = None) -> dict:
    run = {"dataset": dataset, "vocabulary": vocabulary, "method": "lposs_plus", "label": "LPOSS+"}
    run["mIoU"] = miou
    if vocabulary != "default":
        run["label"] = f"LPOSS+ [vocabulary={vocabulary}]"
    if ci is not None:
        run["mIoU_ci"] = ci
    run["config"] = {"report": {"table": "vocabulary", "row": "LPOSS+"}}
    return run


def test_robustness_table_from_hand_made_results_files(tmp_path, capsys):
    runs = [
        _run("voc", "default", 62.4, [61.0, 63.5]),
        _run("voc", "plain", 50.2, [48.9, 51.0]),
        _run("voc", "first", 58.0),
        _run("voc20", "default", 79.3, [78.0, 80.1]),
        _run("voc20", "plain", 77.1, [76.0, 78.4]),
        _run("voc20", "first", 79.3, [78.0, 80.1]),
        _run("ade20k", "default", 22.3),  # only one vocabulary: no row
    ]
    for i, run in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(run))
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report.md")]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Vocabulary robustness" in text
    lines = text.splitlines()
    head = lines.index("| dataset | default | plain | Δ plain | first | Δ first |")
    cells = [ln.strip("| ").split(" | ") for ln in lines[head + 2 : head + 5]]
    rows = {c[0]: c[1:] for c in cells}
    # plain on VOC: 50.2 - 62.4 = -12.2, interval [48.9 - 63.5, 51.0 - 61.0] = [-14.6, -10.0]
    assert rows["VOC"] == ["62.4 [61.0, 63.5]", "50.2 [48.9, 51.0]", "-12.2 [-14.6, -10.0]", "58.0", "-4.4"]
    assert rows["VOC20"] == [
        "79.3 [78.0, 80.1]", "77.1 [76.0, 78.4]", "-2.2 [-4.1, 0.4]", "79.3 [78.0, 80.1]", "+0.0 [-2.1, 2.1]",
    ]  # fmt: skip
    avg = (62.4 + 79.3) / 2
    assert rows["Avg (2 sets)"] == [
        f"{avg:.1f}", f"{(50.2 + 77.1) / 2:.1f}", f"{(50.2 + 77.1) / 2 - avg:+.1f}",
        f"{(58.0 + 79.3) / 2:.1f}", f"{(58.0 + 79.3) / 2 - avg:+.1f}",
    ]  # fmt: skip
    assert not any(ln.startswith("| ADE") for ln in lines[head:])


def test_no_robustness_table_without_a_second_vocabulary():
    assert robustness_table([_run("voc", "default", 60.0), _run("voc20", "default", 70.0)]) is None
    # runs written before results named the vocabulary count as default
    old = {k: v for k, v in _run("voc", "default", 60.0).items() if k != "vocabulary"}
    table = robustness_table([old, _run("voc", "first", 55.0)])
    assert table is not None and table.rows[0] == ("VOC", ("60.0", "55.0", "-5.0"))


def test_rows_group_runs_by_their_label_without_the_vocabulary():
    def bare(dataset, vocabulary, miou, label):
        return {"dataset": dataset, "vocabulary": vocabulary, "method": "lposs", "label": label, "mIoU": miou}

    runs = [
        bare("voc20", "default", 70.0, "LPOSS [lp.k=800]"),
        bare("voc20", "/x/names.txt", 66.5, "LPOSS [lp.k=800, vocabulary=names.txt]"),
        bare("voc20", "default", 71.0, "LPOSS"),
        bare("voc20", "first", 71.0, "LPOSS [vocabulary=first]"),
    ]
    table = robustness_table(runs)
    assert table.header == ("dataset", "default", "first", "Δ first", "names.txt", "Δ names.txt")
    labels = [label for label, _ in table.rows]
    assert labels == ["LPOSS [lp.k=800] VOC20", "LPOSS VOC20"]  # one dataset each: no Avg row
    assert table.rows[0][1] == ("70.0", "-", "-", "66.5", "-3.5")
    assert table.rows[1][1] == ("71.0", "71.0", "+0.0", "-", "-")
    assert "random" not in table.title
    marked = robustness_table([dict(r, random_init=["vm=tiny_random"]) for r in runs[2:]] + runs[:2])
    assert "(random-init weights: meaningless)" in marked.title
    assert [label for label, _ in marked.rows] == ["LPOSS (random init) VOC20", "LPOSS [lp.k=800] VOC20"]


@pytest.mark.slow
def test_experiment_vocabulary_through_run_py_and_the_report(tmp_path):
    make_dataset(tmp_path / "data", "voc20", n_images=2)
    cmd = [
        sys.executable, str(REPO / "run.py"), "-m", "experiment=vocabulary", "dataset=voc20",
        "dataset.vocabulary=default,plain", "vm=tiny_random", "vlm=tiny_random", "device=cpu",
        "window.short_side=32", "data_root=data", "hydra.sweep.dir=mr", "text_cache_dir=null",
        "cache.dir=cache", "logger=none", "num_workers=0", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    files = (tmp_path / "mr" / "voc20").glob("*/results.json")  # subdir <dataset>/<vocabulary>
    runs = {f.parent.name: json.loads(f.read_text()) for f in files}
    assert sorted(runs) == ["default", "plain"]
    assert runs["plain"]["vocabulary"] == "plain" and runs["default"]["vocabulary"] == "default"
    assert list(runs["plain"]["per_class_iou"])[10] == "diningtable"
    assert list(runs["default"]["per_class_iou"])[10] == "dining table"
    assert report_main([str(tmp_path / "mr"), "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    d, p = runs["default"]["mIoU"], runs["plain"]["mIoU"]
    row = next(line for line in text.splitlines() if line.startswith("| VOC20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]  # default, plain, its drop (each "x [lo, hi]")
    (dl, dh), (pl, ph) = runs["default"]["mIoU_ci"], runs["plain"]["mIoU_ci"]
    assert cells[0] == f"{d:.1f} [{dl:.1f}, {dh:.1f}]" and cells[1] == f"{p:.1f} [{pl:.1f}, {ph:.1f}]"
    assert cells[2].startswith(f"{p - d:+.1f}"), row
