"""`task=evaluate`: in-process on a composed config, and through run.py (DDP, kill/resume, multirun, W&B).

The in-process tests compose ``conf/`` outside a Hydra run, so they set ``paths.root_dir`` and
``paths.output_dir`` (``${hydra:...}`` does not resolve there). The run.py tests are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from scoring import np_boundary_miou, np_miou, np_pixel_accuracy, write_predictions
from synthetic_data import make_dataset

from lposs_lab import LPOSS, LPOSSConfig, WindowConfig
from lposs_lab.errors import ConfigError, OutputError
from lposs_lab.lab.data import DatasetError, SegmentationDataset
from lposs_lab.lab.records import StateStoreError
from lposs_lab.lab.sources import oracle_patch_labels
from lposs_lab.lab.tasks import TASKS, UserError
from lposs_lab.lab.tasks.evaluate import evaluate, plan_evaluation

TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=64", "num_workers=0"]
TINY_CONFIG = LPOSSConfig(  # what TINY means as the library's dataclasses
    vm="tiny_random", vlm="tiny_random", device="cpu", window=WindowConfig(short_side=64)
)
N = 12  # images of the run.py tests (even: two processes take N/2 each)
REPO = Path(__file__).resolve().parents[2]
SAME = ("mIoU", "boundary_iou", "pixel_accuracy", "per_class_iou", "per_class_boundary_iou", "num_images")


def compose_cfg(tmp_path: Path, *overrides: str):
    """The run config of ``overrides`` (no logger, no progress bar), every output under ``tmp_path``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.output_dir={tmp_path}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "num_workers=0",
                *overrides,
            ],
        )


def in_process(tmp_path: Path, *overrides: str):
    """Run evaluate() on a composed config; results.json and states/ land in ``tmp_path``."""
    return evaluate(compose_cfg(tmp_path, *overrides))


def run(cwd: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in ``cwd`` (Hydra's flags such as ``-m`` go first)."""
    flags = [a for a in args if a.startswith("-")]
    cmd = [sys.executable, str(REPO / "run.py"), *flags, *[a for a in args if a not in flags]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ in-process
def test_predictions_folder_scoring_equals_the_numpy_reference(tmp_path):
    root = make_dataset(tmp_path / "data", "context59", n_images=4)
    ds = SegmentationDataset("context59", root)
    preds = write_predictions(ds, tmp_path / "preds", seed=3)
    res = in_process(
        tmp_path, "dataset=context59", f"data_root={root}", f"predictions={tmp_path / 'preds'}",
        "metrics.boundary=true",
    )  # fmt: skip
    gts = [ds[i]["label"] for i in range(len(ds))]
    pred_list = [preds[k] for k in ds.ids]
    ref, _, union = np_miou(pred_list, gts, 59)
    assert res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert res["boundary_iou"] == pytest.approx(100 * np_boundary_miou(pred_list, gts, 59), abs=1e-9)
    assert res["pixel_accuracy"] == pytest.approx(100 * np_pixel_accuracy(pred_list, gts), abs=1e-9)
    for rec, p, g in zip(res["per_image"], pred_list, gts, strict=True):
        assert rec["mIoU"] == pytest.approx(100 * np_miou([p], [g], 59)[0], abs=1e-9)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == "predictions" and saved["dataset"] == "context59" and saved["num_images"] == 4
    assert list(saved["per_class_iou"])[:2] == ["aeroplane", "bag"] and saved["version"] == "0.1.0"
    assert [v is None for v in saved["per_class_iou"].values()] == (union == 0).tolist()
    assert saved["config"]["predictions"] == str(tmp_path / "preds")
    assert saved["state_dir"] == str(tmp_path / "states") and saved["random_init"] == []


def test_missing_prediction_file_is_named(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=3)
    ds = SegmentationDataset("voc20", root)
    write_predictions(ds, tmp_path / "preds")
    (tmp_path / "preds" / f"{ds.ids[1]}.png").unlink()
    with pytest.raises(UserError, match=f"prediction .*{ds.ids[1]}.png not found \\(1 of 3"):
        in_process(tmp_path, "dataset=voc20", f"data_root={root}", f"predictions={tmp_path / 'preds'}")
    assert not (tmp_path / "states").exists()  # refused before anything was written


def test_oracle_patch_numbers(tmp_path):
    root = make_dataset(tmp_path / "data", "ade20k", n_images=3, size=(48, 70))
    ds = SegmentationDataset("ade20k", root)
    res = in_process(tmp_path, "dataset=ade20k", f"data_root={root}", "method=oracle_patch",
                     "metrics.boundary=true")
    gts = [ds[i]["label"] for i in range(3)]
    oracle = [oracle_patch_labels(torch.from_numpy(g.astype(np.int64))).numpy() for g in gts]
    ref, _, _ = np_miou(oracle, gts, 150)
    assert res["method"] == "oracle_patch" and res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert res["boundary_iou"] == pytest.approx(100 * np_boundary_miou(oracle, gts, 150), abs=1e-9)
    assert 0 < res["mIoU"] < 100 and 0 < res["boundary_iou"] < res["mIoU"]


def test_saved_predictions_rescore_to_the_same_numbers_as_the_predictor(tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=3)
    a = in_process(tmp_path / "a", "dataset=voc", f"data_root={root}", *TINY, "method=lposs",
                   f"save_predictions={tmp_path / 'saved'}", "text_cache_dir=null")
    b = in_process(tmp_path / "b", "dataset=voc", f"data_root={root}", f"predictions={tmp_path / 'saved'}")
    assert a["mIoU"] == b["mIoU"] and a["per_class_iou"] == b["per_class_iou"] and a["num_images"] == 3
    assert a["label"].startswith("LPOSS") and b["label"] == "Predictions" and b["method"] == "predictions"
    assert a["random_init"] == ["vm=tiny_random", "vlm=tiny_random"]
    # the saved label maps are the predictor's (built from the same dataclasses, outside the lab)
    ds = SegmentationDataset("voc", root)
    model = LPOSS.from_config(TINY_CONFIG, method="lposs", text_cache_dir=None)
    model.set_classes(ds.info.classes)
    for i, key in enumerate(ds.ids):
        want = model.predict(ds[i]["image"]).labels.numpy()
        assert np.array_equal(np.asarray(Image.open(tmp_path / "saved" / f"{key}.png")), want), key


def test_resume_in_process_sums_earlier_states_and_refuses_mixing(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=5)
    ds = SegmentationDataset("voc20", root)
    write_predictions(ds, tmp_path / "preds", seed=7)
    args = ["dataset=voc20", f"data_root={root}", f"predictions={tmp_path / 'preds'}"]
    args += ["metrics.boundary=true"]
    full = in_process(tmp_path / "full", *args)
    part = in_process(tmp_path / "run", *args, "limit=2")
    assert part["num_images"] == 2
    with pytest.raises(StateStoreError, match="already holds 2 image state\\(s\\); pass resume=true"):
        in_process(tmp_path / "run", *args)
    with pytest.raises(StateStoreError, match="written with another config \\(differs in metrics\\)"):
        in_process(tmp_path / "run", *args[:-1], "resume=true")
    resumed = in_process(tmp_path / "run", *args, "resume=true")
    assert resumed["resumed"] == 2 and resumed["num_images"] == 5
    for key in SAME:
        assert resumed[key] == full[key], key
    again = in_process(tmp_path / "run", *args, "resume=true")  # nothing left: the states are summed
    assert again["resumed"] == 5 and again["mIoU"] == full["mIoU"]


def test_no_image_scored_is_a_user_error_and_results_still_list_why(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=2)
    ds = SegmentationDataset("voc20", root)
    for _, img, _ in ds.samples:
        img.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="no image of voc20 could be scored \\(2 error\\(s\\)"):
        in_process(tmp_path, "dataset=voc20", f"data_root={root}", "method=oracle_patch")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["num_images"] == 0 and [e["id"] for e in saved["errors"]] == ds.ids


def test_refusals_are_one_line_user_errors(tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=2)
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="d/VOCdevkit/VOC2012/JPEGImages not found; expected the MMSeg"):
        in_process(tmp_path, "dataset=voc", f"data_root={tmp_path / 'd'}")
    with pytest.raises(UserError, match="no data folder given: set paths.data_dir=DIR .*VOCdevkit"):
        in_process(tmp_path, "dataset=voc", "data_root=null")
    with pytest.raises(UserError, match="no dataset given: pass dataset=NAME, one of: voc, voc20"):
        in_process(tmp_path)
    with pytest.raises(ConfigError, match="limit=-1 is out of range"):
        in_process(tmp_path, "dataset=voc20", f"data_root={root}", "limit=-1")
    with pytest.raises(ConfigError, match="lp.k=0 is out of range; valid: an integer >= 1"):
        plan_evaluation(compose_cfg(tmp_path, "dataset=voc20", f"data_root={root}", "lp.k=0"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        in_process(tmp_path, "dataset=voc20", f"data_root={root}", f"state_dir={tmp_path / 'file' / 's'}",
                   "method=oracle_patch")
    with pytest.raises(UserError, match="trainer.strategy=fsdp is not supported .* auto, ddp_spawn"):
        in_process(tmp_path, "dataset=voc20", f"data_root={root}", "trainer.strategy=fsdp",
                   "trainer.devices=2", "method=oracle_patch")


# ------------------------------------------------------------------------------------------ run_task
def _buggy_task(cfg):
    raise KeyError("a bug, not the user's fault")


def _refusing_task(cfg):
    raise UserError("you asked for\nsomething impossible")


def test_run_task_a_bug_keeps_its_traceback_a_user_error_is_one_line(monkeypatch, capsys):
    from omegaconf import OmegaConf

    from lposs_lab.lab import tasks

    monkeypatch.delenv("LPOSS_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = OmegaConf.create({"task": "probe", "verbose": True})
    monkeypatch.setitem(tasks.TASKS, "probe", f"{__name__}:_buggy_task")
    with pytest.raises(KeyError, match="a bug"):  # not turned into a one-line error
        tasks.run_task(cfg)
    assert "error:" not in capsys.readouterr().err
    monkeypatch.setitem(tasks.TASKS, "probe", f"{__name__}:_refusing_task")
    with pytest.raises(SystemExit) as exc:
        tasks.run_task(cfg)
    assert exc.value.code == 2
    assert error_lines(capsys.readouterr().err) == ["error: you asked for something impossible"]
    monkeypatch.setenv("LPOSS_DEBUG", "1")  # debugging: the user error's traceback too
    with pytest.raises(UserError, match="impossible"):
        tasks.run_task(cfg)


@pytest.mark.slow
def test_run_py_a_bug_exits_1_with_a_traceback(tmp_path):
    """A task raising a non-UserError (here json.loads given the config: TypeError) through run.py."""
    script = (
        "import runpy, sys; "
        f"sys.argv = ['run.py', 'task=probe', 'hydra.run.dir={tmp_path / 'run'}']; "
        "from lposs_lab.lab import tasks; tasks.TASKS['probe'] = 'json:loads'; "
        f"runpy.run_path({str(REPO / 'run.py')!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LPOSS_DEBUG", "HYDRA_FULL_ERROR")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "TypeError" in proc.stderr and "error: " not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset=voc20", "image=x.jpg"], "both dataset= and image= given"),
        ([], "nothing to do: pass dataset=NAME to evaluate a benchmark"),
        (["task=train"], "unknown task 'train'; valid tasks: " + ", ".join(sorted(TASKS))),
    ],
    ids=["both", "neither", "unknown"],
)
def test_which_task_runs_is_one_line_when_unclear(tmp_path, capsys, monkeypatch, overrides, message):
    from lposs_lab.lab.tasks import run_task, task_name

    monkeypatch.setenv("PYTHONWARNINGS", os.environ.get("PYTHONWARNINGS", "default"))  # run_task sets it
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(SystemExit) as exc:
        run_task(cfg)
    assert exc.value.code == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    with pytest.raises(ConfigError):
        task_name(cfg)
    assert task_name(compose_cfg(tmp_path, "dataset=voc20")) == "evaluate"
    assert task_name(compose_cfg(tmp_path, "image=x.jpg")) == "segment"


# ------------------------------------------------------------------------------------------ through run.py
@pytest.fixture(scope="module")
def voc20(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), "voc20", n_images=N)


LPOSS_ARGS = [*TINY, "method=lposs", "metrics.boundary=true"]


@pytest.fixture(scope="module")
def baseline(voc20, tmp_path_factory):
    """One uninterrupted single-process run over the N images: the reference for DDP and resume."""
    d = tmp_path_factory.mktemp("base")
    res = run(d, "dataset=voc20", f"data_root={voc20}", *LPOSS_ARGS, f"hydra.run.dir={d / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads((d / "run" / "results.json").read_text()), d / "run"


def _csv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    return [dict(zip(head, ln.split(","), strict=True)) for ln in lines[1:]]


@pytest.mark.slow
def test_end_to_end_results_json_table_and_csv_logs(voc20, baseline):
    res, out, run_dir = baseline
    assert out["dataset"] == "voc20" and out["method"] == "lposs" and out["num_images"] == N
    assert out["errors"] == [] and out["processes"] == 1 and out["version"] == "0.1.0"
    assert len(out["per_class_iou"]) == 20 and out["config"]["lp"]["k"] == 400
    # the numbers are the predictor's, scored by numpy
    ds = SegmentationDataset("voc20", voc20)
    model = LPOSS.from_config(TINY_CONFIG, method="lposs", text_cache_dir=None)
    model.set_classes(ds.info.classes)
    samples = [ds[i] for i in range(len(ds))]
    preds = [model.predict(s["image"]).labels.numpy() for s in samples]
    gts = [s["label"] for s in samples]
    assert out["mIoU"] == pytest.approx(100 * np_miou(preds, gts, 20)[0], abs=1e-9)
    assert out["boundary_iou"] == pytest.approx(100 * np_boundary_miou(preds, gts, 20), abs=1e-9)
    # the printed table
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("LPOSS [")]
    assert len(table) == 2
    for row, key in zip(table, ("mIoU", "boundary_iou"), strict=True):  # "score [low, high]   -   -"
        cells = row.rsplit("(random init)", 1)[1].split()
        low, high = out[f"{key}_ci"]
        assert cells[:3] == [f"{out[key]:.1f}", f"[{low:.1f},", f"{high:.1f}]"], row
    assert "mIoU (%)" in res.stdout and "Boundary IoU (%)" in res.stdout and "VOC20" in res.stdout
    assert "img/s" in res.stderr + res.stdout  # the progress bar counts images
    # the CSV logger: metrics, hparams, and the evaluation report's per-class / per-image tables
    log = run_dir / "csv" / "version_0"
    last = _csv(log / "metrics.csv")[-1]
    assert float(last["test/mIoU"]) == pytest.approx(out["mIoU"], abs=1e-4)
    assert float(last["test/num_images"]) == N
    hp = (log / "hparams.yaml").read_text()
    assert "lposs_lab_version: 0.1.0" in hp and "voc20" in hp
    per_class = _csv(log / "per_class.csv")
    assert [r["class"] for r in per_class] == list(out["per_class_iou"])
    for r in per_class:
        want = out["per_class_iou"][r["class"]]
        assert (r["IoU"] == "") if want is None else float(r["IoU"]) == pytest.approx(want)
    per_image = _csv(log / "per_image.csv")
    assert [r["id"] for r in per_image] == ds.ids
    assert [float(r["mIoU"]) for r in per_image] == pytest.approx([p["mIoU"] for p in out["per_image"]])


def assert_two_processes_equal_one(run_dir: Path, base: dict) -> None:
    """A 2-process run's numbers equal the 1-process baseline, its images sharded without duplicates."""
    out = json.loads((run_dir / "results.json").read_text())
    assert out["processes"] == 2
    for key in SAME:
        assert out[key] == base[key], key
    ranks = [json.loads(p.read_text())["rank"] for p in (run_dir / "states").glob("*.state.json")]
    assert sorted(ranks) == [0] * (N // 2) + [1] * (N // 2)  # sharded, no duplicates


@pytest.mark.slow
def test_two_cpu_processes_equal_one(voc20, baseline, tmp_path):
    _, base, _ = baseline
    res = run(tmp_path, "dataset=voc20", f"data_root={voc20}", *LPOSS_ARGS, "trainer.devices=2",
              f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_two_processes_equal_one(tmp_path / "run", base)
    last = _csv(tmp_path / "run" / "csv" / "version_0" / "metrics.csv")[-1]
    assert float(last["test/num_images"]) == N  # torchmetrics summed both processes once
    assert float(last["test/mIoU"]) == pytest.approx(base["mIoU"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_ddp_strategy_external_and_relaunch_equal_one(voc20, baseline, tmp_path, launcher):
    """``trainer.strategy=ddp``: every rank runs run.py (started by torchrun, as on SLURM or several nodes,
    or re-launched by Lightning); rank 0 alone writes results, identical to one process."""
    _, base, _ = baseline
    args = [
        "dataset=voc20", f"data_root={voc20}", *LPOSS_ARGS, "trainer.strategy=ddp", "trainer.devices=2",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [str(REPO / "run.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "run.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_two_processes_equal_one(tmp_path / "run", base)
    assert res.stdout.count("image(s) scored") == 1  # only rank 0 reports


@pytest.mark.slow
def test_launched_processes_need_a_shared_run_dir(voc20, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    res = run(tmp_path, "dataset=voc20", f"data_root={voc20}", *TINY, env=env, timeout=300)
    assert res.returncode == 2
    err = error_lines(res.stderr)
    assert len(err) == 1 and "one of 2 launched processes" in err[0] and "hydra.run.dir=DIR" in err[0]
    assert "Traceback" not in res.stderr


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/<n>/stat)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_killed_run_resumes_to_identical_numbers(voc20, baseline, tmp_path):
    _, base, _ = baseline
    run_dir = tmp_path / "run"
    states = run_dir / "states"
    # two DataLoader workers: they must die with the killed run instead of lingering
    args = ["dataset=voc20", f"data_root={voc20}", *LPOSS_ARGS, "num_workers=2", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        k = 4
        deadline = time.monotonic() + 300
        while len(list(states.glob("*.state.json"))) < k:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no states written"
            time.sleep(0.02)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = len(list(states.glob("*.state.json")))
    assert k <= done < N and not (run_dir / "results.json").exists()
    assert workers, "the run had no DataLoader worker processes"
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "DataLoader workers outlived the killed run"
    # same overrides plus resume=true in the same folder: only the rest is evaluated, same numbers
    resumed = run(tmp_path, *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads((run_dir / "results.json").read_text())
    assert out["resumed"] == done and out["num_images"] == N
    for key in SAME:
        assert out[key] == base[key], key
    # without resume=true the states are not mixed in (one line, exit 2)
    refused = run(tmp_path, *args)
    err = error_lines(refused.stderr)
    assert refused.returncode == 2 and len(err) == 1, refused.stderr
    assert f"already holds {N} image state(s); pass resume=true" in err[0]


@pytest.mark.slow
def test_missing_data_root_exits_2_with_one_line(tmp_path):
    res = run(tmp_path, "dataset=voc", f"data_root={tmp_path / 'nowhere'}", *TINY,
              f"hydra.run.dir={tmp_path / 'run'}")
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: data root") and "nowhere" in lines[0]
    assert "VOCdevkit/VOC2012" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["dataset=voc20", "image=x.jpg"], "both dataset= and image= given"),
    ([], "nothing to do: pass dataset=NAME"),
], ids=["both", "neither"])  # fmt: skip
def test_run_py_without_a_clear_task_is_one_line(tmp_path, args, message):
    res = run(tmp_path, *args, f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


# the design card's command, `python run.py dataset=ade20k vm=dino_b8 lp.k=800`, with tiny random models
# (and small images, so that it runs in seconds): no task=, the data found under paths.data_dir
DESIGN_CARD = ["dataset=ade20k", "vm=tiny_random", "vlm=tiny_random", "lp.k=800"]
DESIGN_SMALL = ["window.short_side=48", "window.long_side=96", "num_workers=0"]


@pytest.fixture(scope="module")
def design_card_reference(tmp_path_factory):
    """A synthetic ADE20k and the label maps LPOSS+ (built from the dataclasses) gives for it."""
    data = make_dataset(tmp_path_factory.mktemp("ade") / "data", "ade20k", n_images=3, size=(48, 70))
    ds = SegmentationDataset("ade20k", data)
    config = LPOSSConfig.from_dict({"vm": "tiny_random", "vlm": "tiny_random", "device": "cpu",
                                    "lp": {"k": 800}, "window": {"short_side": 48, "long_side": 96}})
    model = LPOSS.from_config(config, text_cache_dir=None)
    assert model.method == "lposs_plus"
    model.set_classes(ds.info.classes)
    samples = [ds[i] for i in range(len(ds))]
    preds = {s["id"]: model.predict(s["image"]).labels.numpy() for s in samples}
    return data, ds, preds, [s["label"] for s in samples]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["LPOSS_DATA_DIR", "cwd/data"])
def test_design_card_command_finds_the_data_and_scores_it(design_card_reference, tmp_path, where):
    data, ds, preds, gts = design_card_reference
    env = {k: v for k, v in os.environ.items() if k != "LPOSS_DATA_DIR"}
    cwd = tmp_path / "work"
    cwd.mkdir()
    if where == "LPOSS_DATA_DIR":
        env["LPOSS_DATA_DIR"] = str(data)
    else:
        shutil.copytree(data, cwd / "data")
    saved = tmp_path / "saved"
    res = run(cwd, *DESIGN_CARD, *DESIGN_SMALL, f"save_predictions={saved}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out_files = list(cwd.glob("outputs/*/*/results.json"))  # Hydra's default run folder under the cwd
    assert len(out_files) == 1, list(cwd.rglob("results.json"))
    out = json.loads(out_files[0].read_text())
    want_root = data if where == "LPOSS_DATA_DIR" else cwd / "data"
    assert out["config"]["data_root"] == str(want_root)
    assert out["dataset"] == "ade20k" and out["method"] == "lposs_plus" and out["num_images"] == 3
    assert out["config"]["lp"]["k"] == 800 and out["errors"] == []
    for key in ds.ids:  # the run's label maps are the predictor's
        assert np.array_equal(np.asarray(Image.open(saved / f"{key}.png")), preds[key]), key
    pred_list = [preds[k] for k in ds.ids]
    assert out["mIoU"] == pytest.approx(100 * np_miou(pred_list, gts, 150)[0], abs=1e-9)
    assert out["pixel_accuracy"] == pytest.approx(100 * np_pixel_accuracy(pred_list, gts), abs=1e-9)
    assert "ade20k: 3 image(s) scored" in res.stdout


@pytest.mark.slow
def test_multirun_with_csv_and_offline_wandb_and_a_corrupt_image(tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=3)
    ds = SegmentationDataset("voc", root)
    bad = ds.samples[2][1]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["NETRC"] = str(tmp_path / "no_netrc")  # no credentials: W&B logs offline and says so
    res = run(
        tmp_path, "-m", "dataset=voc", f"data_root={root}", *TINY, "method=lposs", "lp.k=20,40",
        "logger=[csv,wandb]", "logger.wandb.log_images=2", "tags=[t1]", "+report.experiment=g1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no W&B credentials (wandb login / WANDB_API_KEY): logging offline" in res.stdout
    assert res.stdout.count("no W&B credentials") == 2  # said for each sweep point, not only the first
    assert "anonymous" not in res.stdout + res.stderr  # no third-party deprecation noise
    for job, k in (("0", 20), ("1", 40)):
        folder = tmp_path / "sweep" / job
        out = json.loads((folder / "results.json").read_text())
        assert out["config"]["lp"]["k"] == k and f"lp.k={k}" in out["label"]
        assert out["num_images"] == 2 and [e["id"] for e in out["errors"]] == [ds.ids[2]]
        # CSV: one row per class and per scored image, the numbers of results.json
        per_class = _csv(folder / "csv" / "version_0" / "per_class.csv")
        assert [r["class"] for r in per_class] == list(out["per_class_iou"]) and len(per_class) == 21
        per_image = _csv(folder / "csv" / "version_0" / "per_image.csv")
        assert [r["id"] for r in per_image] == ds.ids[:2]
        # W&B offline run: config, tags, group, metrics in the log; tables and mask images as media
        runs = list((folder / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, "no (or more than one) offline W&B run written"
        assert f"note: W&B run written offline to {runs[0].resolve()}; upload it with" in res.stdout
        log = next(runs[0].glob("*.wandb")).read_bytes()
        for needle in (b"lposs_lab_version", b'"0.1.0"', f'"k":{k},'.encode(), b"test/mIoU", b"g1", b"t1"):
            assert needle in log, needle
        media = runs[0] / "files" / "media"
        (class_table,) = media.glob("table/per_class_iou_*.table.json")
        table = json.loads(class_table.read_text())
        assert table["columns"] == ["class", "IoU"]
        assert {row[0]: row[1] for row in table["data"]} == out["per_class_iou"]
        (image_table,) = media.glob("table/per_image_*.table.json")
        rows = json.loads(image_table.read_text())["data"]
        assert [r[0] for r in rows] == ds.ids[:2]
        assert [r[1] for r in rows] == pytest.approx([p["mIoU"] for p in out["per_image"]])
        samples = sorted(media.glob("images/samples_*.png"))
        masks = sorted(media.glob("images/mask/samples_*.mask.png"))
        assert len(samples) == 2 and len(masks) == 4  # prediction and ground truth of each sample
        assert Image.open(samples[0]).size == (56, 40)
    assert res.stdout.count("could not be evaluated") == 2 and ds.ids[2] in res.stdout
