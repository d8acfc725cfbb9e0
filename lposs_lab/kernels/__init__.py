"""Stencil products ``(I - alpha S_hat) X`` of the pixel graph, one per backend.

``backend="auto"`` picks the fastest available implementation for the device of the weights:
Triton on CUDA (torch if Triton cannot be imported), numba on the CPU (torch if numba cannot be
imported). With ``TRITON_INTERPRET=1`` in the environment the Triton kernel also runs on CPU tensors
(through Triton's interpreter; slow, for tests). ``numba`` and ``triton`` are imported only when
used, so ``import lposs_lab`` needs neither.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

from torch import Tensor

from .torch_stencil import torch_stencil_operator

__all__ = ["stencil_operator", "BACKENDS", "available_backends", "resolve_backend"]

BACKENDS = ("auto", "torch", "numba", "triton")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _unavailable_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type``, or ``None`` when it can."""
    if backend == "numba":
        if device_type != "cpu":
            return f"the numba backend runs on CPU tensors, the weights are on {device_type}"
        if not _importable("numba"):
            return "numba is not installed (pip install numba)"
    if backend == "triton":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the triton backend needs CUDA tensors, the weights are on {device_type}"
        if not _importable("triton"):
            return "triton is not installed (pip install triton)"
    return None


def available_backends(device_type: str) -> tuple[str, ...]:
    """The backends (``"auto"`` included) that can run on a device type such as ``"cpu"`` or ``"cuda"``."""
    return tuple(b for b in BACKENDS if b == "auto" or _unavailable_reason(b, device_type) is None)


def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend that ``backend`` means on ``device_type``.

    Raises:
        ValueError: unknown backend, or an explicitly requested one that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown stencil backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    if backend == "auto":
        preferred = {"cuda": "triton", "cpu": "numba"}.get(device_type, "torch")
        return preferred if _unavailable_reason(preferred, device_type) is None else "torch"
    reason = _unavailable_reason(backend, device_type)
    if reason is not None:
        raise ValueError(
            f"stencil backend {backend!r} is unavailable: {reason}; available on {device_type}: "
            f"{', '.join(available_backends(device_type))}"
        )
    return backend


def stencil_operator(
    weights: Tensor, offsets: list[tuple[int, int]], alpha: float, *, backend: str = "auto"
) -> Callable[[Tensor], Tensor]:
    """Return ``X [H*W, C] -> (I - alpha S_hat) X`` for normalised half-stencil weights ``[K, H, W]``.

    Args:
        weights: ``[K, H, W]`` forward-edge planes of ``S_hat`` (see :func:`lposs_lab.pixels.pixel_graph`).
        offsets: the ``K`` forward offsets ``(dy, dx)``.
        alpha: propagation strength.
        backend: one of :data:`BACKENDS`.
    """
    name = resolve_backend(backend, weights.device.type)
    if name == "numba":
        from .numba_stencil import numba_stencil_operator

        return numba_stencil_operator(weights, offsets, alpha)
    if name == "triton":
        from .triton_stencil import triton_stencil_operator

        return triton_stencil_operator(weights, offsets, alpha)
    return torch_stencil_operator(weights, offsets, alpha)
