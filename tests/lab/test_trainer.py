"""Loggers, callbacks and the Trainer of `task=evaluate`, built by hydra.utils.instantiate from conf/."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lposs_lab.errors import ConfigError
from lposs_lab.lab.callbacks import EvaluationReport, FeatureCacheTally, ImageProgressBar, ShareCPUThreads
from lposs_lab.lab.tasks.trainer import build_callbacks, build_loggers, build_trainer, finish_loggers

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(
            "config",
            overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}", *overrides],
        )


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_csv_and_wandb_at_once_offline_without_credentials(tmp_path, no_wandb_credentials, capsys):
    import os

    loggers, options = build_loggers(_cfg(tmp_path, "logger=[csv,wandb]", "logger.wandb.log_images=3"))
    try:
        assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
        csv, wb = loggers
        assert Path(csv.save_dir) == tmp_path and csv.name == "csv"
        assert options == {"csv": {}, "wandb": {"log_images": 3}}  # ours, not passed to WandbLogger
        out = capsys.readouterr().out
        assert out.count("no W&B credentials") == 1 and "logging offline" in out
        assert os.environ["WANDB_MODE"] == "offline" and wb._offline
        callbacks = build_callbacks(_cfg(tmp_path, "logger=[csv,wandb]"), options)
        report = [c for c in callbacks if isinstance(c, EvaluationReport)]
        assert len(report) == 1 and report[0].log_images == 3
    finally:
        finish_loggers(loggers)


@pytest.mark.parametrize(
    ("choice", "types"),
    [("csv", [CSVLogger]), ("none", []), ("tensorboard", [TensorBoardLogger])],
)
def test_each_logger_choice(tmp_path, choice, types):
    if choice == "tensorboard":
        pytest.importorskip("tensorboard", reason="TensorBoardLogger needs tensorboard or tensorboardX")
    loggers, options = build_loggers(_cfg(tmp_path, f"logger={choice}"))
    assert [type(lg) for lg in loggers] == types
    assert options == ({choice: {}} if types else {})


def test_a_logger_entry_without_target_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logger.x is not a logger config \\(no _target_\\)"):
        build_loggers(_cfg(tmp_path, "logger=csv", "+logger.x.save_dir=y"))


def test_callbacks_from_conf_and_nulled_ones_left_out(tmp_path):
    kinds = [type(c) for c in build_callbacks(_cfg(tmp_path))]
    assert kinds == [ImageProgressBar, ShareCPUThreads, FeatureCacheTally, EvaluationReport]
    kinds = [type(c) for c in build_callbacks(_cfg(tmp_path, "callbacks.cpu_threads=null"))]
    assert kinds == [ImageProgressBar, FeatureCacheTally, EvaluationReport]
    kinds = [type(c) for c in build_callbacks(_cfg(tmp_path, "trainer.enable_progress_bar=false"))]
    assert kinds == [ShareCPUThreads, FeatureCacheTally, EvaluationReport]


def test_the_progress_bar_is_named_after_the_task_and_dataset(tmp_path):
    [bar] = [c for c in build_callbacks(_cfg(tmp_path, "dataset=voc20")) if isinstance(c, ImageProgressBar)]
    assert bar.description == "evaluate voc20" and bar.test_description == "evaluate voc20"
    named = _cfg(tmp_path, "dataset=voc20", "+callbacks.progress_bar.description=mine")
    [own] = [c for c in build_callbacks(named) if isinstance(c, ImageProgressBar)]
    assert own.description == "mine"


def test_offline_wandb_says_which_folder_the_run_went_to(tmp_path, no_wandb_credentials, capsys):
    loggers, _ = build_loggers(_cfg(tmp_path, "logger=wandb"))
    [wb] = loggers
    assert f"logging offline under {tmp_path.resolve() / 'wandb'}" in capsys.readouterr().out
    try:
        wb.experiment.log({"x": 1.0})  # starts the offline run
    finally:
        finish_loggers(loggers)
    [folder] = [p.resolve() for p in (tmp_path / "wandb").glob("offline-run-*")]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "W&B run written offline" in ln]
    assert lines == [f"note: W&B run written offline to {folder}; upload it with `wandb sync {folder}`"]


def test_trainer_spawns_for_several_devices_and_follows_device(tmp_path, capsys):
    cfg = _cfg(tmp_path, "device=cpu", "trainer.devices=2")
    trainer = build_trainer(cfg, loggers=[], callbacks=[], todo=10)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.strategy._start_method == "spawn"
    assert trainer.num_devices == 2 and trainer.strategy.root_device.type == "cpu"
    one = build_trainer(_cfg(tmp_path, "device=cpu"), loggers=[], callbacks=[], todo=10)
    assert one.num_devices == 1 and type(one.strategy).__name__ == "SingleDeviceStrategy"
    assert one.logger is None and not one.checkpoint_callback  # no logger, no checkpoints
    # fewer images left than processes: one process per image
    few = build_trainer(_cfg(tmp_path, "device=cpu", "trainer.devices=4"), loggers=[], callbacks=[], todo=3)
    assert few.num_devices == 3
    assert "3 image(s) left, using 3 process(es) instead of 4" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp is not supported"):
        build_trainer(_cfg(tmp_path, "trainer.strategy=fsdp"), loggers=[], callbacks=[], todo=1)


def test_evaluation_report_writes_the_tables_from_what_it_was_given(tmp_path):
    # built with the store, ids, classes and dataset it reports on: it reads nothing from the module
    import csv as csvlib
    from types import SimpleNamespace

    import torch

    from lposs_lab.lab.metrics import SegmentationIoU
    from lposs_lab.lab.records import StateStore, image_record

    store = StateStore(tmp_path / "states")
    metric = SegmentationIoU(2)
    target = torch.tensor([[0, 0], [1, 1]])
    preds = {"a": torch.tensor([[0, 0], [1, 1]]), "b": torch.tensor([[0, 1], [1, 1]])}
    for key, pred in preds.items():
        store.write(image_record(key, iou=metric.counts(pred, target), miou=0.5, seconds=0.25))
    logger = CSVLogger(str(tmp_path), name="csv")
    report = EvaluationReport(store, ["a", "b"], ["sky", "road;street"], dataset="voc20")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    report.on_test_end(trainer, None)
    with open(Path(logger.log_dir) / "per_class.csv") as fh:
        rows = list(csvlib.reader(fh))
    # over both images sky has TP 3, FN 1 -> IoU 3/4; road TP 4, FP 1 -> 4/5
    assert rows[0] == ["class", "IoU"] and [r[0] for r in rows[1:]] == ["sky", "road"]
    assert float(rows[1][1]) == pytest.approx(75.0) and float(rows[2][1]) == pytest.approx(80.0)
    with open(Path(logger.log_dir) / "per_image.csv") as fh:
        assert [r[0] for r in list(csvlib.reader(fh))[1:]] == ["a", "b"]
    # without a store (a trainer built outside a run) it writes nothing
    empty = tmp_path / "empty"
    bare = SimpleNamespace(is_global_zero=True, loggers=[CSVLogger(str(empty))])
    EvaluationReport().on_test_end(bare, None)
    assert not list(empty.rglob("*.csv"))


def test_offline_wandb_run_of_a_worker_process_is_named_by_its_folder(tmp_path, no_wandb_credentials, capsys):
    # with several processes rank 0's worker held the W&B run: this process finds the newest folder it left
    import wandb

    loggers, _ = build_loggers(_cfg(tmp_path, "logger=wandb"))
    assert wandb.run is None
    older = tmp_path / "wandb" / "offline-run-20261201_101010-aaaaaaaa"
    newer = tmp_path / "wandb" / "offline-run-20261202_090909-bbbbbbbb"
    for folder in (newer, older):
        folder.mkdir(parents=True)
    capsys.readouterr()
    finish_loggers(loggers)
    where = newer.resolve()
    note = f"note: W&B run written offline to {where}; upload it with `wandb sync {where}`\n"
    assert capsys.readouterr().out == note
    finish_loggers([])  # no W&B logger: nothing to say
    assert capsys.readouterr().out == ""
