"""Benchmarks (MMSegmentation layouts), their datasets, the cached file index and COCO-Object conversion."""

from .benchmarks import (
    BENCHMARKS,
    IGNORE_INDEX,
    BenchmarkInfo,
    DatasetError,
    SegmentationDataset,
    collate_samples,
    find_samples,
    get_benchmark,
    load_label,
    reduce_zero_label,
    resolve_root,
)

__all__ = [
    "BENCHMARKS",
    "IGNORE_INDEX",
    "BenchmarkInfo",
    "DatasetError",
    "SegmentationDataset",
    "build_index",
    "collate_samples",
    "convert_coco_stuff_to_object",
    "find_samples",
    "get_benchmark",
    "load_label",
    "reduce_zero_label",
    "resolve_root",
]


def __getattr__(name: str):
    # the HF `datasets` import is slow: only when the index is asked for
    if name == "build_index":
        from .index import build_index

        return build_index
    if (
        name == "convert_coco_stuff_to_object"
    ):  # not imported eagerly: `python -m` runs that module as __main__
        from .coco_object import convert_coco_stuff_to_object

        return convert_coco_stuff_to_object
    raise AttributeError(f"module 'lposs_lab.data' has no attribute {name!r}")
