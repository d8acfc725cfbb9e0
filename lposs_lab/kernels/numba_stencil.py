"""Compiled CPU stencil product ``(I - alpha S_hat) X`` of the pixel graph (numba).

At construction the half-stencil planes ``[K, H, W]`` are laid out once as a dense pixel-major
neighbourhood ``[H*W, r*r]`` (forward and reverse edges, zero outside the image and at the centre),
so one pixel's weights are contiguous. The product walks the image in row tiles spread over the
cores; for each pixel it gathers its neighbours row by row, up to eight neighbours per pass over
the classes (class loop innermost, so the loop vectorises and each accumulator is read and written
once per eight neighbours). Up to 64 classes are padded to a multiple of 8 (one SIMD register) in a
reused buffer.
Only ``contract`` fast-math is enabled (fused multiply-add): results match the reference to float32
rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange, uint64
from torch import Tensor

__all__ = ["numba_stencil_operator", "full_neighbourhood"]

_LANES = 8
_TILE_ROWS = 4
_PAD_MAX_CLASSES = 64


def _check_offsets(offsets: list[tuple[int, int]], k: int) -> int:
    """Validate forward-half offsets and return the stencil half-width ``r // 2``."""
    if len(offsets) != k:
        raise ValueError(f"weights have {k} planes but {len(offsets)} offsets were given")
    seen = set()
    for dy, dx in offsets:
        if not (dy > 0 or (dy == 0 and dx > 0)):
            raise ValueError(f"offset {(dy, dx)} is not in the forward half (dy > 0, or dy == 0 and dx > 0)")
        if (dy, dx) in seen:
            raise ValueError(f"offset {(dy, dx)} is listed twice")
        seen.add((dy, dx))
    return max((max(abs(dy), abs(dx)) for dy, dx in offsets), default=0)


@njit(parallel=True, cache=True)
def _fill_neighbourhood(weights, dys, dxs, half, out):  # pragma: no cover - compiled
    """``out [H*W, r*r]``: forward edges at slot ``+o``, reverse edges (read at the neighbour) at ``-o``.

    Pixels are visited in blocks of 64 along a row so the reads stay contiguous and the strided
    writes stay in cache.
    """
    k, h, w = weights.shape
    r = 2 * half + 1
    b = 64
    for y in prange(h):
        for x0 in range(0, w, b):
            x1 = min(w, x0 + b)
            for n in range(k):
                dy = dys[n]
                dx = dxs[n]
                if 0 <= y + dy < h:
                    fwd = (dy + half) * r + dx + half
                    for x in range(max(x0, -dx), min(x1, w - dx)):
                        out[y * w + x, fwd] = weights[n, y, x]
                if 0 <= y - dy < h:
                    rev = (half - dy) * r + half - dx
                    for x in range(max(x0, dx), min(x1, w + dx)):
                        out[y * w + x, rev] = weights[n, y - dy, x - dx]


def full_neighbourhood(weights: Tensor, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """Dense pixel-major neighbourhood weights of a half stencil.

    Args:
        weights: ``[K, H, W]`` forward-edge planes (entries whose neighbour is outside are ignored).
        offsets: the ``K`` forward offsets ``(dy, dx)``.

    Returns:
        ``(nbhd [H*W, r*r] float32, r // 2)``: ``nbhd[y*W + x, (dy + r//2) * r + dx + r//2]`` is
        ``S_hat`` between ``(y, x)`` and ``(y + dy, x + dx)`` for every ``|dy|, |dx| <= r // 2``.
    """
    if weights.ndim != 3:
        raise ValueError(f"weights must be [K, H, W], got {tuple(weights.shape)}")
    k, h, w = weights.shape
    half = _check_offsets(offsets, k)
    r = 2 * half + 1
    out = np.zeros((h * w, r * r), dtype=np.float32)
    if k:
        wn = np.ascontiguousarray(weights.detach().to("cpu", torch.float32).numpy())
        dys = np.array([o[0] for o in offsets], dtype=np.int64)
        dxs = np.array([o[1] for o in offsets], dtype=np.int64)
        _fill_neighbourhood(wn, dys, dxs, half, out)
    return out, half


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _stencil_matvec(nbhd, xp, out, h, w, half, alpha, tile_rows):  # pragma: no cover - compiled
    """``out[:, :C] = xp[:, :C] - alpha * S_hat xp`` with ``xp [H*W, Cp]``, ``Cp >= C``."""
    r = 2 * half + 1
    rr = r * r
    cp = uint64(xp.shape[1])
    c = uint64(out.shape[1])
    x1 = xp.ravel()
    o1 = out.ravel()
    w1 = nbhd.ravel()
    al = np.float32(alpha)
    n_tiles = (h + tile_rows - 1) // tile_rows
    for t in prange(n_tiles):
        acc = np.empty(cp, dtype=np.float32)
        for y in range(t * tile_rows, min(h, (t + 1) * tile_rows)):
            ylo = max(-half, -y)
            yhi = min(half, h - 1 - y)
            for x in range(w):
                xlo = max(-half, -x)
                xhi = min(half, w - 1 - x)
                p = y * w + x
                for j in range(cp):
                    acc[j] = 0.0
                for dy in range(ylo, yhi + 1):
                    row = (y + dy) * w + x
                    wrow = p * rr + (dy + half) * r + half
                    dx = xlo
                    while dx + 7 <= xhi:
                        wo = uint64(wrow + dx)
                        w0 = w1[wo]
                        w_1 = w1[wo + uint64(1)]
                        w_2 = w1[wo + uint64(2)]
                        w_3 = w1[wo + uint64(3)]
                        w_4 = w1[wo + uint64(4)]
                        w_5 = w1[wo + uint64(5)]
                        w_6 = w1[wo + uint64(6)]
                        w_7 = w1[wo + uint64(7)]
                        q0 = uint64(row + dx) * cp
                        q1 = q0 + cp
                        q2 = q1 + cp
                        q3 = q2 + cp
                        q4 = q3 + cp
                        q5 = q4 + cp
                        q6 = q5 + cp
                        q7 = q6 + cp
                        for j in range(cp):
                            lo = w0 * x1[q0 + j] + w_1 * x1[q1 + j] + w_2 * x1[q2 + j] + w_3 * x1[q3 + j]
                            hi = w_4 * x1[q4 + j] + w_5 * x1[q5 + j] + w_6 * x1[q6 + j] + w_7 * x1[q7 + j]
                            acc[j] += lo + hi
                        dx += 8
                    while dx + 3 <= xhi:
                        wo = uint64(wrow + dx)
                        w0 = w1[wo]
                        w_1 = w1[wo + uint64(1)]
                        w_2 = w1[wo + uint64(2)]
                        w_3 = w1[wo + uint64(3)]
                        q0 = uint64(row + dx) * cp
                        q1 = q0 + cp
                        q2 = q1 + cp
                        q3 = q2 + cp
                        for j in range(cp):
                            acc[j] += w0 * x1[q0 + j] + w_1 * x1[q1 + j] + w_2 * x1[q2 + j] + w_3 * x1[q3 + j]
                        dx += 4
                    while dx <= xhi:
                        wv = w1[uint64(wrow + dx)]
                        q0 = uint64(row + dx) * cp
                        for j in range(cp):
                            acc[j] += wv * x1[q0 + j]
                        dx += 1
                pi = uint64(p) * cp
                po = uint64(p) * c
                for j in range(c):
                    o1[po + j] = x1[pi + j] - al * acc[j]


def numba_stencil_operator(
    weights: Tensor, offsets: list[tuple[int, int]], alpha: float
) -> Callable[[Tensor], Tensor]:
    """``X [H*W, C] -> (I - alpha S_hat) X`` on the CPU with a compiled, multi-threaded kernel.

    Args:
        weights: ``[K, H, W]`` normalised half-stencil planes (see :func:`lposs_lab.pixels.pixel_graph`).
        offsets: the ``K`` forward offsets ``(dy, dx)``.
        alpha: propagation strength.

    Returns:
        A function of a CPU ``[H*W, C]`` tensor returning a new float32 ``[H*W, C]`` tensor.
    """
    _, h, w = weights.shape
    nbhd, half = full_neighbourhood(weights, offsets)
    cache: dict[int, np.ndarray] = {}

    def apply(x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[0] != h * w:
            raise ValueError(f"X must be [H*W, C] with H*W = {h * w}, got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(
                f"the numba stencil runs on CPU tensors, got one on {x.device}; use backend='torch'"
            )
        c = x.shape[1]
        xn = x.detach().to(torch.float32).contiguous().numpy()
        # Pad few classes to whole SIMD registers; many classes run mostly in the vector body anyway.
        cp = -(-c // _LANES) * _LANES if c <= _PAD_MAX_CLASSES else c
        if cp != c:
            buf = cache.get(cp)
            if buf is None:
                cache.clear()
                buf = cache[cp] = np.zeros((h * w, cp), dtype=np.float32)
            buf[:, :c] = xn
            xn = buf
        out = np.empty((h * w, c), dtype=np.float32)
        if c:
            _stencil_matvec(nbhd, xn, out, h, w, half, float(alpha), _TILE_ROWS)
        return torch.from_numpy(out)

    return apply
