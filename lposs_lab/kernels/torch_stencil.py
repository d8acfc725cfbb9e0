"""Pure-torch stencil product: the reference implementation and the fallback on any device."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .geometry import pair_slices

__all__ = ["torch_stencil_operator"]


def torch_stencil_operator(
    weights: Tensor, offsets: list[tuple[int, int]], alpha: float
) -> Callable[[Tensor], Tensor]:
    """``X [H*W, C] -> (I - alpha S_hat) X`` for the half-stencil ``weights [K, H, W]``.

    ``S_hat`` is symmetric: the forward edge ``i -> i + o`` has weight ``weights[n, i]`` and the
    reverse edge ``i + o -> i`` the same value.
    """
    _, h, w = weights.shape
    planes = []
    for n, (dy, dx) in enumerate(offsets):
        if dy >= h or abs(dx) >= w:
            continue
        src, dst = pair_slices(h, w, dy, dx)
        planes.append((src, dst, weights[n][src].unsqueeze(-1)))

    def apply(x: Tensor) -> Tensor:
        grid = x.reshape(h, w, -1)
        acc = grid.new_zeros(grid.shape)
        for src, dst, wgt in planes:
            acc[src] += wgt * grid[dst]
            acc[dst] += wgt * grid[src]
        return (grid - alpha * acc).reshape(x.shape)

    return apply
