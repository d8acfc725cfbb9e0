"""Vocabularies: which class names a benchmark's classes are given to the text encoder as.

``dataset.vocabulary=`` chooses one:

- ``default``: the lab's names (``benchmarks.json``), ``;`` separating synonyms whose scores are max-reduced;
- ``plain``: the dataset's own class names as its MMSegmentation dataset class lists them, one name per class,
  no synonyms (``vocabularies.json`` beside this file, each list with its ``source``);
- ``first``: the first synonym of each default name only;
- a file: one class a line (``;`` synonyms allowed; blank lines are skipped), as many classes as the
  benchmark scores, in its label order.

The label maps do not change: only the names do, so the same per-image counts are scored under every
vocabulary, and per-class result keys use the vocabulary's first names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lposs_lab.errors import ConfigError
from lposs_lab.inputs import parse_classes

from .benchmarks import BENCHMARKS, BenchmarkInfo

__all__ = [
    "VOCABULARIES",
    "PLAIN_SOURCES",
    "plain_names",
    "read_class_file",
    "vocabulary_classes",
    "with_vocabulary",
]

#: the named vocabularies; anything else is read as a file
VOCABULARIES: tuple[str, ...] = ("default", "plain", "first")

_JSON_PATH = Path(__file__).with_name("vocabularies.json")


def _load_plain() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    raw = json.loads(_JSON_PATH.read_text())["plain"]
    for name, entry in raw.items():  # a list that does not fit its benchmark is a packaging bug
        if len(entry["classes"]) != BENCHMARKS[name].num_classes:
            raise RuntimeError(
                f"vocabularies.json: plain {name} lists {len(entry['classes'])} classes, "
                f"not {BENCHMARKS[name].num_classes}"
            )
    return (
        {name: tuple(entry["classes"]) for name, entry in raw.items()},
        {name: str(entry["source"]) for name, entry in raw.items()},
    )


_PLAIN, PLAIN_SOURCES = _load_plain()


def plain_names(benchmark: str) -> tuple[str, ...]:
    """The ``plain`` class names of one of the 8 benchmarks.

    Raises:
        ConfigError: the benchmark has none (``dataset=folder``); the message lists the valid vocabularies.
    """
    if benchmark not in _PLAIN:
        raise ConfigError(
            f"dataset.vocabulary=plain: {benchmark} has no plain vocabulary (only the 8 benchmarks do); "
            "valid: default, first, or a FILE with one class a line"
        )
    return _PLAIN[benchmark]


def read_class_file(path: str | os.PathLike, what: str = "class file") -> list[str]:
    """Class names from a text file: one class a line, ``;`` between synonyms, blank lines skipped.

    Raises:
        ConfigError: the file is missing, unreadable, empty, or names a class twice (one line each).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{what} {p} not found; pass a text file with one class a line ('cat;kitty' for synonyms)"
        )
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read {what} {p}: {reason}; it must be UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{what} {p} lists no class; write one class a line ('cat;kitty' for synonyms)")
    try:
        return parse_classes(lines)
    except ConfigError as exc:
        raise ConfigError(f"{what} {p}: {exc}") from None


def vocabulary_classes(info: BenchmarkInfo, vocabulary: str | os.PathLike) -> tuple[str, tuple[str, ...]]:
    """``(name, classes)`` of ``vocabulary`` for ``info``, whose ``classes`` are the default names.

    ``name`` is the named vocabulary, or the file's absolute path.

    Raises:
        ConfigError: not a named vocabulary and no such file, an unreadable file, or a file with another
            number of classes than the benchmark scores (the message says how many are needed).
    """
    name = str(vocabulary)
    if name == "default":
        return name, tuple(info.classes)
    if name == "first":
        return name, tuple(c.split(";")[0].strip() for c in info.classes)
    if name == "plain":
        return name, plain_names(info.name)
    path = Path(name).expanduser()
    if not path.is_file() and not (path.suffix or os.sep in name or "/" in name):
        raise ConfigError(
            f"dataset.vocabulary={name!r} is neither a vocabulary nor a file; valid: "
            f"{', '.join(VOCABULARIES)}, or a FILE with one class a line"
        )
    classes = read_class_file(path, "vocabulary file")
    need = info.num_classes
    if len(classes) != need:
        first, last = (c.split(";")[0] for c in (info.classes[0], info.classes[-1]))
        raise ConfigError(
            f"vocabulary file {path} has {len(classes)} classes; {info.name} needs {need}, one a line in "
            f"its label order (first {first!r}, last {last!r})"
        )
    return str(path.resolve()), tuple(classes)


def with_vocabulary(info: BenchmarkInfo, vocabulary: str | os.PathLike | None) -> BenchmarkInfo:
    """``info`` with the classes of ``vocabulary`` (None: ``default``) and its name in ``info.vocabulary``."""
    if vocabulary is None or str(vocabulary) == "default":
        return info
    name, classes = vocabulary_classes(info, vocabulary)
    return dataclasses.replace(info, classes=classes, vocabulary=name)
