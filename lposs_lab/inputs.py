"""What users type, checked in plain Python: class lists (``"cat,dog;puppy,sky"``) and image paths.

No numpy, PIL or torch: the command line checks ``classes=`` and ``image=`` with these before anything
heavy is imported. :mod:`lposs_lab.text` turns the synonyms into text embeddings, :mod:`lposs_lab.image_io`
decodes the images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, ImageError

__all__ = ["parse_classes", "split_synonyms", "check_image_path"]


def check_image_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it names a non-empty file (not decoded).

    Raises:
        ImageError: missing, a directory, or an empty file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"image path is a directory, not a file: {p}")
    if p.stat().st_size == 0:
        raise ImageError(f"image file is empty: {p}")
    return p


def parse_classes(value: str | Sequence[str] | None) -> list[str]:
    """The one class-list parser: ``"cat,dog;puppy,sky"`` or a sequence -> ``["cat", "dog;puppy", "sky"]``.

    ``,`` separates classes and ``;`` synonyms of one class; names are stripped. A missing or empty list,
    a blank class and two classes with the same (first) name (the second could never win the argmax) are
    :class:`lposs_lab.errors.ConfigError` with a one-line message. Synonyms may overlap other classes (the
    published COCO-Object background list holds "bed", also a class of its own).
    """
    example = 'pass classes="cat,dog;puppy,sky" (\',\' between classes, \';\' between synonyms)'
    if value is None:
        raise ConfigError(f"no classes given: {example}")
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence):
        items = [str(v) for v in value if v is not None]
    else:
        raise ConfigError(f"classes must be a string like \"cat,dog;puppy\" or a list, got {value!r}")
    classes = [";".join(part.strip() for part in str(c).split(";")).strip(";").strip() for c in items]
    if not classes or all(not c.replace(";", "").strip() for c in classes):
        raise ConfigError(f"the class list is empty: {example}")
    blank = [i for i, c in enumerate(classes) if not c.replace(";", "").strip()]
    if blank:
        raise ConfigError(f"class {blank[0] + 1} of {len(classes)} is blank in {value!r}: {example}")
    seen: dict[str, int] = {}
    for index, name in enumerate(classes):
        key = name.split(";")[0].strip().casefold()
        if key in seen:
            raise ConfigError(
                f"class {name.split(';')[0].strip()!r} is given twice "
                f"(classes {seen[key] + 1} and {index + 1} "
                f"of {value!r}); the second could never win: name each class once, with ';' for synonyms"
            )
        seen[key] = index
    return classes


def split_synonyms(classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Split class names on ``;`` into synonyms.

    Args:
        classes: C class names; ``"sky;wall;tree"`` holds three synonyms.

    Returns:
        ``(synonyms, owner)``: the flattened, stripped, non-empty synonyms (T of them) and, for each, the
        index of its class in ``classes``.

    Raises:
        ValueError: a class has no non-empty synonym, or ``classes`` is a bare string or empty.
    """
    if isinstance(classes, str):
        raise ValueError("classes must be a sequence of class names, not a single string")
    if len(classes) == 0:
        raise ValueError("classes is empty; pass at least one class name")
    synonyms: list[str] = []
    owner: list[int] = []
    for index, name in enumerate(classes):
        if not isinstance(name, str):
            raise ValueError(f"class {index} is not a string: {name!r}")
        parts = [p.strip() for p in name.split(";")]
        parts = [p for p in parts if p]
        if not parts:
            raise ValueError(f"class {index} ({name!r}) has no non-empty name; give a name or 'a;b' synonyms")
        synonyms.extend(parts)
        owner.extend([index] * len(parts))
    return synonyms, owner
