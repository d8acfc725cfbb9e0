"""Compiled CPU stencil product ``(I - alpha S_hat) X`` of the pixel graph (numba).

The weights are laid out as a dense pixel-major neighbourhood ``[H*W, r, R]`` with ``R`` the stencil
width ``r`` rounded up to a multiple of 8 (zero outside the image, at the centre and in the extra
columns), so one pixel's weights are contiguous and every stencil row is whole groups of eight.
``X`` is pixel-major too, ``[H, Ws, Cp]``: classes padded to a multiple of 8 (one AVX register), each
image row stored at column ``r // 2`` of a zero-padded row of stride ``Ws``. The zero margins let
every pixel read its full stencil row without clipping at the left and right borders, and ``Ws`` is
chosen so that the rows one pixel reads do not fall into the same L1 cache sets (a row of 640
pixels x 24 classes is exactly 960 cache lines: unpadded, every row starts at set 0). For each pixel
the kernel gathers its neighbours eight at a time with the class loop innermost (it vectorises, and
each accumulator is read and written once per eight neighbours). Image rows are spread over the
cores. Only ``contract`` fast-math is enabled (fused multiply-add): results match the reference to
float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange, uint64
from torch import Tensor

__all__ = [
    "numba_stencil_operator",
    "full_neighbourhood",
    "padded_width",
    "slot_width",
    "row_layout",
    "stencil_matvec",
]

_LANES = 8
_L1_SETS = 64  # 32 KiB, 8-way, 64-byte lines: the L1 data cache of current x86 cores
_L1_WAYS = 8


def padded_width(c: int) -> int:
    """Classes padded to whole SIMD registers (a multiple of 8)."""
    return -(-c // _LANES) * _LANES


def slot_width(half: int) -> int:
    """Stored width ``R`` of one stencil row: ``r = 2 half + 1`` rounded up to a multiple of 8."""
    return -(-(2 * half + 1) // _LANES) * _LANES


def row_layout(w: int, cp: int, half: int) -> tuple[int, int]:
    """``(lead, Ws)`` of the padded ``X`` rows: an image row starts at column ``lead = half``, and the
    stride leaves the ``R - 1`` zero columns that a full stencil row read at the borders needs."""
    return half, row_stride(w + slot_width(half) - 1, cp, half)


def row_stride(w: int, cp: int, half: int) -> int:
    """A row stride ``>= w`` (in pixels) under which the ``2 half + 1`` rows read for one pixel spread
    over the L1 cache sets instead of colliding in a few of them."""
    rows = 2 * half + 1
    span = -(-((2 * half + 2) * cp * 4) // 64)  # cache lines one pixel's window touches in a row
    best, best_load = w, None
    for ws in range(w, w + 32):
        load = np.zeros(_L1_SETS, dtype=np.int64)
        for y in range(rows):
            first = y * ws * cp * 4 // 64
            load[np.arange(first, first + span) % _L1_SETS] += 1
        worst = int(load.max())
        if best_load is None or worst < best_load:
            best, best_load = ws, worst
        if worst <= _L1_WAYS // 2:
            break
    return best


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
    """``out [H*W, r, R]``: forward edges at ``+o``, reverse edges (read at the neighbour) at ``-o``.

    Pixels are visited in blocks of 64 along a row so the reads stay contiguous and the strided
    writes stay in cache.
    """
    k, h, w = weights.shape
    b = 64
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for x0 in range(0, w, b):
            x1 = min(w, x0 + b)
            for n in range(k):
                dy = dys[n]
                dx = dxs[n]
                if 0 <= y + dy < h:
                    for x in range(max(x0, -dx), min(x1, w - dx)):
                        out[y * w + x, dy + half, dx + half] = weights[n, y, x]
                if 0 <= y - dy < h:
                    for x in range(max(x0, dx), min(x1, w + dx)):
                        out[y * w + x, half - dy, half - dx] = weights[n, y - dy, x - dx]


def full_neighbourhood(weights: Tensor, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """Dense pixel-major neighbourhood weights of a half stencil.

    Args:
        weights: ``[K, H, W]`` forward-edge planes (entries whose neighbour is outside are ignored).
        offsets: the ``K`` forward offsets ``(dy, dx)``.

    Returns:
        ``(nbhd [H*W, r, R] float32, r // 2)``: ``nbhd[y*W + x, dy + r//2, dx + r//2]`` is ``S_hat``
        between ``(y, x)`` and ``(y + dy, x + dx)`` for every ``|dy|, |dx| <= r // 2``; zero
        elsewhere (``R = slot_width(r // 2)``).
    """
    if weights.ndim != 3:
        raise ValueError(f"weights must be [K, H, W], got {tuple(weights.shape)}")
    k, h, w = weights.shape
    half = _check_offsets(offsets, k)
    out = np.zeros((h * w, 2 * half + 1, slot_width(half)), dtype=np.float32)
    if k:
        wn = np.ascontiguousarray(weights.detach().to("cpu", torch.float32).numpy())
        dys = np.array([o[0] for o in offsets], dtype=np.int64)
        dxs = np.array([o[1] for o in offsets], dtype=np.int64)
        _fill_neighbourhood(wn, dys, dxs, half, out)
    return out, half


@njit(parallel=True, fastmath={"contract"}, cache=True)
def stencil_matvec(nbhd, xp, out, half, lead, alpha, dots):  # pragma: no cover - compiled
    """``out = X - alpha * S_hat X`` (first ``C`` classes); with ``dots [H, Cp]`` non-empty, also
    ``dots[y] = sum over row y of X * out`` (float64; needs ``C == Cp``).

    Args:
        nbhd: ``[H*W, r, R]`` neighbourhood weights (:func:`full_neighbourhood`).
        xp: ``[H, Ws, Cp]`` padded input, pixel ``(y, x)`` at ``xp[y, lead + x]``, zero elsewhere,
            ``lead >= half`` and ``Ws >= lead + W + R - half - 1``.
        out: ``[H*W, C]`` output, ``C <= Cp``.
    """
    h = xp.shape[0]
    ws = xp.shape[1]
    cp = uint64(xp.shape[2])
    c = uint64(out.shape[1])
    w = out.shape[0] // max(h, 1)
    rows = nbhd.shape[1]
    rw = nbhd.shape[2]
    x1 = xp.ravel()
    o1 = out.ravel()
    w1 = nbhd.ravel()
    al = np.float32(alpha)
    with_dots = dots.shape[0] > 0
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        acc = np.empty(cp, dtype=np.float32)
        ylo = max(-half, -y)
        yhi = min(half, h - 1 - y)
        if with_dots:
            for j in range(cp):
                dots[y, j] = 0.0
        for x in range(w):
            p = y * w + x
            for j in range(cp):
                acc[j] = 0.0
            for dy in range(ylo, yhi + 1):
                row = (y + dy) * ws + lead + x - half
                wrow = (p * rows + dy + half) * rw
                for g in range(0, rw, 8):
                    wo = uint64(wrow + g)
                    w0 = w1[wo]
                    w_1 = w1[wo + uint64(1)]
                    w_2 = w1[wo + uint64(2)]
                    w_3 = w1[wo + uint64(3)]
                    w_4 = w1[wo + uint64(4)]
                    w_5 = w1[wo + uint64(5)]
                    w_6 = w1[wo + uint64(6)]
                    w_7 = w1[wo + uint64(7)]
                    q0 = uint64(row + g) * cp
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
            pi = uint64(y * ws + lead + x) * cp
            po = uint64(p) * c
            if with_dots:
                for j in range(c):
                    v = x1[pi + j] - al * acc[j]
                    o1[po + j] = v
                    dots[y, j] += np.float64(x1[pi + j] * v)
            else:
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
    no_dots = np.zeros((0, 0), dtype=np.float64)

    def apply(x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[0] != h * w:
            raise ValueError(f"X must be [H*W, C] with H*W = {h * w}, got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(
                f"the numba stencil runs on CPU tensors, got one on {x.device}; use backend='torch'"
            )
        c = x.shape[1]
        out = np.empty((h * w, c), dtype=np.float32)
        if c == 0:
            return torch.from_numpy(out)
        cp = padded_width(c)
        lead, ws = row_layout(w, cp, half)
        buf = cache.get(cp)
        if buf is None:
            cache.clear()
            buf = cache[cp] = np.zeros((h, ws, cp), dtype=np.float32)
        buf[:, lead : lead + w, :c] = x.detach().to(torch.float32).numpy().reshape(h, w, c)
        buf[:, lead : lead + w, c:] = 0.0
        stencil_matvec(nbhd, buf, out, half, lead, float(alpha), no_dots)
        return torch.from_numpy(out)

    return apply
