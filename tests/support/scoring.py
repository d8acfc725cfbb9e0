"""Independent numpy/scipy references of the split metrics, and prediction folders to score (tests only).

Nothing here imports ``lposs_lab.lab.metrics``: these are what the package's numbers are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IGNORE",
    "np_boundary_counts",
    "np_boundary_miou",
    "np_miou",
    "np_pixel_accuracy",
    "write_predictions",
]

IGNORE = 255


def np_miou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int):
    """Total intersection / union per class over the split, NaN-mean over classes with a union, ignore 255.

    Returns ``(mIoU in [0, 1], intersection [C], union [C])``.
    """
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for p, g in zip(preds, gts, strict=True):
        valid = g != IGNORE
        for c in range(num_classes):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += (pc & gc).sum()
            union[c] += (pc | gc).sum()
    seen = union > 0
    return float((inter[seen] / union[seen]).mean()), inter, union


def np_pixel_accuracy(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Correct / labelled pixels over the split (ignore 255)."""
    hit = sum(int(((p == g) & (g != IGNORE)).sum()) for p, g in zip(preds, gts, strict=True))
    labelled = sum(int((g != IGNORE).sum()) for g in gts)
    return hit / labelled


def np_boundary_counts(preds, gts, num_classes: int, ratio: float = 0.02):
    """Boundary IoU counts with scipy's binary erosion (3x3, ``max(1, round(ratio * diagonal))`` times,
    outside the image = background); predictions at ignored pixels are dropped. Returns ``(inter, union)``."""
    from scipy import ndimage

    inter = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    st = np.ones((3, 3), dtype=bool)
    for p, g in zip(preds, gts, strict=True):
        h, w = g.shape
        k = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
        p = np.where(g == IGNORE, IGNORE, p)
        for cls in range(num_classes):
            gm, pm = g == cls, p == cls
            if not (gm.any() or pm.any()):
                continue
            gb = gm & ~ndimage.binary_erosion(gm, structure=st, iterations=k, border_value=0)
            pb = pm & ~ndimage.binary_erosion(pm, structure=st, iterations=k, border_value=0)
            inter[cls] += (gb & pb).sum()
            union[cls] += (gb | pb).sum()
    return inter, union


def np_boundary_miou(preds, gts, num_classes: int, ratio: float = 0.02) -> float:
    inter, union = np_boundary_counts(preds, gts, num_classes, ratio)
    seen = union > 0
    return float((inter[seen] / union[seen]).mean())


def write_predictions(ds, folder: Path, seed: int = 0, keep: float = 0.6) -> dict[str, np.ndarray]:
    """Noisy copies of ``ds``'s ground truth as ``<folder>/<id>.png``; returns ``{id: uint8 prediction}``.

    A fraction ``keep`` of the labelled pixels keeps its class, the rest gets a random class; three pixels
    of the first row are 255 ("no prediction", allowed).
    """
    rng = np.random.default_rng(seed)
    c = ds.info.num_classes
    out = {}
    for i in range(len(ds)):
        s = ds[i]
        gt = s["label"]
        noise = rng.integers(0, c, gt.shape)
        pred = np.where((rng.random(gt.shape) < keep) & (gt != IGNORE), gt, noise).astype(np.uint8)
        pred[0, :3] = IGNORE
        path = Path(folder) / f"{s['id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(path)
        out[s["id"]] = pred
    return out
