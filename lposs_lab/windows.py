"""Resize, sliding-window geometry and the stitching of per-window scores (docs/method.md §1, §3, §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .image_io import to_rgb_uint8

__all__ = [
    "Window",
    "resized_shape",
    "resize_image",
    "resized_image_tensor",
    "window_grid",
    "crop_windows",
    "patch_positions",
    "stitch_windows",
    "resize_argmax",
]


@dataclass(frozen=True)
class Window:
    """A window ``[y1:y2, x1:x2]`` of the resized image, in pixels."""

    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def width(self) -> int:
        return self.x2 - self.x1


def resized_shape(height: int, width: int, short_side: int = 448, long_side: int = 2048) -> tuple[int, int]:
    """Target ``(h, w)``: ``s = min(long_side / long, short_side / short)``, sides ``int(side * s + 0.5)``.

    Sides are at least 1 (ours: the published code never meets such extreme aspect ratios).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    s = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * s + 0.5)), max(1, int(width * s + 0.5))


def resize_image(image: np.ndarray, short_side: int = 448, long_side: int = 2048) -> np.ndarray:
    """Resize an ``[H, W, 3]`` uint8 image with OpenCV's bilinear (no antialiasing), staying uint8."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    h, w = resized_shape(image.shape[0], image.shape[1], short_side, long_side)
    if (h, w) == image.shape[:2]:
        return image.copy()
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def resized_image_tensor(
    image: Any,
    *,
    short_side: int = 448,
    long_side: int = 2048,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, tuple[int, int]]:
    """Decode any image input and resize it as docs/method.md §1 does: the predictor's (and refine's) input.

    Args:
        image: any input :func:`lposs_lab.image_io.to_rgb_uint8` accepts.

    Returns:
        ``(image [3, h, w] float32 in [0, 1] on device, (H, W) of the input)``.
    """
    rgb = to_rgb_uint8(image)
    resized = resize_image(rgb, short_side, long_side)
    img = torch.from_numpy(resized).to(device).permute(2, 0, 1).contiguous().float() / 255.0
    return img, (int(rgb.shape[0]), int(rgb.shape[1]))


def _axis_starts(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    n = max(length - size + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + size, length)
        spans.append((max(end - size, 0), end))
    return spans


def window_grid(height: int, width: int, size: int = 224, stride: int = 112) -> list[Window]:
    """Sliding windows in row-major order; ``size <= 0`` gives one window over the whole image."""
    if size <= 0:
        return [Window(0, height, 0, width)]
    if stride <= 0:
        raise ValueError(f"window stride must be > 0, got {stride}")
    return [
        Window(y1, y2, x1, x2)
        for y1, y2 in _axis_starts(height, size, stride)
        for x1, x2 in _axis_starts(width, size, stride)
    ]


def crop_windows(image: Tensor, windows: list[Window]) -> Tensor:
    """Stack the window crops of ``image [3, H, W]`` into ``[B, 3, h, w]`` (all windows share a size)."""
    sizes = {(w.height, w.width) for w in windows}
    if len(sizes) != 1:
        raise ValueError(f"windows of different sizes cannot be stacked: {sorted(sizes)}")
    return torch.stack([image[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])


def patch_positions(windows: list[Window], grid: tuple[int, int], patch: int, device=None) -> Tensor:
    """Patch centres ``(y, x)`` in pixels of every window's ``grid`` cell, row-major: ``[B * gh * gw, 2]``."""
    gh, gw = grid
    rows = torch.arange(gh, device=device, dtype=torch.float32) * patch + patch / 2
    cols = torch.arange(gw, device=device, dtype=torch.float32) * patch + patch / 2
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    local = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)
    origin = torch.tensor([[w.y1, w.x1] for w in windows], dtype=torch.float32)
    origin = origin.to(rows.device, non_blocking=True)  # staged: no wait for the device's queued work
    return (origin[:, None, :] + local[None]).reshape(-1, 2)


def stitch_windows(scores: Tensor, windows: list[Window], height: int, width: int) -> Tensor:
    """Average per-window score grids onto the image canvas.

    Each window's grid ``[C, gh, gw]`` is bilinearly upsampled (align_corners=False) onto the
    window's pixels — a padded grid is stretched, not cropped — summed, and divided by the number
    of windows covering each pixel.

    Args:
        scores: ``[B, C, gh, gw]``, one grid per window.

    Returns:
        ``[C, height, width]``.
    """
    if scores.ndim != 4 or scores.shape[0] != len(windows):
        raise ValueError(f"scores must be [B={len(windows)}, C, gh, gw], got {tuple(scores.shape)}")
    c = scores.shape[1]
    canvas = scores.new_zeros((c, height, width))
    count = scores.new_zeros((1, height, width))
    for grid, w in zip(scores, windows, strict=True):
        up = F.interpolate(grid[None], size=(w.height, w.width), mode="bilinear", align_corners=False)[0]
        canvas[:, w.y1 : w.y2, w.x1 : w.x2] += up
        count[:, w.y1 : w.y2, w.x1 : w.x2] += 1
    return canvas / count.clamp(min=1)


def resize_argmax(
    scores: Tensor, height: int, width: int, *, max_elements: int = 1 << 26
) -> tuple[Tensor, Tensor]:
    """Bilinear resize (align_corners=False) of ``scores [C, h, w]`` to ``(height, width)``, then argmax.

    Classes are resized in chunks so memory stays below ``max_elements`` floats whatever ``C``.

    Returns:
        ``(labels [height, width] int64, best score [height, width])``.
    """
    c = scores.shape[0]
    chunk = max(1, min(c, max_elements // max(height * width, 1)))
    best = labels = None
    for start in range(0, c, chunk):
        part = scores[start : start + chunk]
        if part.shape[1:] != (height, width):
            part = F.interpolate(part[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        value, index = part.max(dim=0)
        index = index + start
        if best is None:
            best, labels = value, index
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index, labels)
    return labels, best
