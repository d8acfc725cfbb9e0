"""A benchmark split as a torch ``Dataset`` of decoded image/label pairs (bad files reported, not dropped)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lposs_lab.image_io import ImageError, load_image

from .benchmarks import BenchmarkInfo, DatasetError, encode_label, find_samples, get_benchmark, load_label
from .index import build_index

__all__ = ["SegmentationDataset", "collate_samples"]


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label pairs of one benchmark's validation split under ``data_root``.

    Samples are dicts ``{"id": str, "image": uint8 [H, W, 3] or None, "label": uint8 [H, W] or None,
    "path": str, "label_path": str}``, with labels after ``reduce_zero_label`` (ignore index 255). A sample
    whose image or label cannot be decoded is not dropped: it comes back with ``"error": "<reason>"`` and
    None for the part that failed, so the caller can count and report it.

    Args:
        benchmark: benchmark name or :class:`BenchmarkInfo`.
        data_root: folder holding the MMSeg layout (e.g. the folder with ``VOCdevkit/``).
        limit: keep only the first ``limit`` samples (after ``ids``).
        ids: keep only these ids, in this order.
        index_cache_dir: if given, the file list comes from a cached HF ``datasets`` index
            (see :func:`lposs_lab.lab.data.index.build_index`).

    Raises:
        DatasetError: missing folder, split file or label file; unknown ids; bad ``limit``.
    """

    def __init__(
        self,
        benchmark: str | BenchmarkInfo,
        data_root: str | os.PathLike,
        *,
        limit: int | None = None,
        ids: Sequence[str] | None = None,
        index_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.info = get_benchmark(benchmark)
        self.data_root = Path(data_root)
        self.sizes: dict[str, tuple[int, int]] = {}
        if index_cache_dir is not None:
            index = build_index(self.info, self.data_root, index_cache_dir)
            cols = index.to_dict()
            samples = [
                (k, Path(i), Path(lb))
                for k, i, lb in zip(cols["id"], cols["image_path"], cols["label_path"], strict=True)
            ]
            self.sizes = {
                k: (h, w) for k, h, w in zip(cols["id"], cols["height"], cols["width"], strict=True)
            }
        else:
            samples = find_samples(self.info, self.data_root)
        if ids is not None:
            by_id = {s[0]: s for s in samples}
            unknown = [k for k in ids if k not in by_id]
            if unknown:
                raise DatasetError(
                    f"{len(unknown)} id(s) not in {self.info.name} under {self.data_root}: "
                    f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
                )
            samples = [by_id[k] for k in ids]
        if limit is not None:
            if limit < 0:
                raise DatasetError(f"limit must be >= 0, got {limit}")
            samples = samples[:limit]
        self.samples: list[tuple[str, Path, Path]] = samples

    @property
    def ids(self) -> list[str]:
        """Sample ids in dataset order."""
        return [s[0] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        key, img_path, lbl_path = self.samples[idx]
        sample: dict[str, Any] = {
            "id": key,
            "image": None,
            "label": None,
            "path": str(img_path),
            "label_path": str(lbl_path),
        }
        errors = []
        try:
            sample["image"] = load_image(img_path)
        except ImageError as exc:
            errors.append(str(exc))
        try:
            raw = load_label(lbl_path)
        except ImageError as exc:
            errors.append(str(exc))
        else:
            info = self.info
            label, bad = encode_label(
                raw, info.num_classes, reduce_zero=info.reduce_zero_label, ignore_index=info.ignore_index
            )
            if bad is None:
                sample["label"] = label
            else:
                stored = f" (stored as {bad + 1}, before reduce_zero_label)" if info.reduce_zero_label else ""
                errors.append(
                    f"label {lbl_path} holds value {bad}{stored}; valid: 0..{info.num_classes - 1} "
                    f"(after reduce_zero_label) or {info.ignore_index} (ignore)"
                )
        if not errors and sample["image"].shape[:2] != sample["label"].shape:
            errors.append(
                f"image {img_path} is {sample['image'].shape[0]}x{sample['image'].shape[1]} but its label is "
                f"{sample['label'].shape[0]}x{sample['label'].shape[1]}"
            )
            sample["image"] = None
        if errors:
            sample["error"] = "; ".join(errors)
        return sample

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.info.name!r}, {str(self.data_root)!r}, n={len(self)})"


def collate_samples(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader ``collate_fn`` keeping samples as a list (images differ in size; failed ones hold None)."""
    return list(batch)
