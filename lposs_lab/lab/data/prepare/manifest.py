"""The manifest (archives, their sizes/checksums/URLs, expected val counts) and the names ``prepare`` accepts.

Schema (``manifest.json`` beside this file; ``--manifest FILE`` replaces it)::

    {"archives": {"<file name>": {"urls": [...], "size": int|null, "sha256": str|null, "md5": str|null,
                                  "sha1": str|null (optional)}},
     "expected": {"<prepare name>": int}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lposs_lab.errors import ConfigError, UserError

__all__ = [
    "ALIASES",
    "NEEDS",
    "TARGETS",
    "Archive",
    "Manifest",
    "ManifestError",
    "load_manifest",
    "resolve_names",
]

_DEFAULT = Path(__file__).with_name("manifest.json")

#: what ``prepare`` builds, in the order ``all`` runs them
TARGETS: tuple[str, ...] = ("voc", "context", "coco_stuff", "ade20k", "cityscapes")

#: ``dataset=`` names that another target writes (coco_object: coco_stuff writes both label sets)
ALIASES: dict[str, str] = {"voc20": "voc", "context59": "context", "coco_object": "coco_stuff"}

#: the archives each target reads
NEEDS: dict[str, tuple[str, ...]] = {
    "voc": ("VOCtrainval_11-May-2012.tar",),
    "context": ("VOCtrainval_03-May-2010.tar", "trainval_merged.json"),
    "coco_stuff": ("val2017.zip", "stuffthingmaps_trainval2017.zip"),
    "ade20k": ("ADEChallengeData2016.zip",),
    "cityscapes": ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"),
}

_HASHES = ("sha256", "sha1", "md5")


class ManifestError(UserError, ValueError):
    """A manifest file that cannot be read or does not follow the schema."""


@dataclass(frozen=True)
class Archive:
    """One downloadable file: its name, where to get it, and what it must be."""

    name: str
    urls: tuple[str, ...]
    size: int | None
    hashes: dict[str, str]  # algorithm -> lowercase hex digest, only the published ones
    approx_size: str | None = None
    login: str | None = None

    def describe_size(self) -> str:
        if self.size is not None:
            return f"{self.size:,} bytes"
        return self.approx_size or "size not published"


@dataclass(frozen=True)
class Manifest:
    archives: dict[str, Archive]
    expected: dict[str, int]
    source: str

    def archive(self, name: str) -> Archive:
        if name not in self.archives:
            raise ManifestError(f"manifest {self.source} has no entry for archive {name!r}")
        return self.archives[name]


def _archive(name: str, d: object, source: str) -> Archive:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest {source}: archives.{name} must be an object")
    urls = d.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestError(f"manifest {source}: archives.{name}.urls must be a list of strings")
    size = d.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(f"manifest {source}: archives.{name}.size must be an integer >= 0 or null")
    hashes = {}
    for algo in _HASHES:
        value = d.get(algo)
        if value is None:
            continue
        if not isinstance(value, str) or not value or any(c not in "0123456789abcdefABCDEF" for c in value):
            raise ManifestError(f"manifest {source}: archives.{name}.{algo} must be a hex digest or null")
        hashes[algo] = value.lower()
    return Archive(name, tuple(urls), size, hashes, d.get("approx_size"), d.get("login"))


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and check a manifest (the packaged one when ``path`` is None).

    Raises:
        ManifestError: unreadable file, invalid JSON or a field that does not follow the schema.
    """
    p = Path(path).expanduser() if path is not None else _DEFAULT
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {p} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("archives"), dict):
        raise ManifestError(f"manifest {p} must be an object with an 'archives' object")
    expected = raw.get("expected", {})
    if not isinstance(expected, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in expected.values()
    ):
        raise ManifestError(f"manifest {p}: 'expected' must map dataset names to image counts >= 1")
    unknown = sorted(set(expected) - set(TARGETS) - set(ALIASES))
    if unknown:
        raise ManifestError(f"manifest {p}: unknown dataset(s) in 'expected': {', '.join(unknown)}")
    archives = {name: _archive(name, d, str(p)) for name, d in raw["archives"].items()}
    expected = {ALIASES.get(k, k): int(v) for k, v in expected.items()}
    return Manifest(archives, expected, str(p))


def resolve_names(names: list[str]) -> list[str]:
    """The targets (in ``TARGETS`` order, each once) that ``names`` ask for.

    Raises:
        ConfigError: an unknown name; the message lists the valid ones.
    """
    wanted: set[str] = set()
    for name in names:
        key = name.strip().lower()
        if key == "all":
            wanted.update(TARGETS)
        elif key in TARGETS:
            wanted.add(key)
        elif key in ALIASES:
            wanted.add(ALIASES[key])
        else:
            valid = ", ".join([*TARGETS, "all", *ALIASES])
            raise ConfigError(f"unknown dataset {name!r} to prepare; valid: {valid}")
    if not wanted:
        raise ConfigError(f"no dataset to prepare; name one or more of: {', '.join([*TARGETS, 'all'])}")
    return [t for t in TARGETS if t in wanted]
