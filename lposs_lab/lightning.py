"""Lightning pieces of the evaluation lab: a data module sharding a benchmark, a test-only module scoring it.

Nothing is trained: the LPOSS predictor is a plain object built in :meth:`EvalModule.setup` (its encoders
are not registered as parameters); ``trainer.test`` runs one image per step on every process, updates the
torchmetrics metrics (summed across processes at the end) and writes one resumable state record per image
(:class:`lposs_lab.results.StateStore`).

Three ways to get a label map (``mode``):

- ``"model"``: the LPOSS / LPOSS+ / MaskCLIP predictor;
- ``"predictions"``: ``<predictions_dir>/<id>.png`` 8-bit label maps (benchmark class order after
  ``reduce_zero_label``, 255 = no prediction);
- ``"oracle_patch"``: the paper's patch-level oracle, see :func:`oracle_patch_labels`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchmetrics.aggregation import SumMetric

from .config import LPOSSConfig
from .data.benchmarks import IGNORE_INDEX, SegmentationDataset, collate_samples, load_label
from .image_io import ImageError
from .metrics import BoundaryIoU, SegmentationIoU, load_metric_states, metric_states, per_image_miou
from .results import StateStore, image_record, sum_states

__all__ = [
    "EvalDataModule",
    "EvalModule",
    "ImageProgressBar",
    "MODES",
    "make_trainer",
    "oracle_patch_labels",
    "read_prediction",
]

MODES = ("model", "predictions", "oracle_patch")


def oracle_patch_labels(label: Tensor, patch: int = 16, mode: str = "nearest-exact") -> Tensor:
    """The patch-level oracle: ground truth nearest-down-sampled by ``patch`` then nearest-up-sampled back.

    The grid is ``(max(1, round(H / patch)), max(1, round(W / patch)))`` (halves round up). With the default
    ``"nearest-exact"`` each grid cell takes the label at its centre pixel, and up-sampling copies it back
    over the cell (``"nearest"`` is PyTorch's legacy top-left-aligned variant). A cell whose sampled pixel is
    ignored (255) predicts nothing there, which counts as a miss for the classes under it.

    Args:
        label: ``[H, W]`` integer ground truth (255 = ignore).
        patch: down-sampling factor (the VM patch size, 16).
        mode: ``"nearest-exact"`` or ``"nearest"``.

    Returns:
        ``[H, W]`` int64 label map on ``label``'s device.
    """
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {tuple(label.shape)}")
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    if mode not in ("nearest", "nearest-exact"):
        raise ValueError(f"oracle mode must be 'nearest' or 'nearest-exact', got {mode!r}")
    h, w = label.shape
    grid = (max(1, int(h / patch + 0.5)), max(1, int(w / patch + 0.5)))
    x = label[None, None].to(torch.float32)  # labels <= 255 are exact in float32
    small = F.interpolate(x, size=grid, mode=mode)
    return F.interpolate(small, size=(h, w), mode=mode)[0, 0].round().to(torch.int64)


def read_prediction(
    folder: str | os.PathLike, image_id: str, shape: tuple[int, int], num_classes: int
) -> Tensor:
    """Read ``<folder>/<id>.png`` as an ``[H, W]`` int64 label map and check it against the benchmark.

    Raises:
        ImageError: missing or unreadable file, wrong size, or a value that is neither a class nor 255.
    """
    path = Path(folder) / f"{image_id}.png"
    if not path.is_file():
        raise ImageError(f"prediction {path} not found (predictions=DIR must hold <id>.png for every image)")
    arr = load_label(path)
    if arr.shape != tuple(shape):
        raise ImageError(
            f"prediction {path} is {arr.shape[0]}x{arr.shape[1]}, its ground truth {shape[0]}x{shape[1]}"
        )
    bad = (arr != IGNORE_INDEX) & (arr >= num_classes)
    if bad.any():
        raise ImageError(
            f"prediction {path} holds value {int(arr[bad][0])}; valid: 0..{num_classes - 1} (classes after "
            "reduce_zero_label) or 255 (none)"
        )
    return torch.from_numpy(arr.astype(np.int64))


class ImageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar counting images: ``img/s`` and the ETA of the test loop."""

    @property
    def test_description(self) -> str:
        return "Evaluating"

    def init_test_tqdm(self):
        bar = super().init_test_tqdm()
        bar.unit = "img"
        return bar


class EvalDataModule(pl.LightningDataModule):
    """One benchmark split, sharded by rank without duplicates, one image (a dict) per batch.

    Args:
        dataset: the benchmark's :class:`SegmentationDataset` (already restricted by ``limit``).
        store: state store; with ``resume`` the images it holds are skipped.
        resume: skip images that already have a state record.
        num_workers: DataLoader worker processes (decoding overlaps prediction).

    After ``setup``: ``done_ids`` (skipped, in dataset order) and ``todo`` (dataset indices still to run),
    decided on rank 0 and broadcast, so every process shards the same list: rank ``r`` of ``W`` takes
    ``todo[r::W]`` (Lightning's DistributedSampler would pad with duplicates and change the numbers).
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        *,
        store: StateStore | None = None,
        resume: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.store = store
        self.resume = resume
        self.num_workers = int(num_workers)
        self.done_ids: list[str] = []
        self.todo: list[int] = list(range(len(dataset)))

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        ids = self.dataset.ids
        done: list[str] = []
        rank, world = self._rank_world()
        if self.resume and self.store is not None and rank == 0:
            have = self.store.done_ids()
            done = [k for k in ids if k in have]
        if world > 1:
            done = self.trainer.strategy.broadcast(done, src=0)
        skip = set(done)
        self.done_ids = list(done)
        self.todo = [i for i, k in enumerate(ids) if k not in skip]

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        shard = self.todo[rank::world]
        return DataLoader(
            Subset(self.dataset, shard),
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
        )


class EvalModule(pl.LightningModule):
    """Scores label maps against a benchmark's ground truth in ``trainer.test`` (see the module docstring).

    Args:
        classes: the benchmark's class names (``;`` synonyms), in label order.
        mode: ``"model"``, ``"predictions"`` or ``"oracle_patch"``.
        store: where the per-image state records go.
        lposs: predictor config (mode ``"model"``); its ``device`` is replaced by the process's device.
        method: ``lposs``, ``lposs_plus`` or ``maskclip`` (mode ``"model"``).
        predictions_dir: folder of ``<id>.png`` label maps (mode ``"predictions"``).
        oracle_patch: down-sampling factor of the oracle; ``oracle_mode``: its nearest variant.
        boundary: also compute Boundary IoU; ``dilation_ratio``: its band width.
        save_predictions: optional folder to write each predicted label map to as ``<id>.png``.
        hparams: logged as hyperparameters (the resolved run config and the package version).
        stop_after: debugging: end the process abruptly (``os._exit(3)``) after this many images, like a kill.
    """

    def __init__(
        self,
        classes: Sequence[str],
        *,
        mode: str = "model",
        store: StateStore,
        lposs: LPOSSConfig | None = None,
        method: str = "lposs_plus",
        predictions_dir: str | None = None,
        oracle_patch: int = 16,
        oracle_mode: str = "nearest-exact",
        boundary: bool = False,
        dilation_ratio: float = 0.02,
        save_predictions: str | None = None,
        hparams: dict[str, Any] | None = None,
        stop_after: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; valid: {', '.join(MODES)}")
        if mode == "predictions" and not predictions_dir:
            raise ValueError("mode 'predictions' needs predictions_dir")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.mode = mode
        self.store = store
        self.lposs = lposs or LPOSSConfig()
        self.method = method
        self.predictions_dir = predictions_dir
        self.oracle_patch = int(oracle_patch)
        self.oracle_mode = oracle_mode
        self.boundary = bool(boundary)
        self.save_predictions = save_predictions
        self.stop_after = stop_after
        self.predictor = None  # built in setup(): not a submodule, nothing to train or checkpoint
        self.iou = SegmentationIoU(self.num_classes)
        self.biou = BoundaryIoU(self.num_classes, dilation_ratio=dilation_ratio) if self.boundary else None
        self.num_images = SumMetric()  # images scored, summed over processes (and earlier runs when resuming)
        self.processed = 0
        if hparams is not None:
            self.save_hyperparameters(hparams)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, stage: str | None = None) -> None:
        # Private metric states in every process: ddp_spawn hands the module over through
        # torch.multiprocessing, which puts CPU tensors in shared memory, so on CPU all processes would add
        # into the same counters.
        for metric in (self.iou, self.biou, self.num_images):
            if metric is not None:
                metric.reset()
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if device.type == "cpu" and self._trainer is not None and self.trainer.world_size > 1:
            # Share the cores between the processes (torch and the numba stencil), no oversubscription.
            threads = max(1, (os.cpu_count() or 1) // max(1, self.trainer.num_devices))
            torch.set_num_threads(threads)
            try:
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            except ImportError:  # pragma: no cover - numba is a dependency; torch stencil otherwise
                pass
        if self.mode == "model" and self.predictor is None:
            from dataclasses import replace

            from .predictor import LPOSS
            from .tasks.common import text_cache_dir

            self.predictor = LPOSS.from_config(
                replace(self.lposs, device=str(device)),
                method=self.method,
                text_cache_dir=text_cache_dir(self.hparams.get("config")),
            )
            self.predictor.set_classes(self.classes)
            from .cache import configure_cache  # cache.enabled=true: encoder outputs reused across runs

            configure_cache(self.predictor, self.hparams.get("config") or {})

    def on_test_start(self) -> None:
        dm = self.trainer.datamodule
        done = list(getattr(dm, "done_ids", []) or [])
        if done and self.trainer.is_global_zero:  # earlier images count once, on rank 0
            records = self.store.load(done)
            for metric, key in ((self.iou, "iou"), (self.biou, "boundary")):
                totals = sum_states(records, key) if metric is not None else None
                if totals is not None:
                    load_metric_states(metric, totals)
            self.num_images.update(float(sum("iou" in r for r in records)))

    # ------------------------------------------------------------------ one image
    def _labels(self, sample: dict[str, Any], target: Tensor) -> Tensor:
        if self.mode == "model":
            assert self.predictor is not None
            return self.predictor.predict(sample["image"], image_id=str(sample["id"])).labels
        if self.mode == "predictions":
            return read_prediction(self.predictions_dir, sample["id"], tuple(target.shape), self.num_classes)
        return oracle_patch_labels(target, self.oracle_patch, self.oracle_mode)

    def evaluate_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Score one dataset sample, update the metrics and write its state record; returns the record."""
        key = str(sample["id"])
        if (
            sample.get("error")
            or sample.get("label") is None
            or (self.mode == "model" and sample["image"] is None)
        ):
            msg = " ".join(str(sample.get("error") or "image or label missing").split())
            print(f"warning: cannot evaluate {key}: {msg}", file=sys.stderr, flush=True)
            record = image_record(key, error=msg)
        else:
            target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))
            t0 = time.perf_counter()
            labels = self._labels(sample, target)
            seconds = time.perf_counter() - t0
            if self.save_predictions:
                from .viz import label_image, save_png

                save_png(label_image(labels.numpy()), Path(self.save_predictions) / f"{key}.png")
            labels, target = labels.to(self.device), target.to(self.device)
            states = {}
            for name, metric in (("iou", self.iou), ("boundary", self.biou)):
                if metric is None:
                    continue
                before = metric_states(metric)
                metric.update(labels, target)
                states[name] = {k: v - before[k] for k, v in metric_states(metric).items()}
            miou = float(per_image_miou(labels, target, self.num_classes))
            record = image_record(
                key, iou=states["iou"], boundary=states.get("boundary"), miou=miou, seconds=seconds
            )
            record["rank"] = self.global_rank
            self.num_images.update(1.0)
            self.log("test/image_mIoU", 100.0 * miou, on_step=True, on_epoch=False, batch_size=1)
            self.log("test/seconds", seconds, on_step=True, on_epoch=False, batch_size=1)
        self.store.write(record)
        return record

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        for sample in batch:
            self.evaluate_sample(sample)
            self.processed += 1
            if self.stop_after is not None and self.processed >= self.stop_after:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(3)  # debugging: simulate a kill (no cleanup, no results)
        inter = self.iou.intersection.double()
        union = self.iou.union.double()
        seen = union > 0
        running = float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else float("nan")
        self.log(
            "mIoU", 100.0 * running, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1
        )

    def on_test_epoch_end(self) -> None:
        if self.predictor is not None and self.predictor.feature_cache is not None:
            self.predictor.feature_cache.close()  # write the last shard of the feature cache
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


def make_trainer(
    *,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    logger: Any = False,
    progress_bar: bool = True,
    default_root_dir: str | os.PathLike | None = None,
) -> pl.Trainer:
    """A test-only Lightning Trainer: our own sharding, no checkpoints, the image progress bar.

    ``strategy="auto"`` with more than one device becomes ``"ddp_spawn"``: it starts the workers from inside
    the running Hydra app (Lightning's ``"ddp"`` re-launches the script, which breaks Hydra multirun). On CPU
    the processes talk over gloo.
    """
    single = devices in (1, "1") or (isinstance(devices, list | tuple) and len(devices) == 1)
    if strategy == "auto" and not (single and num_nodes == 1):
        strategy = "ddp_spawn"
    callbacks = [ImageProgressBar()] if progress_bar else []
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=progress_bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=True,
        default_root_dir=default_root_dir,
        log_every_n_steps=1,
    )
