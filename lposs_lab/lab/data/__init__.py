"""Benchmarks (MMSegmentation layouts), their datasets, the cached file index and COCO-Object conversion."""

from .benchmarks import (
    BENCHMARKS,
    IGNORE_INDEX,
    BenchmarkInfo,
    DatasetError,
    find_samples,
    get_benchmark,
    load_label,
    reduce_zero_label,
    resolve_root,
)

# the dataset (torch) and the file index (HF datasets) are imported on first use (PEP 562), so that the
# command line can look a benchmark folder up before any heavy import
_LAZY = {"SegmentationDataset": "dataset", "collate_samples": "dataset", "build_index": "index"}

__all__ = [
    "BENCHMARKS",
    "IGNORE_INDEX",
    "BenchmarkInfo",
    "DatasetError",
    "SegmentationDataset",
    "build_index",
    "collate_samples",
    "find_samples",
    "get_benchmark",
    "load_label",
    "reduce_zero_label",
    "resolve_root",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
