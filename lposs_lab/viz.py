"""Results you can look at: palette label PNGs and overlays with a legend."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write
from .postprocess import UNKNOWN

__all__ = [
    "palette",
    "label_image",
    "overlay",
    "legend_entries",
    "legend_name",
    "save_png",
    "label_name",
    "UNKNOWN_COLOUR",
    "LEGEND_MAX_CHARS",
]

#: Neutral grey of abstaining pixels (label :data:`lposs_lab.UNKNOWN`) in overlays and legends; no class
#: of the palette has it (its greys are 0, 64, 128 and 192).
UNKNOWN_COLOUR = (160, 160, 160)


#: Longest class name shown in an overlay legend (longer names are cut with an ellipsis).
LEGEND_MAX_CHARS = 32


def _voc_colour(i: int) -> tuple[int, int, int]:
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def palette(n: int = 256) -> np.ndarray:
    """Class colours ``[n, 3]`` uint8: the PASCAL VOC colour map without its black (every class visible).

    Class colours are the VOC colours in order, skipping those darker than 64 in every channel (black
    reads as shadow in an overlay): class 0 is VOC colour 1 (dark red). Entry 255 (no class / unknown)
    is light grey. All colours are distinct.
    """
    out = np.zeros((n, 3), dtype=np.uint8)
    index = 0
    for i in range(n):
        while True:
            index += 1
            rgb = _voc_colour(index)
            if max(rgb) >= 64:
                break
        out[i] = rgb
    if n > 255:
        out[255] = UNKNOWN_COLOUR
    return out


def label_name(label: int, class_names: Sequence[str]) -> str:
    """Display name of a label value: its class name, ``"unknown"`` for :data:`UNKNOWN` beyond the classes."""
    if 0 <= label < len(class_names):
        return str(class_names[label])
    return "unknown" if label == UNKNOWN else str(label)


def _colours(n_classes: int) -> np.ndarray:
    colours = palette(max(256, n_classes))
    if n_classes <= UNKNOWN:
        colours[UNKNOWN] = UNKNOWN_COLOUR
    return colours


def legend_entries(labels: np.ndarray, class_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, colour)`` of the label values present, by decreasing area (ties: by value).

    :data:`UNKNOWN` (with at most 255 classes) is ``("unknown", UNKNOWN_COLOUR)``.
    """
    colours = _colours(len(class_names))
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts, kind="stable")]]
    return [(label_name(i, class_names), tuple(int(v) for v in colours[i % len(colours)])) for i in present]


def label_image(labels: np.ndarray) -> Image.Image:
    """An ``[H, W]`` label map as a palette ("P") PNG image; over 256 classes give 16-bit "I;16".

    Values are kept as they are: abstaining pixels stay :data:`UNKNOWN` (255, the ignore index).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got {labels.shape}")
    if labels.max(initial=0) > 255:
        return Image.fromarray(labels.astype(np.uint16))
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette(256).reshape(-1).tolist())
    return img


def legend_name(name: str, limit: int = LEGEND_MAX_CHARS) -> str:
    """``name`` cut to ``limit`` characters with an ellipsis (legends stay narrow for any class name)."""
    return name if len(name) <= limit else name[: max(1, limit - 1)].rstrip() + "\u2026"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    note: str | None = None,
) -> Image.Image:
    """Blend the colour-coded labels over the image and append a legend of the classes present.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        labels: ``[H, W]`` class indices; :data:`UNKNOWN` (255, with at most 255 classes) is drawn in
            :data:`UNKNOWN_COLOUR` and listed as ``"unknown"``.
        class_names: names of the classes (legend entries are cut to :data:`LEGEND_MAX_CHARS`).
        note: an extra last legend line, e.g. that the weights are random.

    Returns:
        An RGB image: the blend on the left, the legend (classes present, by area) on the right.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = _colours(len(class_names))
    colour = colours[np.asarray(labels, dtype=np.int64) % len(colours)]
    blend = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha + 0.5).astype(
        np.uint8
    )
    h, w = labels.shape
    entries = legend_entries(labels, class_names)
    font_size = int(np.clip(h / 30, 10, 28))
    font = _font(font_size)
    row = font_size + 6
    entries = [(legend_name(name), fill) for name, fill in entries]
    rows = max(1, len(entries)) + (1 if note else 0)
    width = max(int(font.getlength(name)) for name, _ in entries)
    if note:
        width = max(width, int(font.getlength(legend_name(note, 2 * LEGEND_MAX_CHARS))) - row)
    legend_w = width + row + 24
    canvas = Image.new("RGB", (w + legend_w, max(h, rows * row + 12)), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, (name, fill) in enumerate(entries):
        y = 6 + n * row
        draw.rectangle([w + 8, y, w + 8 + font_size, y + font_size], fill=fill, outline=(0, 0, 0))
        draw.text((w + 16 + font_size, y), name, fill=(0, 0, 0), font=font)
    if note:
        note_y = 6 + len(entries) * row
        draw.text((w + 8, note_y), legend_name(note, 2 * LEGEND_MAX_CHARS), fill=(160, 0, 0), font=font)
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Write ``img`` as PNG atomically (temporary file, then rename)."""
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
