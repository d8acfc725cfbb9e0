"""COCO-Stuff-164k's 171 train ids and COCO-Object's 81 ids, both from one read of each stuffthingmaps PNG.

The stuffthingmaps hold 0-based COCO-Stuff ids: things 0..90 (11 of them never annotated), stuff 91..181,
255 unlabeled. ``*_labelTrainIds.png``: the 171 used ids in ascending order -> 0..170, anything else -> 255.
``*_instanceTrainIds.png``: the 80 things in order -> 1..80, everything else -> 0 (background). Nothing here
counts the train split, so a val-only download is enough.
"""

from __future__ import annotations

import numpy as np

from ..coco_object import COCO_UNUSED_IDS, coco_object_lut

__all__ = ["COCO_STUFF_IDS", "coco_stuff_lut", "coco_labels"]

#: the 171 stuffthingmaps ids that COCO-Stuff scores, ascending (their rank is the train id)
COCO_STUFF_IDS: tuple[int, ...] = tuple(i for i in range(182) if i not in COCO_UNUSED_IDS)
assert len(COCO_STUFF_IDS) == 171


def coco_stuff_lut() -> np.ndarray:
    """``[256]`` uint8: stuffthingmaps id -> COCO-Stuff train id 0..170, 255 for every other value."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[list(COCO_STUFF_IDS)] = np.arange(171, dtype=np.uint8)
    return lut


def coco_labels(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labelTrainIds, instanceTrainIds)`` of one ``[H, W]`` uint8 stuffthingmaps array, both ``[H, W]``."""
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise ValueError(f"a stuffthingmaps label must be [H, W] uint8, got {raw.shape} {raw.dtype}")
    return coco_stuff_lut()[raw], coco_object_lut()[raw]
