"""What the pages show and offer for download: overlays without their own legend, one HTML legend for
several label maps, the label PNG and the scores ``.npz`` (written atomically)."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lposs_lab.files import atomic_write
from lposs_lab.postprocess import UNKNOWN
from lposs_lab.viz import UNKNOWN_COLOUR, label_image, palette

__all__ = ["enlarge", "blend", "legend_html", "save_label_png", "save_scores_npz"]


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``[H, W, 3]`` uint8: the label colours (``lposs_lab.viz.palette``; unknown in grey) over ``image``.

    Labels of the ignore value 255 in a ground truth are shown the same grey as unknown pixels.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette(256)
    colour = colours[np.asarray(labels, dtype=np.int64) % 256].astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colour * alpha + 0.5
    return out.astype(np.uint8)


def _swatch(rgb: Sequence[int]) -> str:
    r, g, b = (int(v) for v in rgb)
    return (
        f'<span style="display:inline-block;width:14px;height:14px;background:rgb({r},{g},{b});'
        'border:1px solid #333;vertical-align:middle;margin-right:6px"></span>'
    )


def enlarge(image: np.ndarray, side: int = 256) -> np.ndarray:
    """``image`` repeated by the integer factor that brings its longer side closest to ``side`` (at least 1):
    small label maps stay readable on screen, each pixel a block."""
    factor = max(1, side // max(image.shape[:2]))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def legend_html(
    class_names: Sequence[str],
    labels: Mapping[str, np.ndarray],
    headers: Mapping[str, str] | None = None,
    values: Sequence[int] | None = None,
    unknown_name: str = "unknown",
) -> str:
    """One legend for several label maps: every class listed with its share of pixels in each map.

    Classes without a pixel in any map are marked ``no pixels``; an ``unknown`` row is added when a map
    holds unknown (255) pixels (``unknown_name``). ``labels``: column key -> ``[H, W]`` label map;
    ``headers``: key -> title; ``values``: the label value (and colour) of each name (default
    ``0 .. len(class_names) - 1``).
    """
    headers = headers or {k: k for k in labels}
    values = list(range(len(class_names))) if values is None else [int(v) for v in values]
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} label values for {len(class_names)} class names")
    counts = {k: np.bincount(np.asarray(v, dtype=np.int64).ravel(), minlength=256) for k, v in labels.items()}
    totals = {k: max(1, int(np.asarray(v).size)) for k, v in labels.items()}
    colours = palette(256)
    head = "".join(f"<th>{html.escape(headers[k])}</th>" for k in labels)

    def share(k: str, value: int) -> str:
        n = counts[k][value] if value < len(counts[k]) else 0
        return f"<td>{100 * n / totals[k]:.1f}%</td>" if n else "<td>&ndash;</td>"

    rows = []
    for value, name in zip(values, class_names, strict=True):
        cells = "".join(share(k, value) for k in labels)
        empty = all(value >= len(c) or c[value] == 0 for c in counts.values())
        mark = ' <em class="no-pixels">(no pixels)</em>' if empty else ""
        rows.append(
            f'<tr class="legend-row"><td>{_swatch(colours[value % 256])}<span class="legend-name">'
            f"{html.escape(name)}</span>{mark}</td>{cells}</tr>"
        )
    if UNKNOWN not in values and any(c[UNKNOWN] for c in counts.values()):
        cells = "".join(share(k, UNKNOWN) for k in labels)
        rows.append(
            f'<tr class="legend-row"><td>{_swatch(UNKNOWN_COLOUR)}'
            f"{html.escape(unknown_name)}</td>{cells}</tr>"
        )
    return (
        '<table class="lposs-legend"><thead><tr><th>class</th>'
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def save_label_png(labels: np.ndarray, path: str | os.PathLike) -> Path:
    """The label map as a palette PNG (values = class indices, 255 unknown), written atomically."""
    path = Path(path)
    with atomic_write(path) as fh:
        label_image(np.asarray(labels)).save(fh, format="PNG")
    return path


def save_scores_npz(
    scores: Mapping[str, np.ndarray], class_names: Sequence[str], path: str | os.PathLike
) -> Path:
    """``{method: [C, H, W] float16, "class_names": [C]}`` as an ``.npz``, written atomically."""
    path = Path(path)
    with atomic_write(path) as fh:
        np.savez(fh, class_names=np.asarray(list(class_names)), **dict(scores))
    return path
