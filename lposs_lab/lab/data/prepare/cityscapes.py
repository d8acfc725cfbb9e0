"""Cityscapes' 19 train ids: from ``*_gtFine_labelIds.png`` (the official evaluator's source, default) or by
re-drawing ``*_gtFine_polygons.json`` (the route of MMSegmentation and LPOSS; edge pixels differ).

Polygons are drawn as cityscapesScripts' ``json2labelImg`` does for train ids: background 255, objects in
file order (later on top), ``deleted`` objects skipped, ``<name>group`` drawn as ``<name>`` when
``<name>group`` itself is no label, labels with a negative id skipped.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from ..benchmarks import DatasetError

__all__ = ["LABELS", "labelid_lut", "train_ids_from_label_ids", "train_ids_from_polygons"]

#: Cityscapes label name -> (id, train id); train id 255 is not scored
LABELS: dict[str, tuple[int, int]] = {
    "unlabeled": (0, 255), "ego vehicle": (1, 255), "rectification border": (2, 255), "out of roi": (3, 255),
    "static": (4, 255), "dynamic": (5, 255), "ground": (6, 255), "road": (7, 0), "sidewalk": (8, 1),
    "parking": (9, 255), "rail track": (10, 255), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
    "guard rail": (14, 255), "bridge": (15, 255), "tunnel": (16, 255), "pole": (17, 5),
    "polegroup": (18, 255), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
    "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13),
    "truck": (27, 14), "bus": (28, 15), "caravan": (29, 255), "trailer": (30, 255), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18), "license plate": (-1, -1),
}  # fmt: skip


def labelid_lut() -> np.ndarray:
    """``[256]`` uint8: label id -> train id (the 19 scored ids 0..18, every other id 255)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in LABELS.values():
        if label_id >= 0 and train_id != 255:
            lut[label_id] = train_id
    return lut


def train_ids_from_label_ids(raw: np.ndarray) -> np.ndarray:
    """``[H, W]`` label ids (uint8) -> ``[H, W]`` uint8 train ids."""
    if raw.ndim != 2:
        raise ValueError(f"a labelIds map must be [H, W], got {raw.shape}")
    return labelid_lut()[raw.astype(np.uint8)]


def train_ids_from_polygons(text: str | bytes, source: str) -> np.ndarray:
    """Draw one ``*_polygons.json`` (``imgHeight``, ``imgWidth``, ``objects``) as a ``[H, W]`` train-id map.

    Raises:
        DatasetError: malformed JSON or an unknown label (names ``source``).
    """
    try:
        data = json.loads(text)
        h, w = int(data["imgHeight"]), int(data["imgWidth"])
        objects = data["objects"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{source}: not a Cityscapes polygons file ({exc})") from None
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        if obj.get("deleted"):
            continue
        name = str(obj["label"])
        if name not in LABELS and name.endswith("group"):
            name = name[: -len("group")]
        if name not in LABELS:
            raise DatasetError(f"{source}: unknown Cityscapes label {obj['label']!r}")
        label_id, train_id = LABELS[name]
        if label_id < 0:
            continue
        points = [(float(x), float(y)) for x, y in obj["polygon"]]
        if len(points) >= 2:
            draw.polygon(points, fill=train_id)
    return np.asarray(img)
