"""Your own data as one more benchmark: ``dataset=folder`` describes an image folder and a label folder.

    python run.py dataset=folder dataset.images=photos dataset.labels=masks dataset.classes=classes.txt

:func:`folder_benchmark` turns that description into a :class:`BenchmarkInfo` like the 8 benchmarks', so it
is evaluated by the same dataset, metrics, records, cache and tasks. Differences from a benchmark: it is not
``strict`` (images without a label and labels without an image are left out and listed by
:func:`unpaired_files`, not refused) and its ``ignore_index`` may be another value than 255.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lposs_lab.errors import ConfigError
from lposs_lab.inputs import parse_classes

from .benchmarks import IGNORE_INDEX, BenchmarkInfo, DatasetError, labels_among_images
from .vocabulary import read_class_file

__all__ = ["FOLDER", "Unpaired", "folder_benchmark", "unpaired_files"]

#: the benchmark name of ``dataset=folder`` (``results.json``'s ``dataset``)
FOLDER = "folder"

#: how many names of unpaired files a warning shows
SHOWN = 5


def _classes(classes: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...]:
    """A class file (one class a line) or an inline list (``[cat, dog;puppy]`` or ``"cat,dog;puppy"``)."""
    if classes is None or (isinstance(classes, str) and not classes.strip()):
        raise ConfigError(
            "dataset=folder needs its classes: dataset.classes=FILE (one class a line, ';' between synonyms) "
            "or an inline list dataset.classes=[background,cat,dog]"
        )
    if isinstance(classes, os.PathLike) or (isinstance(classes, str) and Path(classes).is_file()):
        return tuple(read_class_file(classes, "dataset.classes file"))
    if isinstance(classes, str) and "," not in classes:
        return tuple(read_class_file(classes, "dataset.classes file"))  # a file that does not exist: named
    return tuple(parse_classes(classes))


def folder_benchmark(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    classes: str | os.PathLike | Sequence[str] | None,
    *,
    image_suffix: str = ".jpg",
    label_suffix: str = ".png",
    ignore_index: int = IGNORE_INDEX,
    reduce_zero_label: bool = False,
    split: str | os.PathLike | None = None,
) -> BenchmarkInfo:
    """The benchmark description of an image folder and a label folder (absolute paths are kept as given).

    Label ``<labels>/<id><label_suffix>`` belongs to image ``<images>/<id><image_suffix>`` (ids may hold
    sub-folders). Label values are classes ``0..C-1`` (``reduce_zero_label``: ``1..C``, 0 ignored) and
    ``ignore_index``.

    Use the returned info with ``data_root=`` the image folder (its ``root`` is ``""``).

    Raises:
        ConfigError: no or bad classes, more than 255 classes, a bad ``ignore_index`` or suffix.
        DatasetError: a folder or the split file is missing, or a folder holds no file with its suffix.
    """
    names = _classes(classes)
    if len(names) > IGNORE_INDEX:
        raise ConfigError(f"dataset.classes lists {len(names)} classes; at most {IGNORE_INDEX} are supported")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise ConfigError(f"dataset.ignore_index={ignore_index!r} is out of range; valid: an integer 0..255")
    for key, suffix in (("image_suffix", image_suffix), ("label_suffix", label_suffix)):
        if not isinstance(suffix, str) or not suffix or "/" in suffix:
            raise ConfigError(f"dataset.{key}={suffix!r} is not a file-name ending; e.g. .jpg or _mask.png")
    img_dir, lbl_dir = Path(images), Path(labels)
    for key, folder, suffix in (("images", img_dir, image_suffix), ("labels", lbl_dir, label_suffix)):
        if not folder.is_dir():
            raise DatasetError(f"dataset.{key}={folder} is not a folder; pass the folder of your {key}")
        if next(_files(folder, suffix), None) is None:
            raise DatasetError(
                f"dataset.{key}={folder} holds no file ending in {suffix!r}{_hint(folder, key)}"
            )
    split_file = None
    if split is not None:
        split_file = Path(split)
        if not split_file.is_file():
            raise DatasetError(
                f"dataset.split={split_file} not found; pass a text file with one image id a line"
            )
    return BenchmarkInfo(
        name=FOLDER,
        classes=names,
        root="",
        images=str(img_dir.resolve()),
        image_suffix=image_suffix,
        labels=str(lbl_dir.resolve()),
        label_suffix=label_suffix,
        split=None if split_file is None else str(split_file.resolve()),
        reduce_zero_label=bool(reduce_zero_label),
        num_images=None,
        ignore_index=ignore_index,
        strict=False,
    )


def _files(folder: Path, suffix: str):
    return (p for p in folder.rglob(f"*{suffix}") if p.is_file())


def _hint(folder: Path, key: str) -> str:
    """``" (it holds 12 '.png' files: pass dataset.image_suffix=.png)"`` when other files are there."""
    counts: dict[str, int] = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix:
            counts[p.suffix] = counts.get(p.suffix, 0) + 1
    if not counts:
        return " (it is empty)"
    ext, n = max(counts.items(), key=lambda kv: kv[1])
    option = "image_suffix" if key == "images" else "label_suffix"
    return f" (it holds {n} {ext!r} file(s): pass dataset.{option}={ext})"


@dataclass(frozen=True)
class Unpaired:
    """Files of a folder dataset that are not scored: ids of images without a label, of labels without an
    image (with a split file: listed ids whose image is missing)."""

    images_without_label: tuple[str, ...]
    labels_without_image: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.images_without_label or self.labels_without_image)

    def message(self) -> str:
        """One line with the counts and the first few ids of each kind."""

        def few(ids: Sequence[str]) -> str:
            more = f", ... ({len(ids) - SHOWN} more)" if len(ids) > SHOWN else ""
            return ", ".join(ids[:SHOWN]) + more

        parts = []
        if self.images_without_label:
            ids = self.images_without_label
            parts.append(f"{len(ids)} image(s) without a label ({few(ids)})")
        if self.labels_without_image:
            ids = self.labels_without_image
            parts.append(f"{len(ids)} label(s) without an image ({few(ids)})")
        return "; ".join(parts) + " are not scored"


def _ids(folder: Path, suffix: str, skip: str | None = None) -> set[str]:
    """Ids of the files ending in ``suffix`` under ``folder``, leaving out those ending in ``skip``."""
    out = set()
    for p in _files(folder, suffix):
        if skip and p.name.endswith(skip):
            continue
        rel = p.relative_to(folder).as_posix()
        out.add(rel[: -len(suffix)])
    return out


def unpaired_files(info: BenchmarkInfo) -> Unpaired:
    """The images and labels of a :func:`folder_benchmark` that have no partner (sorted ids)."""
    img_dir, lbl_dir = Path(info.images), Path(info.labels)
    skip = info.label_suffix if labels_among_images(info, img_dir, lbl_dir) else None
    images = _ids(img_dir, info.image_suffix, skip)
    labels = _ids(lbl_dir, info.label_suffix)
    if info.split:
        wanted = {ln.strip() for ln in Path(info.split).read_text().splitlines() if ln.strip()}
        return Unpaired(
            tuple(sorted((images & wanted) - labels)), tuple(sorted(wanted - images))
        )
    return Unpaired(tuple(sorted(images - labels)), tuple(sorted(labels - images)))
