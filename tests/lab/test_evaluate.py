"""`task=evaluate`: in-process via the Hydra config, and end to end through run.py (DDP, resume, multirun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from synthetic_data import make_dataset
from test_lightning import np_miou, write_predictions

from lposs_lab.lab.data.benchmarks import DatasetError, SegmentationDataset
from lposs_lab.lab.module import oracle_patch_labels
from lposs_lab.lab.metrics import BoundaryIoU
from lposs_lab.lab.records import StateStoreError
from lposs_lab.lab.tasks import UserError
from lposs_lab.lab.tasks.evaluate import evaluate, make_logger

TINY = ["vm=tiny_random", "vlm=tiny_random", "device=cpu", "window.short_side=64", "num_workers=0"]
N = 20
REPO = Path(__file__).resolve().parents[2]


def in_process(repo, tmp_path, *overrides):
    """Run evaluate() on a composed config (no Hydra run dir: every output path is given)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(repo / "conf")):
        cfg = compose(
            "config",
            overrides=[
                "task=evaluate",
                "logger=none",
                f"out={tmp_path}",
                f"results_json={tmp_path / 'results.json'}",
                f"state_dir={tmp_path / 'states'}",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    return evaluate(cfg)


def run(repo, cwd, *args, timeout=600):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags (-m) go before the overrides
    cmd = [
        sys.executable,
        str(repo / "run.py"),
        *flags,
        "task=evaluate",
        *[a for a in args if a not in flags],
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


# ------------------------------------------------------------------------------------------ in-process
def test_predictions_folder_scoring_equals_hand_computed(repo_root, tmp_path):
    root = make_dataset(tmp_path / "data", "context59", n_images=4)
    ds = SegmentationDataset("context59", root)
    preds = write_predictions(ds, tmp_path / "preds", seed=3)
    res = in_process(
        repo_root,
        tmp_path,
        "dataset=context59",
        f"data_root={root}",
        f"predictions={tmp_path / 'preds'}",
        "metrics.boundary=true",
    )
    gts = [ds[i]["label"] for i in range(len(ds))]
    ref, _, _ = np_miou([preds[k] for k in ds.ids], gts, 59)
    assert res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    b = BoundaryIoU(59)
    for k, g in zip(ds.ids, gts, strict=True):
        b.update(torch.from_numpy(preds[k].astype(np.int64)), torch.from_numpy(g.astype(np.int64)))
    assert res["boundary_iou"] == pytest.approx(100 * float(b.compute()["mBIoU"]), abs=1e-9)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["method"] == "predictions" and saved["dataset"] == "context59" and saved["num_images"] == 4
    assert list(saved["per_class_iou"])[:2] == ["aeroplane", "bag"] and saved["version"] == "0.1.0"
    assert saved["config"]["predictions"] == str(tmp_path / "preds")


def test_missing_prediction_file_is_named(repo_root, tmp_path):
    root = make_dataset(tmp_path / "data", "voc20", n_images=3)
    ds = SegmentationDataset("voc20", root)
    write_predictions(ds, tmp_path / "preds")
    (tmp_path / "preds" / f"{ds.ids[1]}.png").unlink()
    with pytest.raises(UserError, match=f"prediction .*{ds.ids[1]}.png not found \\(1 of 3"):
        in_process(
            repo_root, tmp_path, "dataset=voc20", f"data_root={root}", f"predictions={tmp_path / 'preds'}"
        )


def test_oracle_patch_numbers(repo_root, tmp_path):
    root = make_dataset(tmp_path / "data", "ade20k", n_images=3, size=(48, 70))
    ds = SegmentationDataset("ade20k", root)
    res = in_process(
        repo_root,
        tmp_path,
        "dataset=ade20k",
        f"data_root={root}",
        "method=oracle_patch",
        "metrics.boundary=true",
    )
    gts = [ds[i]["label"] for i in range(3)]
    oracle = [oracle_patch_labels(torch.from_numpy(g.astype(np.int64))).numpy() for g in gts]
    ref, _, _ = np_miou(oracle, gts, 150)
    assert res["method"] == "oracle_patch" and res["mIoU"] == pytest.approx(100 * ref, abs=1e-9)
    assert 0 < res["mIoU"] < 100 and 0 < res["boundary_iou"] < res["mIoU"]


def test_saved_predictions_rescore_to_the_same_numbers(repo_root, tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=3)
    a = in_process(
        repo_root,
        tmp_path / "a",
        "dataset=voc",
        f"data_root={root}",
        *TINY,
        "method=lposs",
        f"save_predictions={tmp_path / 'saved'}",
    )
    b = in_process(
        repo_root, tmp_path / "b", "dataset=voc", f"data_root={root}", f"predictions={tmp_path / 'saved'}"
    )
    assert a["mIoU"] == b["mIoU"] and a["per_class_iou"] == b["per_class_iou"] and a["num_images"] == 3
    assert a["label"] == "LPOSS" and b["label"] == "Predictions" and b["method"] == "predictions"


# ------------------------------------------------------------------------------------------ through run.py
@pytest.fixture(scope="module")
def voc20(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), "voc20", n_images=N)


@pytest.fixture(scope="module")
def baseline(voc20, tmp_path_factory):
    """One uninterrupted single-process run over the N images: the reference for DDP and resume."""
    d = tmp_path_factory.mktemp("base")
    res = run(
        REPO,
        d,
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        "method=lposs",
        "metrics.boundary=true",
        f"hydra.run.dir={d / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads((d / "run" / "results.json").read_text()), d / "run"


SAME = ("mIoU", "boundary_iou", "pixel_accuracy", "per_class_iou", "per_class_boundary_iou", "num_images")


def test_end_to_end_results_json_table_and_csv_log(baseline):
    res, out, run_dir = baseline
    assert out["dataset"] == "voc20" and out["method"] == "lposs" and out["num_images"] == N
    assert 0 <= out["mIoU"] <= 100 and 0 <= out["boundary_iou"] <= 100 and out["errors"] == []
    assert len(out["per_class_iou"]) == 20 and out["version"] == "0.1.0" and out["config"]["lp"]["k"] == 400
    assert len(out["per_image"]) == N and out["processes"] == 1
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("LPOSS [")]
    assert len(table) == 2 and table[0].split()[-1] == f"{out['mIoU']:.1f}"
    assert "mIoU (%)" in res.stdout and "Boundary IoU (%)" in res.stdout and "VOC20" in res.stdout
    assert "img/s" in res.stderr + res.stdout  # the progress bar counts images
    csv = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    head = csv[0].split(",")
    last = dict(zip(head, csv[-1].split(","), strict=True))
    assert float(last["test/mIoU"]) == pytest.approx(out["mIoU"], abs=1e-4)
    assert float(last["test/num_images"]) == N
    hp = (run_dir / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "lposs_lab_version: 0.1.0" in hp and "voc20" in hp


def test_two_cpu_processes_equal_one(repo_root, voc20, baseline, tmp_path):
    _, base, _ = baseline
    res = run(
        repo_root,
        tmp_path,
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        "method=lposs",
        "metrics.boundary=true",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["processes"] == 2
    for key in SAME:
        assert out[key] == base[key], key
    ranks = [json.loads(p.read_text())["rank"] for p in (tmp_path / "run" / "states").glob("*.state.json")]
    assert sorted(ranks) == [0] * (N // 2) + [1] * (N // 2)  # sharded, no duplicates
    csv = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    last = dict(zip(csv[0].split(","), csv[-1].split(","), strict=True))
    assert float(last["test/num_images"]) == N  # torchmetrics summed both processes once
    assert float(last["test/mIoU"]) == pytest.approx(base["mIoU"], abs=1e-4)


@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_ddp_strategy_external_and_relaunch_equal_one(repo_root, voc20, baseline, tmp_path, launcher):
    """``trainer.strategy=ddp``: every rank runs run.py (started by torchrun, as on SLURM or several nodes,
    or re-launched by Lightning); rank 0 alone writes results, identical to one process."""
    _, base, _ = baseline
    args = [
        "task=evaluate",
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        "method=lposs",
        "metrics.boundary=true",
        "trainer.strategy=ddp",
        "trainer.devices=2",  # processes per node, as Lightning expects
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [str(repo_root / "run.py"), *args]
    else:
        cmd = [sys.executable, str(repo_root / "run.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["processes"] == 2
    for key in SAME:
        assert out[key] == base[key], key
    ranks = [json.loads(p.read_text())["rank"] for p in (tmp_path / "run" / "states").glob("*.state.json")]
    assert sorted(ranks) == [0] * (N // 2) + [1] * (N // 2)
    assert res.stdout.count("image(s) scored") == 1  # only rank 0 reports


def test_launched_processes_need_a_shared_run_dir(repo_root, voc20, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    cmd = [sys.executable, str(repo_root / "run.py"), "task=evaluate", "dataset=voc20", f"data_root={voc20}"]
    cmd += TINY
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "one of 2 launched processes" in err[0] and "hydra.run.dir=DIR" in err[0]
    assert "Traceback" not in res.stderr


def test_killed_run_resumes_to_identical_numbers(repo_root, voc20, baseline, tmp_path):
    _, base, _ = baseline
    args = [
        "dataset=voc20",
        f"data_root={voc20}",
        *TINY,
        "method=lposs",
        "metrics.boundary=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    killed = run(repo_root, tmp_path, *args, "debug_stop_after=7")
    assert killed.returncode == 3 and not (tmp_path / "run" / "results.json").exists()
    assert len(list((tmp_path / "run" / "states").glob("*.state.json"))) == 7
    # (in-process, same config) without resume=true the states are not mixed in; another config cannot resume
    same = [a for a in args if not a.startswith("hydra.")] + [f"state_dir={tmp_path / 'run' / 'states'}"]
    with pytest.raises(StateStoreError, match="already holds 7 image state\\(s\\); pass resume=true"):
        in_process(repo_root, tmp_path / "x", *same)
    with pytest.raises(StateStoreError, match="written with another config \\(differs in lp\\)"):
        in_process(repo_root, tmp_path / "x", *same, "resume=true", "lp.k=50")
    resumed = run(repo_root, tmp_path, *args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["resumed"] == 7
    for key in SAME:
        assert out[key] == base[key], key


def test_missing_data_root_exits_2_with_one_line(repo_root, tmp_path):
    res = run(
        repo_root,
        tmp_path,
        "dataset=voc",
        f"data_root={tmp_path / 'nowhere'}",
        *TINY,
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert (
        lines[0].startswith("error: data root") and "nowhere" in lines[0] and "VOCdevkit/VOC2012" in lines[0]
    )
    (tmp_path / "d").mkdir()  # the rest in-process: same code path, no interpreter start-up
    with pytest.raises(DatasetError, match="d/VOCdevkit/VOC2012/JPEGImages not found; expected the MMSeg"):
        in_process(repo_root, tmp_path, "dataset=voc", f"data_root={tmp_path / 'd'}")
    with pytest.raises(
        UserError, match="no data_root given: pass data_root=DIR, the folder holding VOCdevkit"
    ):
        in_process(repo_root, tmp_path, "dataset=voc")
    with pytest.raises(UserError, match="no dataset given: pass dataset=NAME, one of: voc, voc20"):
        in_process(repo_root, tmp_path)


def test_multirun_with_wandb_offline_and_a_corrupt_image(repo_root, tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=3)
    ds = SegmentationDataset("voc", root)
    bad = ds.samples[2][1]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    res = run(
        repo_root,
        tmp_path,
        "-m",
        "dataset=voc",
        f"data_root={root}",
        *TINY,
        "method=lposs",
        "lp.k=20,40",
        "logger=wandb",
        "logger.offline=true",
        "logger.group=g1",
        "logger.tags=[t1]",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for job, k in (("0", 20), ("1", 40)):
        out = json.loads((tmp_path / "sweep" / job / "results.json").read_text())
        assert out["config"]["lp"]["k"] == k and out["label"].endswith(f"lp.k={k}]")
        assert out["num_images"] == 2 and [e["id"] for e in out["errors"]] == [ds.ids[2]]
        runs = list((tmp_path / "sweep" / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline W&B run written"
        # the run's log holds the resolved config, the package version, group/tags and the logged metrics
        log = next(runs[0].glob("*.wandb")).read_bytes()
        for needle in (b"lposs_lab_version", b'"0.1.0"', f'"k":{k},'.encode(), b"test/mIoU", b"g1", b"t1"):
            assert needle in log, needle
    assert res.stdout.count("could not be evaluated") == 2 and ds.ids[2] in res.stdout


def test_refusals_are_one_line_user_errors(repo_root, tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", "voc20", n_images=2)
    with pytest.raises(UserError, match="trainer.strategy=fsdp is not supported .* auto, ddp_spawn"):
        in_process(
            repo_root,
            tmp_path,
            "dataset=voc20",
            f"data_root={root}",
            "trainer.strategy=fsdp",
            "trainer.devices=2",
            "method=oracle_patch",
        )
    # W&B online without credentials fails fast instead of prompting
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(UserError, match="logger=wandb needs W&B credentials .* logger.offline=true"):
        make_logger({"name": "wandb", "offline": False}, tmp_path)
    with pytest.raises(UserError, match="unknown logger 'tensorboard'; valid: csv, wandb, none"):
        make_logger({"name": "tensorboard"}, tmp_path)
    assert make_logger({"name": "none"}, tmp_path) is False
