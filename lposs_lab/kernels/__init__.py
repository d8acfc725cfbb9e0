"""Stencil products ``(I - alpha S_hat) X`` of the pixel graph, one per backend.

``backend="auto"`` picks the fastest available implementation for the device of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .torch_stencil import torch_stencil_operator

__all__ = ["stencil_operator", "BACKENDS"]

BACKENDS = ("auto", "torch")


def stencil_operator(
    weights: Tensor, offsets: list[tuple[int, int]], alpha: float, *, backend: str = "auto"
) -> Callable[[Tensor], Tensor]:
    """Return ``X [H*W, C] -> (I - alpha S_hat) X`` for normalised half-stencil weights ``[K, H, W]``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown stencil backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    return torch_stencil_operator(weights, offsets, alpha)
