"""The 8 open-vocabulary segmentation benchmarks (MMSegmentation layout) and a dataset reading them.

The facts about each benchmark (class names with ``;`` synonyms, folders, suffixes, split file,
``reduce_zero_label``) live in ``benchmarks.json`` beside this file; see docs/method.md §7.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lposs_lab.errors import ConfigError, ImageError, UserError

__all__ = [
    "BENCHMARKS",
    "IGNORE_INDEX",
    "BenchmarkInfo",
    "DatasetError",
    "encode_label",
    "find_samples",
    "get_benchmark",
    "load_label",
    "reduce_zero_label",
    "resolve_root",
]

IGNORE_INDEX = 255
_JSON_PATH = Path(__file__).with_name("benchmarks.json")


class DatasetError(UserError, ValueError):
    """A benchmark folder that cannot be used; the message is one line naming the problem and the fix."""


#: benchmarks whose class 0 is "background" (docs/predictors.md §6: the sets that use prob_thd / area_thd)
_WITH_BACKGROUND = ("voc", "context", "coco_object")


@dataclass(frozen=True)
class BenchmarkInfo:
    """One benchmark as described in ``benchmarks.json``.

    Attributes:
        name: benchmark key (``voc``, ``voc20``, ``context``, ``context59``, ``coco_object``,
            ``coco_stuff``, ``ade20k``, ``cityscapes``).
        classes: class names given to the text encoder; ``;`` separates synonyms of one class.
        root: benchmark folder relative to the data root (e.g. ``VOCdevkit/VOC2012``).
        images: image folder relative to ``root``.
        image_suffix: file-name ending of images (``.jpg``, ``_leftImg8bit.png``).
        labels: label folder relative to ``root``.
        label_suffix: file-name ending of label maps.
        split: split file relative to ``root`` listing the image ids, or None (all images are used).
        reduce_zero_label: label 0 is ignored and the other labels are shifted down by one.
        num_images: size of the full validation split (None: not known, ``dataset=folder``).
        ignore_index: label value in the files that is not scored (255; ``dataset=folder`` may name another).
        strict: every image must have its label, else the split cannot be used (the benchmarks). False
            (``dataset=folder``): only images with a label are used; the others are listed by
            :func:`lposs_lab.lab.data.folder.unpaired_files`.
        vocabulary: which names ``classes`` holds: ``default`` (these), ``plain``, ``first`` or a file
            (:mod:`lposs_lab.lab.data.vocabulary`).
    """

    name: str
    classes: tuple[str, ...]
    root: str
    images: str
    image_suffix: str
    labels: str
    label_suffix: str
    split: str | None
    reduce_zero_label: bool
    num_images: int | None
    ignore_index: int = IGNORE_INDEX
    strict: bool = True
    vocabulary: str = "default"

    @property
    def num_classes(self) -> int:
        """Number of classes scored (after ``reduce_zero_label``)."""
        return len(self.classes)

    @property
    def background(self) -> int | None:
        """Index of the background class (VOC, Context, COCO-Object: 0), None for sets without one."""
        return 0 if self.name in _WITH_BACKGROUND else None

    def layout(self, root: str | None = None) -> str:
        """The expected folder layout, e.g. ``<root>/{JPEGImages,SegmentationClass,ImageSets/...}``."""
        parts = [self.images, self.labels] + ([self.split] if self.split else [])
        return f"{root or '<root>'}/{{{','.join(parts)}}}"


def _load_benchmarks() -> dict[str, BenchmarkInfo]:
    raw = json.loads(_JSON_PATH.read_text())["benchmarks"]
    out = {}
    for name, d in raw.items():
        out[name] = BenchmarkInfo(
            name=name,
            classes=tuple(d["classes"]),
            root=d["root"],
            images=d["images"],
            image_suffix=d["image_suffix"],
            labels=d["labels"],
            label_suffix=d["label_suffix"],
            split=d.get("split"),
            reduce_zero_label=bool(d["reduce_zero_label"]),
            num_images=int(d["num_images"]),
        )
        if "num_classes" in d and int(d["num_classes"]) != len(out[name].classes):
            raise RuntimeError(
                f"benchmarks.json: {name} lists {len(d['classes'])} classes, not {d['num_classes']}"
            )
    return out


BENCHMARKS: dict[str, BenchmarkInfo] = _load_benchmarks()


def get_benchmark(name: str | BenchmarkInfo) -> BenchmarkInfo:
    """Look up a benchmark by name.

    Raises:
        ConfigError: unknown name; the message lists the valid names.
    """
    if isinstance(name, BenchmarkInfo):
        return name
    if name not in BENCHMARKS:
        raise ConfigError(
            f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)} (dataset=NAME)"
        )
    return BENCHMARKS[name]


def resolve_root(info: BenchmarkInfo, data_root: str | os.PathLike) -> Path:
    """Find the benchmark folder under ``data_root``.

    Tries ``data_root/<root>``, then ``data_root/<last part of root>`` (MMSeg's ADE20k may sit at
    ``ade/ADEChallengeData2016`` or ``ADEChallengeData2016``), then ``data_root`` itself.

    Raises:
        DatasetError: none of them holds the image folder; names the missing folder and the layout.
    """
    data_root = Path(data_root)
    primary = data_root / info.root
    fix = (
        f"create it with: python -m lposs_lab.lab.data.prepare {info.name} --root {data_root} (or add "
        "dataset.download=true), or point to where it is with $LPOSS_DATA_DIR or paths.data_dir=DIR (the "
        "folder holding it); see docs/reproduce.md"
    )
    if not data_root.is_dir():
        raise DatasetError(
            f"data root {data_root} not found ({info.name} expected as {info.layout(str(primary))}); {fix}"
        )
    candidates = [primary, data_root / Path(info.root).name, data_root]
    for cand in candidates:
        if (cand / info.images).is_dir():
            return cand
    raise DatasetError(
        f"{primary / info.images} not found; expected the MMSegmentation layout {info.layout(str(primary))} "
        f"for {info.name} in the data folder {data_root}; {fix}"
    )


def _split_ids(split_file: Path) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for line in split_file.read_text().splitlines():
        key = line.strip()
        if key and key not in seen:
            seen.add(key)
            ids.append(key)
    return ids


def find_samples(info: BenchmarkInfo, data_root: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """List the ``(id, image_path, label_path)`` triples of a benchmark's validation split, sorted by id.

    Ids are image paths relative to the image folder without the image suffix
    (``frankfurt/frankfurt_000000_000294`` for Cityscapes). With a split file the ids come from it;
    otherwise every image with the suffix is used (searched recursively). A description that is not
    ``strict`` (``dataset=folder``) keeps only the images that have a label instead of refusing the split.

    Raises:
        DatasetError: a folder, the split file or a label file is missing, or no image is found (not
            ``strict``: no image has a label).
    """
    root = resolve_root(info, data_root)
    img_dir, lbl_dir = root / info.images, root / info.labels
    if not lbl_dir.is_dir():
        raise DatasetError(
            f"{lbl_dir} not found; expected the MMSegmentation layout {info.layout(str(root))}"
        )
    if info.split:
        split_file = root / info.split
        if not split_file.is_file():
            raise DatasetError(
                f"{split_file} not found; expected the MMSegmentation layout {info.layout(str(root))}"
            )
        ids = sorted(_split_ids(split_file))
        if not ids:
            raise DatasetError(f"split file {split_file} lists no image ids")
        samples = []
        for key in ids:
            img = img_dir / f"{key}{info.image_suffix}"
            if not img.is_file():
                if not info.strict:
                    continue
                raise DatasetError(f"image {img} listed in {split_file} not found")
            samples.append((key, img, lbl_dir / f"{key}{info.label_suffix}"))
    else:
        found = []
        skip = info.label_suffix if labels_among_images(info, img_dir, lbl_dir) else None
        for img in img_dir.rglob(f"*{info.image_suffix}"):
            if img.is_file() and not (skip and img.name.endswith(skip)):
                rel = img.relative_to(img_dir).as_posix()
                found.append((rel[: -len(info.image_suffix)], img))
        if not found:
            raise DatasetError(f"no images ending in {info.image_suffix!r} under {img_dir}")
        found.sort()
        samples = [(key, img, lbl_dir / f"{key}{info.label_suffix}") for key, img in found]
    if not info.strict:
        samples = [s for s in samples if s[2].is_file()]
        if not samples:
            raise DatasetError(
                f"no image under {img_dir} has a label <id>{info.label_suffix} under {lbl_dir}; check "
                "dataset.image_suffix and dataset.label_suffix"
            )
    for key, _, lbl in samples:
        if not lbl.is_file():
            raise DatasetError(
                f"label {lbl} for image {key!r} not found (expected <labels>/<id>{info.label_suffix})"
            )
    return samples


def labels_among_images(info: BenchmarkInfo, img_dir: Path, lbl_dir: Path) -> bool:
    """Whether files ending in the label suffix found under the image folder are label maps, not images:
    images and labels share one folder and the label suffix ends like the image suffix (``.png`` images,
    ``_mask.png`` labels)."""
    return (
        info.label_suffix != info.image_suffix
        and info.label_suffix.endswith(info.image_suffix)
        and img_dir.resolve() == lbl_dir.resolve()
    )


def encode_label(
    raw: np.ndarray, num_classes: int, *, reduce_zero: bool = False, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, int | None]:
    """A label map as read from its file -> the scored classes ``0..C-1`` and :data:`IGNORE_INDEX`.

    ``ignore_index`` pixels are ignored; with ``reduce_zero`` so are the 0 pixels and every other value
    is shifted down by one (MMSeg's ``reduce_zero_label``). With the defaults this equals
    :func:`reduce_zero_label` (or the map itself) for every valid label map.

    Args:
        raw: ``[H, W]`` integer label map as stored.
        num_classes: C, the number of classes scored.

    Returns:
        ``(label, bad)``: the ``[H, W]`` uint8 map, and the first value (after the shift) that is not a
        class, or None when every value is valid.
    """
    if raw.ndim != 2:
        raise ValueError(f"label map must be [H, W], got shape {raw.shape}")
    arr = raw.astype(np.int64)
    ignored = arr == ignore_index
    if reduce_zero:
        ignored |= arr == 0
        arr = arr - 1
    wrong = ~ignored & ((arr < 0) | (arr >= num_classes))
    bad = int(arr[wrong][0]) if wrong.any() else None
    arr[ignored | wrong] = IGNORE_INDEX
    return arr.astype(np.uint8), bad


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """MMSeg's ``reduce_zero_label``: 0 -> 255 (ignore), every other label minus one, 255 stays 255.

    Args:
        label: ``[H, W]`` integer label map.

    Returns:
        ``[H, W]`` uint8 label map.
    """
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_label(path: str | os.PathLike, reduce_zero: bool = False) -> np.ndarray:
    """Read a label PNG (``L`` or palette ``P``; palette indices are the labels) to ``[H, W]`` uint8.

    Raises:
        ImageError: unreadable file, or not a single-channel 8-bit label map.
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ImageError(
                    f"label {p} has mode {img.mode}; expected a single-channel label map (L or P)"
                )
            arr = np.asarray(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot decode label {p}: {msg}") from None
    if arr.ndim != 2:
        raise ImageError(f"label {p} has shape {arr.shape}; expected [H, W]")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ImageError(f"label {p} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return reduce_zero_label(arr) if reduce_zero else np.ascontiguousarray(arr)
