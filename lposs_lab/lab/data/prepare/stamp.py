"""The stamp a finished target leaves: its inputs' checksums, its counts and the converter version.

A rerun that finds a valid stamp does nothing: no request, no file read from an archive, none rewritten.
The stamp is ``<benchmark folder>/lposs_prepare.json`` (e.g. ``VOCdevkit/VOC2012/lposs_prepare.json``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lposs_lab.files import atomic_write

from ..benchmarks import get_benchmark
from .manifest import NEEDS, Manifest
from .verify import BENCHMARKS_OF

__all__ = ["CONVERTER_VERSION", "STAMP_NAME", "stamp_path", "read_valid_stamp", "write_stamp"]

#: bump when a conversion changes what it writes (older stamps then no longer count)
CONVERTER_VERSION = "1"
STAMP_NAME = "lposs_prepare.json"


def stamp_path(target: str, data_root: Path) -> Path:
    return data_root / get_benchmark(BENCHMARKS_OF[target][0]).root / STAMP_NAME


def _options(target: str, from_polygons: bool) -> dict[str, Any]:
    return {"cityscapes_from_polygons": bool(from_polygons)} if target == "cityscapes" else {}


def read_valid_stamp(
    target: str, data_root: Path, manifest: Manifest, from_polygons: bool = False
) -> dict[str, Any] | None:
    """The target's stamp if it still describes what would be built now, else None.

    Valid means: same converter version and options, inputs that agree with the manifest's published size
    and checksums, the expected image count for every benchmark served, and their folders still present.
    """
    path = stamp_path(target, data_root)
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("converter_version") != CONVERTER_VERSION:
        return None
    if stamp.get("options") != _options(target, from_polygons):
        return None
    inputs = stamp.get("inputs", {})
    for name in NEEDS[target]:
        have = inputs.get(name)
        if not isinstance(have, dict) or name not in manifest.archives:
            return None
        want = manifest.archives[name]
        if want.size is not None and have.get("size") != want.size:
            return None
        if any(have.get(algo) not in (None, digest) for algo, digest in want.hashes.items()):
            return None
        if any(algo not in have for algo in want.hashes):
            return None
    counts = stamp.get("counts", {})
    expected = manifest.expected.get(target)
    for bench in BENCHMARKS_OF[target]:
        if bench not in counts or (expected is not None and counts[bench] != expected):
            return None
        info = get_benchmark(bench)
        base = data_root / info.root
        if not (base / info.images).is_dir() or not (base / info.labels).is_dir():
            return None
    return stamp


def write_stamp(
    target: str,
    data_root: Path,
    inputs: dict[str, dict[str, Any]],
    counts: dict[str, int],
    from_polygons: bool = False,
) -> Path:
    """Write the stamp atomically (the last step of a target: its presence means the target is complete)."""
    path = stamp_path(target, data_root)
    stamp = {
        "dataset": target,
        "converter_version": CONVERTER_VERSION,
        "options": _options(target, from_polygons),
        "inputs": {name: inputs[name] for name in NEEDS[target]},
        "counts": counts,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_write(path, "w") as fh:
        json.dump(stamp, fh, indent=1)
    return path
