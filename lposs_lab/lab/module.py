"""Lightning pieces of the evaluation lab: a data module sharding a benchmark, a test-only module scoring it.

Nothing is trained. :class:`EvalModule` receives built objects (a label source, a record store, the class
list) and reads no config; ``trainer.test`` runs one image per step on every process, adds that image's
metric counts to the torchmetrics metrics (summed across processes at the end) and writes one resumable
record per image (:class:`lposs_lab.lab.records.StateStore`).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchmetrics.aggregation import SumMetric

from .data.dataset import SegmentationDataset, collate_samples
from .metrics import DILATION_RATIO, BoundaryIoU, SegmentationIoU, per_image_miou
from .records import StateStore, image_record, sum_states

__all__ = ["EvalDataModule", "EvalModule", "exit_with_parent"]


def exit_with_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the worker gets SIGKILL when its parent dies (Linux ``prctl``).

    Without it, workers of a killed run (``kill -9``, the OOM killer) stay alive blocked on a pipe.
    Elsewhere this does nothing (the workers then exit when they notice the closed pipe).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class EvalDataModule(pl.LightningDataModule):
    """One benchmark split, sharded by rank without duplicates, one image (a dict) per batch.

    Args:
        dataset: the benchmark's :class:`SegmentationDataset` (already restricted by ``limit``).
        skip: ids already evaluated (resume): not loaded again.
        num_workers: DataLoader worker processes (decoding overlaps prediction).
        prepare: called by :meth:`prepare_data` (``dataset.download=true``: the benchmark's ``prepare``,
            which does nothing when its stamp is valid).

    ``todo`` (dataset indices still to run) is the same on every process: rank ``r`` of ``W`` takes
    ``todo[r::W]`` (Lightning's DistributedSampler would pad with duplicates and change the numbers).
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        *,
        skip: Sequence[str] = (),
        num_workers: int = 0,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.prepare = prepare
        self.prepare_data_per_node = True
        self.dataset = dataset
        self.num_workers = int(num_workers)
        skipped = set(skip)
        self.todo: list[int] = [i for i, k in enumerate(dataset.ids) if k not in skipped]

    def prepare_data(self) -> None:
        """Lightning calls this once per node (local rank 0) before ``setup``: fetch/convert the data."""
        if self.prepare is not None:
            self.prepare()

    def test_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        return DataLoader(
            Subset(self.dataset, self.todo[rank::world]),
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            worker_init_fn=exit_with_parent if self.num_workers else None,
        )


class EvalModule(pl.LightningModule):
    """Scores label maps against a benchmark's ground truth in ``trainer.test``.

    Args:
        classes: the benchmark's class names (``;`` synonyms), in label order.
        source: where label maps come from (:mod:`lposs_lab.lab.sources`).
        store: where the per-image records go.
        resumed: records of images evaluated by an earlier run (counted once, on rank 0).
        ids: every image id of the split (the per-class/per-image tables of the callbacks read their records).
        boundary: also compute Boundary IoU; ``dilation_ratio``: its band width.
        save_predictions: optional folder to write each predicted label map to as ``<id>.png``.
        hparams: logged as hyperparameters (the resolved run config, the package version).
    """

    def __init__(
        self,
        classes: Sequence[str],
        source: Any,
        store: StateStore,
        *,
        resumed: Sequence[dict[str, Any]] = (),
        ids: Sequence[str] = (),
        boundary: bool = False,
        dilation_ratio: float = DILATION_RATIO,
        save_predictions: str | None = None,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.source = source
        self.store = store
        self.resumed = list(resumed)
        self.ids = list(ids)
        self.save_predictions = save_predictions
        self.iou = SegmentationIoU(self.num_classes)
        self.biou = BoundaryIoU(self.num_classes, dilation_ratio=dilation_ratio) if boundary else None
        self.num_images = SumMetric()  # images scored, summed over processes (and earlier runs when resuming)
        if hparams is not None:
            self.save_hyperparameters(hparams)

    def _metrics(self) -> list[tuple[str, Any]]:
        return [(name, m) for name, m in (("iou", self.iou), ("boundary", self.biou)) if m is not None]

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str | None = None) -> None:
        # Private metric states in every process: ddp_spawn hands the module over through
        # torch.multiprocessing, which puts CPU tensors in shared memory, so on CPU all processes would add
        # into the same counters.
        for _, metric in self._metrics():
            metric.reset()
        self.num_images.reset()
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.source.setup(device)

    def on_test_start(self) -> None:
        if self.resumed and self.trainer.is_global_zero:  # earlier images count once, on rank 0
            for key, metric in self._metrics():
                totals = sum_states(self.resumed, key)
                if totals is not None:
                    metric.add_counts(totals)
            self.num_images.update(float(sum("iou" in r for r in self.resumed)))

    # ------------------------------------------------------------------ one image
    def evaluate_sample(self, sample: dict[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
        """Score one dataset sample, update the metrics and write its record.

        Returns ``(record, labels)``; ``labels`` is None for a sample that could not be evaluated.
        """
        key = str(sample["id"])
        labels_out = None
        if sample.get("error") or sample.get("label") is None or sample.get("image") is None:
            msg = " ".join(str(sample.get("error") or "image or label missing").split())
            print(f"warning: cannot evaluate {key}: {msg}", file=sys.stderr, flush=True)
            record = image_record(key, error=msg)
        else:
            target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
            t0 = time.perf_counter()
            labels = self.source.labels(sample, target)
            seconds = time.perf_counter() - t0
            if self.save_predictions:
                from lposs_lab.viz import label_image, save_png

                save_png(label_image(labels.numpy()), Path(self.save_predictions) / f"{key}.png")
            labels, target = labels.to(self.device), target.to(self.device)
            counts = {name: metric.counts(labels, target) for name, metric in self._metrics()}
            for name, metric in self._metrics():
                metric.add_counts(counts[name])
            miou = float(per_image_miou(labels, target, self.num_classes))
            record = image_record(
                key, iou=counts["iou"], boundary=counts.get("boundary"), miou=miou, seconds=seconds
            )
            record["rank"] = self.global_rank
            labels_out = labels
            self.num_images.update(1.0)
            self.log("test/image_mIoU", 100.0 * miou, on_step=True, on_epoch=False, batch_size=1)
            self.log("test/seconds", seconds, on_step=True, on_epoch=False, batch_size=1)
        self.store.write(record)
        return record, labels_out

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> dict[str, Tensor]:
        """Score the batch's samples; returns ``{id: [H, W] labels}`` for callbacks (sample images)."""
        out = {}
        for sample in batch:
            record, labels = self.evaluate_sample(sample)
            if labels is not None:
                out[record["id"]] = labels
        self.log(
            "mIoU",
            100.0 * _running_miou(self.iou),
            prog_bar=True,
            logger=False,
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
        return out

    def on_test_epoch_end(self) -> None:
        self.source.close()
        res = self.iou.compute()  # torchmetrics sums the states of all processes here
        values = {
            "test/mIoU": 100.0 * float(res["mIoU"]),
            "test/pixel_accuracy": 100.0 * float(res["pixel_accuracy"]),
            "test/num_images": float(self.num_images.compute()),
        }
        if self.biou is not None:
            values["test/boundary_iou"] = 100.0 * float(self.biou.compute()["mBIoU"])
        # identical on every process (torchmetrics synced them); sync_dist only silences Lightning's hint
        for name, value in values.items():
            self.log(name, value, sync_dist=True)


def _running_miou(iou: SegmentationIoU) -> float:
    """This process's mIoU so far (progress bar only; no cross-process sync)."""
    inter, union = iou.intersection.double(), iou.union.double()
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else float("nan")
