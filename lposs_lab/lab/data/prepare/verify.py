"""Check a prepared target as the lab will read it: counts, image/label pairs of equal size, label values.

The samples come from :func:`lposs_lab.lab.data.benchmarks.find_samples`, the function evaluation uses, so
a target that passes here is one ``dataset=NAME`` can read.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..benchmarks import IGNORE_INDEX, BenchmarkInfo, DatasetError, find_samples, get_benchmark, resolve_root

__all__ = ["BENCHMARKS_OF", "allowed_values", "check_pair", "verify_target"]

#: the dataset= names each prepared target serves (and checks)
BENCHMARKS_OF: dict[str, tuple[str, ...]] = {
    "voc": ("voc",),
    "context": ("context",),
    "coco_stuff": ("coco_stuff", "coco_object"),
    "ade20k": ("ade20k",),
    "cityscapes": ("cityscapes",),
}


def allowed_values(info: BenchmarkInfo) -> int:
    """Raw label values a benchmark may store: ``0..n-1`` (this ``n``) and the ignore index 255."""
    return info.num_classes + (1 if info.reduce_zero_label else 0)


def check_pair(task: tuple[str, str, int]) -> str | None:
    """``None`` when image and label have the same size and every label value is allowed, else the problem."""
    img_path, lbl_path, n = task
    try:
        with Image.open(img_path) as img:
            size = img.size
        with Image.open(lbl_path) as lbl:
            lbl.load()
            if lbl.mode not in ("L", "P"):
                return f"label {lbl_path} has mode {lbl.mode}; expected a single-channel 8-bit map"
            arr = np.asarray(lbl)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot read {img_path} or {lbl_path}: {exc}"
    if (arr.shape[1], arr.shape[0]) != size:
        return f"image {img_path} is {size[0]}x{size[1]} (WxH) but its label is {arr.shape[1]}x{arr.shape[0]}"
    bad = np.unique(arr[(arr >= n) & (arr != IGNORE_INDEX)])
    if bad.size:
        return f"label {lbl_path} holds value(s) {bad[:5].tolist()}; allowed: 0..{n - 1} and {IGNORE_INDEX}"
    return None


def _orphans(info: BenchmarkInfo, root: Path, ids: set[str]) -> list[str]:
    """Label files (of a layout without a split file) that have no image."""
    lbl_dir = root / info.labels
    out = []
    for p in lbl_dir.rglob(f"*{info.label_suffix}"):
        key = p.relative_to(lbl_dir).as_posix()[: -len(info.label_suffix)]
        if key not in ids:
            out.append(str(p))
    return sorted(out)


def verify_target(target: str, data_root: Path, expected: int | None, workers: int = 1) -> dict[str, int]:
    """Check every benchmark a target serves; return ``{dataset name: image count}``.

    Raises:
        DatasetError: a count that differs from ``expected``, a label without image (or the reverse), a size
            mismatch or a label value outside the benchmark's set (one line naming what is wrong).
    """
    counts: dict[str, int] = {}
    for name in BENCHMARKS_OF[target]:
        info = get_benchmark(name)
        samples = find_samples(info, data_root)  # names a missing label, image or split file
        if not info.split:
            orphans = _orphans(info, resolve_root(info, data_root), {k for k, _, _ in samples})
            if orphans:
                raise DatasetError(
                    f"{name}: {len(orphans)} label(s) without an image, e.g. {orphans[0]}; the image archive "
                    "is incomplete or from another release"
                )
        if expected is not None and len(samples) != expected:
            raise DatasetError(
                f"{name}: {len(samples)} validation images under {data_root}, expected {expected}; "
                "an archive is incomplete or from another release (rerun with --force after replacing it)"
            )
        n = allowed_values(info)
        tasks = [(str(i), str(lb), n) for _, i, lb in samples]
        if workers > 1 and len(tasks) >= 4 * workers:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                problems = list(pool.map(check_pair, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
        else:
            problems = [check_pair(t) for t in tasks]
        found = [p for p in problems if p]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise DatasetError(f"{name}: {found[0]}{more}")
        counts[name] = len(samples)
    return counts
