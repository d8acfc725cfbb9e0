"""Lightning callbacks of the evaluation loop (``conf/callbacks``, built with ``hydra.utils.instantiate``)."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, convert_inf

from lposs_lab.files import atomic_write

from .metrics import DILATION_RATIO
from .records import StateStore, class_display_names, summarize
from .stats import CIConfig, results_intervals

__all__ = [
    "ImageProgressBar",
    "FeatureCacheTally",
    "ShareCPUThreads",
    "EvaluationReport",
    "write_logger_tables",
]


class ImageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counting images: ``img/s`` and the ETA of the test loop, named after the run.

    Args:
        description: the bar's name, e.g. ``"evaluate voc20"`` (the tasks set it from the task and dataset).
        **kwargs: Lightning's ``TQDMProgressBar`` arguments (``refresh_rate``, ``process_position``...).
    """

    def __init__(self, description: str = "evaluate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = str(description)

    @property
    def test_description(self) -> str:
        return self.description

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.description,
            unit="img",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.BAR_FORMAT,
        )

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # Lightning's would rename the bar "<description> DataLoader <i>"; the lab's runs have one loader
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.test_progress_bar
        bar.reset(total=convert_inf(self.total_test_batches_current_dataloader))
        bar.initial = 0
        bar.set_description(self.description)


class FeatureCacheTally(pl.Callback):
    """How many of the run's images came from the feature cache: ``cache/hits`` and ``cache/images``.

    Summed over processes into ``trainer.callback_metrics`` (not sent to the loggers) at the end of the test
    epoch; nothing is logged when the label source has no feature cache (``cache.enabled=false``).
    """

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        predictor = getattr(getattr(pl_module, "source", None), "predictor", None)
        store = getattr(predictor, "feature_cache", None)
        if store is None:
            return
        for key, value in store.tally().items():
            pl_module.log(f"cache/{key}", float(value), reduce_fx="sum", sync_dist=True, logger=False)


class ShareCPUThreads(pl.Callback):
    """With several CPU processes on one machine, give each its share of the cores (torch and numba)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cpu" or trainer.world_size <= 1:
            return
        threads = max(1, (os.cpu_count() or 1) // max(1, trainer.num_devices))
        torch.set_num_threads(threads)
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


class EvaluationReport(pl.Callback):
    """Per-class and per-image tables (CSV and W&B), W&B summary metrics and sample images with masks.

    Args:
        store: the run's per-image records (``None``: no tables, e.g. a trainer built without a run).
        ids: every image id of the split, in order (the tables' rows).
        classes: the benchmark's class names (``;`` synonyms), in label order.
        dataset: the benchmark's name (the W&B summary keys are ``<dataset>/mIoU``...).
        boundary: the run computes Boundary IoU; ``dilation_ratio``: its band width.
        log_images: how many evaluated images to log to W&B with their predicted and ground-truth masks.
        ci: the bootstrap intervals of the W&B summary (``test/mIoU_ci_low`` ...); None: the defaults.

    Rank 0 only. The tables come from the run's per-image records (every process's images), so they hold
    what ``results.json`` holds: ``per_class.csv`` / ``per_image.csv`` in each CSV logger's folder, and
    ``per_class_iou`` / ``per_image`` ``wandb.Table``s plus ``<dataset>/mIoU``-style summary keys in W&B.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        ids: Sequence[str] = (),
        classes: Sequence[str] = (),
        *,
        dataset: str = "dataset",
        boundary: bool = False,
        dilation_ratio: float = DILATION_RATIO,
        log_images: int = 0,
        ci: CIConfig | None = None,
    ) -> None:
        self.store = store
        self.ids = list(ids)
        self.classes = list(classes)
        self.dataset = str(dataset)
        self.boundary = bool(boundary)
        self.dilation_ratio = float(dilation_ratio)
        self.log_images = max(0, int(log_images))
        self.ci = ci or CIConfig()
        self.logged = 0

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.loggers import WandbLogger

        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or self.logged >= self.log_images or not outputs:
            return
        loggers = self._wandb(trainer)
        if not loggers:
            return
        import wandb

        names = dict(enumerate(class_display_names(self.classes)))
        for sample in batch:
            labels = outputs.get(str(sample["id"]))
            if labels is None or self.logged >= self.log_images:
                continue
            gt = np.asarray(sample["label"]).astype(np.int64)
            pred = labels.cpu().numpy().astype(np.int64)
            masks = {
                "prediction": {"mask_data": pred, "class_labels": names},
                "ground_truth": {
                    "mask_data": np.where(gt == 255, len(names), gt),
                    "class_labels": {**names, len(names): "ignore"},
                },
            }
            image = wandb.Image(np.asarray(sample["image"]), masks=masks, caption=str(sample["id"]))
            for lg in loggers:
                lg.experiment.log({"samples": [image]})
            self.logged += 1

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.store is None or not self.ids:
            return
        records = self.store.load(self.ids)
        summary = summarize(
            records,
            self.classes,
            boundary=self.boundary,
            dilation_ratio=self.dilation_ratio,
        )
        intervals = _ci_summary(records, self.classes, self.boundary, self.ci)
        write_logger_tables(trainer.loggers, {**summary, "intervals": intervals}, self.dataset)


def write_logger_tables(loggers: Any, summary: dict[str, Any], dataset: str) -> None:
    """Each logger that is an instance of a :func:`_table_writers` class gets that writer's tables of
    ``summary`` (:func:`lposs_lab.lab.records.summarize`); other loggers get none."""
    writers = _table_writers()
    for lg in loggers:
        for logger_class, write in writers:
            if isinstance(lg, logger_class):
                write(lg, summary, dataset)


def _csv_tables(logger: Any, summary: dict[str, Any], dataset: str) -> None:
    """``per_class.csv`` and ``per_image.csv`` in the CSV logger's folder."""
    folder = Path(logger.log_dir)
    per_class = [[name, value] for name, value in summary["per_class_iou"].items()]
    per_image = [[r["id"], r["mIoU"], r["seconds"]] for r in summary["per_image"]]
    _write_csv(folder / "per_class.csv", ["class", "IoU"], per_class)
    _write_csv(folder / "per_image.csv", ["id", "mIoU", "seconds"], per_image)


def _wandb_tables(logger: Any, summary: dict[str, Any], dataset: str) -> None:
    """``per_class_iou`` / ``per_image`` tables and ``<dataset>/<metric>`` summary keys of the W&B run."""
    import wandb

    run = logger.experiment
    per_class = [[name, value] for name, value in summary["per_class_iou"].items()]
    per_image = [[r["id"], r["mIoU"], r["seconds"]] for r in summary["per_image"]]
    run.log(
        {
            "per_class_iou": wandb.Table(columns=["class", "IoU"], data=per_class),
            "per_image": wandb.Table(columns=["id", "mIoU", "seconds"], data=per_image),
        }
    )
    for key in ("mIoU", "pixel_accuracy", "boundary_iou", "num_images"):
        if summary.get(key) is not None:
            run.summary[f"{dataset}/{key}"] = summary[key]
    for key, value in summary.get("intervals", {}).items():  # test/mIoU_ci_low ...
        run.summary[key] = value


def _table_writers() -> tuple[tuple[type, Any], ...]:
    """``(logger class, writer(logger, summary, dataset))`` pairs: each logger of a run that is an instance
    of a class gets that writer's tables. A new logger's tables: one writer and one row here."""
    from pytorch_lightning.loggers import CSVLogger, WandbLogger  # importable without wandb installed

    return ((CSVLogger, _csv_tables), (WandbLogger, _wandb_tables))


def _ci_summary(
    records: list[dict[str, Any]], classes: Sequence[str], boundary: bool, ci: CIConfig
) -> dict[str, float]:
    """``{"test/mIoU_ci_low": ..., "test/mIoU_ci_high": ...}`` (and the other scores'), percent."""
    intervals = results_intervals(records, classes, ci, boundary=boundary)
    out = {}
    for key in ("mIoU", "pixel_accuracy", *(["boundary_iou"] if boundary else [])):
        interval = intervals.get(f"{key}_ci")
        if interval is not None:
            out[f"test/{key}_ci_low"], out[f"test/{key}_ci_high"] = interval
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())
