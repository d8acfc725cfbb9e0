"""Lightning callbacks of the evaluation loop (``conf/callbacks``, built with ``hydra.utils.instantiate``)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from lposs_lab.files import atomic_write

from .records import class_display_names, summarize
from .stats import CIConfig, results_intervals

__all__ = ["ImageProgressBar", "ShareCPUThreads", "EvaluationReport"]


class ImageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counting images: ``img/s`` and the ETA of the test loop."""

    @property
    def test_description(self) -> str:
        return "Evaluating"

    def init_test_tqdm(self):
        bar = super().init_test_tqdm()
        bar.unit = "img"
        return bar


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
        log_images: how many evaluated images to log to W&B with their predicted and ground-truth masks.
        ci: the bootstrap intervals of the W&B summary (``test/mIoU_ci_low`` ...); None: the defaults.

    Rank 0 only. The tables come from the run's per-image records (every process's images), so they hold
    what ``results.json`` holds: ``per_class.csv`` / ``per_image.csv`` in each CSV logger's folder, and
    ``per_class_iou`` / ``per_image`` ``wandb.Table``s plus ``<dataset>/mIoU``-style summary keys in W&B.
    """

    def __init__(self, log_images: int = 0, ci: CIConfig | None = None) -> None:
        self.log_images = max(0, int(log_images))
        self.ci = ci or CIConfig()
        self.logged = 0

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> list[Any]:
        return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or self.logged >= self.log_images or not outputs:
            return
        loggers = self._wandb(trainer)
        if not loggers:
            return
        import wandb

        names = dict(enumerate(class_display_names(pl_module.classes)))
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
        ids = list(getattr(pl_module, "ids", None) or [])
        if not ids:
            return
        records = pl_module.store.load(ids)
        summary = summarize(
            records,
            pl_module.classes,
            boundary=pl_module.biou is not None,
            dilation_ratio=getattr(pl_module.biou, "dilation_ratio", 0.02),
        )
        dataset = str(pl_module.hparams.get("dataset", "dataset"))
        per_class = [[name, value] for name, value in summary["per_class_iou"].items()]
        per_image = [[r["id"], r["mIoU"], r["seconds"]] for r in summary["per_image"]]
        for lg in trainer.loggers:
            kind = type(lg).__name__
            if kind == "CSVLogger":
                folder = Path(lg.log_dir)
                _write_csv(folder / "per_class.csv", ["class", "IoU"], per_class)
                _write_csv(folder / "per_image.csv", ["id", "mIoU", "seconds"], per_image)
            elif kind == "WandbLogger":
                import wandb

                run = lg.experiment
                run.log(
                    {
                        "per_class_iou": wandb.Table(columns=["class", "IoU"], data=per_class),
                        "per_image": wandb.Table(columns=["id", "mIoU", "seconds"], data=per_image),
                    }
                )
                keys = {
                    "mIoU": summary["mIoU"],
                    "pixel_accuracy": summary["pixel_accuracy"],
                    "boundary_iou": summary.get("boundary_iou"),
                    "num_images": summary["num_images"],
                }
                for key, value in keys.items():
                    if value is not None:
                        run.summary[f"{dataset}/{key}"] = value
                for key, value in _ci_summary(records, pl_module, self.ci).items():
                    run.summary[key] = value


def _ci_summary(records: list[dict[str, Any]], pl_module: Any, ci: CIConfig) -> dict[str, float]:
    """``{"test/mIoU_ci_low": ..., "test/mIoU_ci_high": ...}`` (and the other scores'), percent."""
    boundary = pl_module.biou is not None
    intervals = results_intervals(records, pl_module.classes, ci, boundary=boundary)
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
