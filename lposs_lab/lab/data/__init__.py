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
from .dataset import SegmentationDataset, collate_samples
from .index import build_index

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
