"""Where an evaluation's label maps come from: a predictor, saved label PNGs, or the patch oracle.

Each source is a small picklable object (``ddp_spawn`` hands it to the worker processes) with
``setup(device)`` (build what it needs on this process's device), ``labels(sample, target)`` (the ``[H, W]``
int64 label map of one dataset sample) and ``close()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lposs_lab.config import LPOSSConfig
from lposs_lab.image_io import ImageError
from lposs_lab.postprocess import Abstain
from lposs_lab.score_files import PatchGrids, write_score_file

from .cache import FeatureCacheSpec
from .data.benchmarks import IGNORE_INDEX, load_label

__all__ = [
    "PredictorSource",
    "SavedPredictions",
    "PatchOracle",
    "oracle_patch_labels",
    "read_prediction",
    "save_score_file",
]


@dataclass
class PredictorSource:
    """LPOSS / LPOSS+ / MaskCLIP label maps; the predictor is built in :meth:`setup` on the process's device.

    Attributes:
        config: the predictor's hyperparameters (its ``device`` is replaced by the process's device).
        method: ``lposs_plus``, ``lposs`` or ``maskclip``.
        classes: the benchmark's class names (``;`` synonyms), in label order.
        text_cache_dir: see :meth:`lposs_lab.LPOSS.from_config`.
        cache: optional feature cache (encoder outputs reused across runs).
        abstain: optional abstain rule (``predict.unknown_threshold``), see :class:`lposs_lab.Abstain`.
        postprocess: optional step on the per-name scores (``postprocess=pamr``).
        save_scores: optional folder: each image's scores go to ``<id>.npz`` (float16, compressed, written
            atomically; :mod:`lposs_lab.score_files`): MaskCLIP / LPOSS over sliding windows as their
            per-window patch grids and the stitching rule, LPOSS+ as ``scores [C, h, w]`` at the resized
            image; ``task=refine`` and :func:`lposs_lab.refine` read both.
    """

    config: LPOSSConfig
    method: str
    classes: list[str]
    text_cache_dir: str | None = "auto"
    cache: FeatureCacheSpec | None = None
    abstain: Abstain | None = None
    postprocess: Any = None
    save_scores: str | None = None
    predictor: Any = field(default=None, repr=False)

    def setup(self, device: torch.device) -> None:
        if self.predictor is not None:
            return
        from lposs_lab.predictor import LPOSS

        config = replace(self.config, device=str(device))
        self.predictor = LPOSS.from_config(
            config, method=self.method, text_cache_dir=self.text_cache_dir, error_style="hydra"
        )
        self.predictor.set_classes(self.classes)
        if self.cache is not None:
            self.cache.attach(self.predictor)

    def labels(self, sample: dict[str, Any], target: Tensor) -> Tensor:
        if self.predictor is None:
            raise RuntimeError("PredictorSource.labels called before setup(device)")
        pred = self.predictor.predict(
            sample["image"], image_id=str(sample["id"]), abstain=self.abstain, postprocess=self.postprocess
        )
        if self.save_scores:
            scores = pred.low_res_scores if pred.patch_grids is None else pred.patch_grids
            save_score_file(Path(self.save_scores) / f"{sample['id']}.npz", scores, pred.class_names)
        return pred.labels

    def close(self) -> None:
        if self.predictor is not None and self.predictor.feature_cache is not None:
            self.predictor.feature_cache.close()  # write the last shard of the feature cache

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "predictor": None}  # workers build their own predictor


def save_score_file(path: Path, scores: Tensor | PatchGrids, class_names: list[str]) -> int:
    """Write ``scores`` (``[C, h, w]`` or window grids) and ``classes`` to ``path`` (``.npz``), atomically.

    See :func:`lposs_lab.score_files.write_score_file`; returns the file's size in bytes.
    """
    return write_score_file(path, scores, class_names)


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


@dataclass
class SavedPredictions:
    """``<folder>/<id>.png`` 8-bit label maps (class order after ``reduce_zero_label``, 255 = none)."""

    folder: str
    num_classes: int

    def setup(self, device: torch.device) -> None:
        pass

    def labels(self, sample: dict[str, Any], target: Tensor) -> Tensor:
        return read_prediction(self.folder, sample["id"], tuple(target.shape), self.num_classes)

    def close(self) -> None:
        pass


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


@dataclass
class PatchOracle:
    """The paper's patch-level oracle (Table 2), see :func:`oracle_patch_labels`."""

    patch: int = 16
    mode: str = "nearest-exact"

    def setup(self, device: torch.device) -> None:
        pass

    def labels(self, sample: dict[str, Any], target: Tensor) -> Tensor:
        return oracle_patch_labels(target, self.patch, self.mode)

    def close(self) -> None:
        pass
