"""PASCAL Context (59 classes + background) label maps from PASCAL in Detail's ``trainval_merged.json``.

Per val image: a zero ``H x W`` map; each of the image's ``annos_segmentation``, in file order, paints its
``category_id`` over the pixels of its mask (later wins); the value's rank in ``{0} + CONTEXT59_IDS`` gives
the label 0..59, saved as ``SegmentationClassContext/<stem>.png``. The masks are COCO run-length encodings,
decoded by :func:`decode_rle` (no pycocotools, no Detail API).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..benchmarks import DatasetError

__all__ = ["CONTEXT59_IDS", "context_lut", "decode_counts", "decode_rle", "context_label", "split_lists"]

#: the 59 category ids (of the 459 of PASCAL in Detail) that PASCAL Context keeps; ascending id order is
#: the alphabetical class order of the benchmark
CONTEXT59_IDS: tuple[int, ...] = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144,
    158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355,
    360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip


def context_lut() -> np.ndarray:
    """``[459 + 1]`` int16: category id -> label 0..59 (0 stays 0), -1 for ids Context does not keep."""
    lut = np.full(max(CONTEXT59_IDS) + 1, -1, dtype=np.int16)
    lut[0] = 0
    lut[list(CONTEXT59_IDS)] = np.arange(1, 60)
    return lut


def decode_counts(s: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string.

    Each run length is written in 5-bit groups, least significant first, as characters ``48 + group``;
    bit ``0x20`` says another group follows and bit ``0x10`` of the last group is the sign. From the third
    run on, the stored value is the difference to the run two places before.
    """
    counts: list[int] = []
    pos, n = 0, len(s)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError(f"RLE string ends inside a run length: {s[:40]!r}")
            c = ord(s[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has a character outside '0'..'o': {s[pos]!r}")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(segmentation: dict) -> np.ndarray:
    """One COCO RLE ``{"size": [h, w], "counts": str | list[int]}`` to a ``[h, w]`` bool mask.

    Runs alternate 0, 1, 0, ... starting with zeros and cover the image column by column (column-major).

    Raises:
        ValueError: malformed counts, negative runs, or runs that do not add up to ``h * w``.
    """
    h, w, flat = _column_major(segmentation)
    return flat.reshape(w, h).T


def _column_major(segmentation: dict) -> tuple[int, int, np.ndarray]:
    """``(h, w, mask)`` with the mask flat in column-major order (``[h * w]`` bool)."""
    h, w = (int(v) for v in segmentation["size"])
    counts = segmentation["counts"]
    runs = decode_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs):
        raise ValueError("RLE holds a negative run length")
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the mask has {h}x{w} = {h * w}")
    return h, w, np.repeat((np.arange(len(runs)) % 2).astype(bool), runs)


def context_label(stem: str, height: int, width: int, segmentations: list[tuple[int, dict]]) -> np.ndarray:
    """The ``[height, width]`` uint8 Context label (0..59) of one image from its ``(category_id, rle)`` list.

    Raises:
        DatasetError: a mask of another size, or a category that is not one of the 59 (names the image).
    """
    raw = np.zeros(height * width, dtype=np.int32)  # painted in the masks' column-major order
    for category, rle in segmentations:
        try:
            h, w, mask = _column_major(rle)
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"trainval_merged.json: bad mask for {stem} (category {category}): {exc}"
            ) from None
        if (h, w) != (height, width):
            raise DatasetError(
                f"trainval_merged.json: a mask of {stem} is {h}x{w}, the image is {height}x{width}"
            )
        raw[mask] = category
    lut = context_lut()
    in_range = not raw.size or (raw.min() >= 0 and raw.max() < len(lut))
    mapped = lut[raw] if in_range else None
    if mapped is None or (mapped < 0).any():
        bad = sorted({int(v) for v in np.unique(raw) if v < 0 or v >= len(lut) or lut[v] < 0})
        raise DatasetError(
            f"trainval_merged.json: {stem} holds category id(s) {bad[:5]} outside the 59 Context classes; "
            "is it the PASCAL in Detail file?"
        )
    return np.ascontiguousarray(mapped.astype(np.uint8).reshape(width, height).T)


def split_lists(data: dict) -> tuple[dict[str, tuple[int, int, list]], list[str], list[str]]:
    """``(val images by stem -> (h, w, [(category, rle)]), sorted train stems, sorted val stems)``.

    Raises:
        DatasetError: the JSON lacks ``images`` or ``annos_segmentation``.
    """
    if not isinstance(data, dict) or "images" not in data or "annos_segmentation" not in data:
        raise DatasetError(
            "trainval_merged.json lacks 'images' or 'annos_segmentation'; is it the right file?"
        )
    by_id: dict[int, str] = {}
    val: dict[str, tuple[int, int, list]] = {}
    train: list[str] = []
    for img in data["images"]:
        stem = Path(str(img["file_name"])).stem
        by_id[int(img["image_id"])] = stem
        if img.get("phase") == "val":
            val[stem] = (int(img["height"]), int(img["width"]), [])
        elif img.get("phase") == "train":
            train.append(stem)
    for ann in data["annos_segmentation"]:
        stem = by_id.get(int(ann["image_id"]))
        if stem in val:
            val[stem][2].append((int(ann["category_id"]), ann["segmentation"]))
    return val, sorted(train), sorted(val)
