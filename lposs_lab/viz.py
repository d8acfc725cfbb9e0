"""Results you can look at: palette label PNGs and overlays with a legend."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write

__all__ = ["palette", "label_image", "overlay", "save_png"]


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), ``[n, 3]`` uint8; colour 255 is white-ish."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def label_image(labels: np.ndarray) -> Image.Image:
    """An ``[H, W]`` label map as a palette ("P") PNG image; over 256 classes give 16-bit "I;16"."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got {labels.shape}")
    if labels.max(initial=0) > 255:
        return Image.fromarray(labels.astype(np.uint16))
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette(256).reshape(-1).tolist())
    return img


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay(
    image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, alpha: float = 0.5
) -> Image.Image:
    """Blend the colour-coded labels over the image and append a legend of the classes present.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        labels: ``[H, W]`` class indices.
        class_names: names of the classes.

    Returns:
        An RGB image: the blend on the left, the legend (classes present, by area) on the right.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette(max(256, len(class_names)))
    colour = colours[np.asarray(labels, dtype=np.int64) % len(colours)]
    blend = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(
        np.uint8
    )
    h, w = labels.shape
    ids, counts = np.unique(labels, return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts, kind="stable")]]
    font_size = int(np.clip(h / 30, 10, 28))
    font = _font(font_size)
    row = font_size + 6
    rows = max(1, len(present))
    width = max(int(font.getlength(class_names[i] if i < len(class_names) else str(i))) for i in present)
    legend_w = width + row + 24
    canvas = Image.new("RGB", (w + legend_w, max(h, rows * row + 12)), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, i in enumerate(present):
        y = 6 + n * row
        draw.rectangle(
            [w + 8, y, w + 8 + font_size, y + font_size],
            fill=tuple(int(v) for v in colours[i]),
            outline=(0, 0, 0),
        )
        name = class_names[i] if i < len(class_names) else str(i)
        draw.text((w + 16 + font_size, y), name, fill=(0, 0, 0), font=font)
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Write ``img`` as PNG atomically (temporary file, then rename)."""
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
