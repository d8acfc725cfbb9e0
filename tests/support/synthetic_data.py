"""Tiny synthetic datasets in each of the 8 MMSegmentation layouts of ``benchmarks.json`` (for tests).

``make_dataset(root, name)`` writes ``n_images`` image/label pairs under ``root`` exactly where
:class:`lposs_lab.lab.data.SegmentationDataset` looks for them, and returns ``root`` (the data root).
Labels are piecewise-constant rectangles, images colour each class with a fixed colour plus noise (so image
and label agree). Raw label values follow each benchmark's convention:

- no ``reduce_zero_label``: classes ``0..C-1`` and 255 (ignore) where the benchmark has ignored pixels;
- ``reduce_zero_label``: raw ``0..C`` (0 becomes ignore, the rest minus one) and 255;
- coco_object: raw COCO-Stuff stuffthingmaps (``<id>.png``, thing/stuff ids and 255) converted with
  :func:`lposs_lab.lab.data.coco_object.convert_coco_stuff_to_object` to ``<id>_instanceTrainIds.png``
  (0..80).

Split-file layouts (VOC, Context) also get one extra image/label pair not listed in ``val.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lposs_lab.lab.data.benchmarks import get_benchmark
from lposs_lab.lab.data.coco_object import convert_coco_stuff_to_object
from lposs_lab.viz import palette as palette_colours

__all__ = ["EXTRA_ID", "expected_ids", "make_dataset", "make_label", "raw_label_values"]

EXTRA_ID = "2099_999999"  # in JPEGImages but not in the val split
_CITIES = ("frankfurt", "lindau")


def _ids(name: str, n: int) -> list[str]:
    if name in ("voc", "voc20", "context", "context59"):
        return [f"2008_{i:06d}" for i in range(n)]
    if name in ("coco_stuff", "coco_object"):
        return [f"{i + 139:012d}" for i in range(n)]
    if name == "ade20k":
        return [f"ADE_val_{i + 1:08d}" for i in range(n)]
    if name == "cityscapes":
        return [f"{_CITIES[i % 2]}/{_CITIES[i % 2]}_000000_{i:06d}" for i in range(n)]
    raise ValueError(f"unknown benchmark {name!r}")


def expected_ids(name: str, n_images: int = 4) -> list[str]:
    """The sorted ids ``make_dataset(root, name, n_images)`` writes into the validation split."""
    return sorted(_ids(name, n_images))


def raw_label_values(name: str) -> np.ndarray:
    """Raw label values (as stored on disk) that ``make_dataset`` may use for benchmark ``name``."""
    info = get_benchmark(name)
    if name == "coco_object":  # stuffthingmaps ids: some things, some stuff, unlabeled
        return np.array([0, 1, 2, 12, 40, 89, 95, 120, 181, 255])
    n = info.num_classes + (1 if info.reduce_zero_label else 0)
    values = list(range(n))
    if name != "ade20k" and name != "context" and name != "context59":
        values.append(255)
    return np.array(values)


def make_label(name: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One ``[H, W]`` uint8 raw label map: a background value, 3 rectangles, maybe an ignore strip."""
    h, w = size
    values = raw_label_values(name)
    body = values[values != 255]
    label = np.full((h, w), rng.choice(body), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        y1, x1 = int(rng.integers(y0 + 3, h + 1)), int(rng.integers(x0 + 3, w + 1))
        label[y0:y1, x0:x1] = rng.choice(body)
    if 255 in values:
        r = int(rng.integers(1, h - 1))
        label[r, :] = 255
    # always use the first raw value somewhere (0 is the interesting one under reduce_zero_label)
    label[0, 0] = values[0]
    return label


def _colour_table() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 256, size=(256, 3)).astype(np.int16)


def _image_for(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = _colour_table()[label] + rng.integers(-12, 13, size=(*label.shape, 3))
    return img.clip(0, 255).astype(np.uint8)


def _write_pair(img_path: Path, lbl_path: Path, label: np.ndarray, image: np.ndarray, palette: bool) -> None:
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lbl_path.parent.mkdir(parents=True, exist_ok=True)
    if img_path.suffix == ".jpg":
        Image.fromarray(image).save(img_path, format="JPEG", quality=95)
    else:
        Image.fromarray(image).save(img_path, format="PNG")
    lab = Image.fromarray(label)
    if palette:
        lab = lab.convert("P")
        lab.putpalette(palette_colours(256).reshape(-1).tolist())
    lab.save(lbl_path, format="PNG")


def make_dataset(
    root: Path, name: str, n_images: int = 4, size: tuple[int, int] = (40, 56), seed: int = 0
) -> Path:
    """Write a synthetic benchmark ``name`` with ``n_images`` validation pairs under ``root``.

    Args:
        root: data root to write into (created if missing).
        name: one of the 8 benchmark names.
        n_images: number of validation images.
        size: ``(H, W)`` of every image.
        seed: random seed (same seed, same files).

    Returns:
        ``root``, the data root to pass to ``SegmentationDataset``.
    """
    info = get_benchmark(name)
    root = Path(root)
    base = root / info.root
    rng = np.random.default_rng(seed)
    ids = _ids(name, n_images)
    img_dir, lbl_dir = base / info.images, base / info.labels
    all_ids = ids + ([EXTRA_ID] if info.split else [])
    for key in all_ids:
        label = make_label(name, size, rng)
        image = _image_for(label, rng)
        if name == "coco_object":
            lbl_path = lbl_dir / f"{key}.png"  # raw stuffthingmaps, converted below
        else:
            lbl_path = lbl_dir / f"{key}{info.label_suffix}"
        _write_pair(
            img_dir / f"{key}{info.image_suffix}", lbl_path, label, image, palette=name in ("voc", "voc20")
        )
    if info.split:
        split = base / info.split
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{k}\n" for k in ids))
    if name == "coco_object":
        convert_coco_stuff_to_object(lbl_dir, lbl_dir)
    return root
