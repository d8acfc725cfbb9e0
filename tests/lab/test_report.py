"""report.py: paper-layout tables, sweep and per-image figures, the CLI, and a real 3-point multirun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lposs_lab.lab import report
from lposs_lab.lab.tables import DATASET_COLUMNS, PAPER, results_table

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(dataset, method, miou, *, row=None, table=None, paper_avg=None, k=None, per_image=None, biou=None):
    config = {"lp": {"k": k}} if k is not None else {}
    if row or table:
        config["report"] = {"row": row, "table": table, "paper_avg": paper_avg}
    out = {"dataset": dataset, "method": method, "mIoU": miou, "config": config,
           "overrides": [f"lp.k={k}"] if k is not None else [],
           "per_image": [{"id": i, "mIoU": v} for i, v in (per_image or {}).items()]}
    if biou is not None:
        out["boundary_iou"] = biou
    return out


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_table_has_paper_layout_and_paper_numbers_beside_ours():
    runs = [_run(d, "lposs_plus", 50.0 + i) for i, d in enumerate(DATASET_COLUMNS)]
    runs += [_run(d, "lposs_plus", 40.0, row="448/224", table="table3", paper_avg=40.8)
             for d in DATASET_COLUMNS]
    text = results_table(runs).to_markdown()
    header = text.splitlines()[0]
    assert header.split("|")[2:11] == [f" {c} " for c in [*DATASET_COLUMNS.values(), "Avg"]]
    rows = _rows(text)
    assert [r[0] for r in rows] == ["LPOSS+", "paper (Table 1)", "448/224"]
    assert rows[0][1:10] == [f"{50.0 + i:.1f}" for i in range(8)] + ["53.5"]
    assert rows[0][10] == "42.1"  # the paper's LPOSS+ average (docs/method.md §6)
    assert rows[1][1] == f"{PAPER['mIoU']['lposs_plus']['voc']:.1f}" and rows[1][9] == "42.1"
    assert rows[2][9:11] == ["40.0", "40.8"]


def test_terminal_table_of_one_run_and_of_all_datasets():
    runs = [
        {"dataset": d, "method": "lposs_plus", "mIoU": 50.0 + i, "boundary_iou": 30.0}
        for i, d in enumerate(DATASET_COLUMNS)
    ]
    lines = results_table(runs).to_text().splitlines()
    assert lines[0].split() == ["mIoU", "(%)", *DATASET_COLUMNS.values(), "Avg", "Paper", "Avg"]
    assert lines[1].split() == ["LPOSS+", *[f"{50.0 + i:.1f}" for i in range(8)], "53.5", "42.1"]
    paper = PAPER["mIoU"]["lposs_plus"]
    assert lines[2].split()[-9:] == [*[f"{paper[d]:.1f}" for d in DATASET_COLUMNS], "42.1"]
    biou = results_table(runs, "boundary_iou").to_text().splitlines()
    assert biou[0].startswith("Boundary IoU (%)") and biou[1].split()[-2:] == ["30.0", "32.1"]
    # one run, only its dataset's column (what evaluate prints); the label carries the ablation
    one = {"dataset": "voc", "method": "oracle_patch", "label": "x [lp.k=3]", "mIoU": math.pi}
    text = results_table([one], all_datasets=False).to_text()
    assert [ln.split() for ln in text.splitlines()] == [
        ["mIoU", "(%)", "VOC", "Avg", "Paper", "Avg"],
        ["x", "[lp.k=3]", "3.1", "-", "-"],
    ]
    assert results_table([one], "boundary_iou").rows == ()  # runs without the metric are left out


def test_missing_datasets_give_no_average_and_boundary_table_is_separate():
    runs = [_run("voc", "lposs_plus", 60.0, biou=50.0), _run("voc20", "lposs_plus", 80.0, biou=70.0)]
    md = report.markdown_report(runs)
    assert "Boundary IoU (%)" in md
    rows = _rows(results_table(runs, "boundary_iou").to_markdown())
    assert rows[0][1] == "50.0" and rows[0][6] == "70.0" and rows[0][9] == "-"
    assert rows[1][1] == "51.2"  # paper Table 2 row


def test_sweep_rows_series_and_figure(tmp_path):
    runs = [_run("voc20", "lposs_plus", m, k=k) for k, m in [(40, 43.0), (10, 40.0), (20, 45.5)]]
    rows = _rows(results_table(runs).to_markdown())
    assert [r[0] for r in rows] == ["LPOSS+ [lp.k=40]", "LPOSS+ [lp.k=10]", "LPOSS+ [lp.k=20]"]
    assert report.sweep_series(runs, "lp.k") == {"voc20": [(10.0, 40.0), (20.0, 45.5), (40.0, 43.0)]}
    png = report.plot_sweep(runs, "lp.k", tmp_path / "k.png")
    assert png.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no run has"):
        report.plot_sweep(runs, "lp.gamma", tmp_path / "g.png")


def test_per_image_scatter_matches_images_by_id(tmp_path):
    a = _run("voc", "maskclip", 30.0, per_image={"x": 10.0, "y": 20.0, "z": 30.0})
    b = _run("voc", "lposs_plus", 40.0, per_image={"y": 25.0, "z": 20.0, "w": 1.0})
    png, n = report.plot_per_image(a, b, tmp_path / "s.png")
    assert n == 2 and png.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="share no image"):
        report.plot_per_image(a, _run("voc", "lposs", 1.0), tmp_path / "t.png")


def test_cli_writes_report_and_figures_and_fails_cleanly(tmp_path, capsys):
    for i, (k, m) in enumerate([(10, 40.0), (20, 45.5)]):
        d = tmp_path / "sweep" / str(i)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_run("voc20", "lposs_plus", m, k=k)))
    d = tmp_path / "sweep" / "mc"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_run("voc20", "maskclip", 30.0, per_image={"a": 1.0})))
    (tmp_path / "sweep" / "0" / "results.json").write_text(
        json.dumps(_run("voc20", "lposs_plus", 40.0, k=10, per_image={"a": 5.0})))
    out = tmp_path / "r" / "report.md"
    figs = str(tmp_path / "r" / "fig")
    assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--figures", figs]) == 0
    text = out.read_text()
    assert "![runs: mIoU vs lp.k](fig/runs_lp_k.png)" in text
    assert (tmp_path / "r" / "fig" / "per_image_voc20.png").read_bytes()[:8] == PNG
    assert report.main([]) == 2
    assert report.main([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{")
    assert report.main([str(tmp_path / "bad")]) == 2


@pytest.mark.slow
def test_three_point_multirun_gives_three_runs_and_a_three_row_report(tmp_path):
    from synthetic_data import make_dataset

    make_dataset(tmp_path / "data", "voc20", 2, (40, 56))
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "run.py", "-m", "task=evaluate", "dataset=voc20", f"data_root={tmp_path / 'data'}",
        "vm=tiny_random", "vlm=tiny_random", "device=cpu", "logger=none", "trainer.enable_progress_bar=false",
        "num_workers=0", "window.short_side=48", "window.long_side=96", "window.size=32", "window.stride=16",
        "method=lposs", "lp.k=2,4,8", "++cache.enabled=true", f"++cache.dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(sweep.rglob("results.json"))
    assert len(files) == 3
    assert len(list((tmp_path / "cache").glob("*/shard-*"))) == 1  # encoded by the first run only
    out = tmp_path / "report.md"
    assert report.main([str(sweep), "--out", str(out), "--figures", str(tmp_path / "fig")]) == 0
    table = out.read_text().split("mIoU (%)")[1]
    rows = [line for line in table.splitlines() if line.startswith("| LPOSS")]
    # tiny random-init models: every row is marked as such
    want = [f"LPOSS [lp.k={k}] (random init)" for k in (2, 4, 8)]
    assert [r.split("|")[1].strip() for r in rows] == want
    assert (tmp_path / "fig" / "runs_lp_k.png").read_bytes()[:8] == PNG


def _sweep_run(sigma, miou, ci=None, dataset="voc20", random_init=()):
    run = {"dataset": dataset, "method": "lposs_plus", "mIoU": miou, "config": {"lp": {"sigma": sigma}},
           "overrides": [f"lp.sigma={sigma}"], "random_init": list(random_init)}
    if ci is not None:
        run["mIoU_ci"], run["ci"] = ci, {"level": 0.9, "resamples": 100, "seed": 0}
    return run


def test_sweep_figure_plain_ticks_title_band_and_random_init():
    from matplotlib.collections import PolyCollection

    from lposs_lab.lab.figures import sweep_figure

    # a 1e-5 spread in mIoU: an axis offset would make it look like a trend
    runs = [_sweep_run(s, 40.0 + 1e-5 * i, ci=[39.0 + i, 41.0 + i]) for i, s in enumerate([0.001, 0.01, 0.1])]
    runs += [_sweep_run(s, 20.0 + i, dataset="ade20k", random_init=["vm=tiny_random"])
             for i, s in enumerate([0.001, 0.1])]
    fig = sweep_figure(runs, "lp.sigma")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # three decades
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1"]
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    assert all("e" not in t.get_text() for t in ax.get_yticklabels())
    title = ax.get_title()
    assert title.startswith("LPOSS+ on VOC20, ADE: mIoU vs lp.sigma") and "random init" in title
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["VOC20", "ADE (random init)"]
    assert [ln.get_linestyle() for ln in ax.get_lines()] == ["-", "--"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # only VOC20's runs carry intervals
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(39.0) and ys.max() == pytest.approx(43.0)
    assert "band: 90 % interval" in ax.get_ylabel()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_cells_with_intervals_and_marks():
    from lposs_lab.lab.tables import ci_cell

    assert ci_cell(42.14, [41.46, 42.71]) == "42.1 [41.5, 42.7]"
    assert ci_cell(42.14, [41.46, 42.71], "pm") == "42.1 ±0.6"
    assert ci_cell(42.14, None) == ci_cell(42.14, [41.0, 43.0], None) == "42.1"
    assert ci_cell(None, [1.0, 2.0]) == "-"
    runs = [{"dataset": "voc", "method": "lposs_plus", "mIoU": 60.0, "mIoU_ci": [59.0, 61.5]},
            {"dataset": "voc", "method": "maskclip", "mIoU": 50.0}]
    rows = _rows(results_table(runs, ci="pm", marks={("MaskCLIP", "voc"): " ≈"}).to_markdown())
    assert rows[0][:2] == ["LPOSS+", "60.0 ±1.2"] and rows[2][:2] == ["MaskCLIP", "50.0 ≈"]
    text = results_table(runs, all_datasets=False, ci="interval").to_text().splitlines()
    assert text[1].split()[:4] == ["LPOSS+", "60.0", "[59.0,", "61.5]"]
