"""Where a stencil offset pairs pixels: the one slice formula every backend and the graph builder share."""

from __future__ import annotations

__all__ = ["pair_slices"]

Slices = tuple[slice, slice]


def pair_slices(h: int, w: int, dy: int, dx: int) -> tuple[Slices, Slices]:
    """Slices of an ``[H, W]`` plane: ``(pixels i, their neighbours j = i + (dy, dx))``, both inside.

    Only the pixels whose neighbour lies inside the image are covered; with ``dy >= h`` or ``|dx| >= w``
    both slices are empty.
    """
    src = (slice(0, h - dy), slice(max(0, -dx), w - max(0, dx)))
    dst = (slice(dy, h), slice(max(0, dx), w + min(0, dx)))
    return src, dst
