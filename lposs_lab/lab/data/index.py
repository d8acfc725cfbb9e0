"""A cached file index of a benchmark split, stored with the HF ``datasets`` library.

The index has one row per sample with columns ``id``, ``image_path``, ``label_path``, ``height``, ``width``
(sizes read from the image headers with PIL, without decoding; -1 where the header is unreadable).
It is built once per (benchmark, data root, split file / folder modification times) and saved with
``save_to_disk`` under ``cache_dir``; later calls ``load_from_disk`` it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lposs_lab.lab.data.benchmarks import BenchmarkInfo, find_samples, get_benchmark, resolve_root

if TYPE_CHECKING:
    import datasets

__all__ = ["build_index", "index_key", "index_path"]

INDEX_VERSION = 1


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path}:missing"
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"


def index_key(info: BenchmarkInfo, data_root: str | os.PathLike) -> str:
    """The string that decides when an index must be rebuilt.

    It holds the benchmark name, the resolved benchmark folder and the modification times of the split file
    (layouts with one) or of the image and label folders and their direct sub-folders (layouts without one;
    adding or removing a file changes its folder's time).
    """
    root = resolve_root(info, data_root).resolve()
    parts = [f"v{INDEX_VERSION}", info.name, str(root), info.image_suffix, info.label_suffix]
    if info.split:
        parts.append(_stamp(root / info.split))
    for folder in (root / info.images, root / info.labels):
        if info.split and folder == root / info.images:
            continue  # the split file decides which images are used
        parts.append(_stamp(folder))
        if folder.is_dir():
            parts.extend(_stamp(sub) for sub in sorted(folder.iterdir()) if sub.is_dir())
    return "\n".join(parts)


def index_path(info: BenchmarkInfo, data_root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Folder under ``cache_dir`` where the index for the current :func:`index_key` lives."""
    root = str(resolve_root(info, data_root).resolve())
    root_hash = hashlib.sha256(root.encode()).hexdigest()[:10]
    key_hash = hashlib.sha256(index_key(info, data_root).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{info.name}-{root_hash}-{key_hash}"


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            w, h = img.size
        return int(h), int(w)
    except (OSError, SyntaxError, ValueError):
        return -1, -1


def build_index(
    info: BenchmarkInfo | str, data_root: str | os.PathLike, cache_dir: str | os.PathLike
) -> datasets.Dataset:
    """Return the index of a benchmark split as a ``datasets.Dataset``, building and caching it if needed.

    Args:
        info: benchmark (or its name).
        data_root: folder holding the MMSeg layout.
        cache_dir: folder for cached indexes (created if missing).

    Returns:
        ``datasets.Dataset`` with columns ``id`` (str), ``image_path`` (str), ``label_path`` (str),
        ``height`` (int), ``width`` (int), sorted by id.

    Raises:
        DatasetError: the layout is incomplete (see :func:`find_samples`).
    """
    import datasets

    info = get_benchmark(info)
    target = index_path(info, data_root, cache_dir)
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target))

    samples = find_samples(info, data_root)
    sizes = [_header_size(img) for _, img, _ in samples]
    columns = {
        "id": [k for k, _, _ in samples],
        "image_path": [str(img.resolve()) for _, img, _ in samples],
        "label_path": [str(lbl.resolve()) for _, _, lbl in samples],
        "height": [h for h, _ in sizes],
        "width": [w for _, w in sizes],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_path": datasets.Value("string"),
            "label_path": datasets.Value("string"),
            "height": datasets.Value("int32"),
            "width": datasets.Value("int32"),
        }
    )
    ds = datasets.Dataset.from_dict(columns, features=features)

    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / "dataset_info.json").is_file():  # a concurrent builder finished meanwhile
        return datasets.load_from_disk(str(target))
    if target.exists():  # not from a rename (renames are atomic): an incomplete copy; replace it
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(tmp / "index"))
        try:
            os.rename(tmp / "index", target)
        except OSError:
            if not (target / "dataset_info.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)

    # drop stale indexes of the same benchmark folder (older split file / folder times)
    prefix = target.name.rsplit("-", 1)[0] + "-"
    for old in target.parent.glob(f"{prefix}*"):
        if old != target and old.is_dir() and not old.name.startswith("."):
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
    return datasets.load_from_disk(str(target))
