"""The whole LPOSS+ pixel stage fused on the CPU (numba): graph, normalisation and batched CG.

The graph is built straight into the pixel-major neighbourhood layout of
:func:`~lposs_lab.kernels.numba_stencil.stencil_matvec` (edge logits in one compiled pass, one
vectorised ``torch.exp_`` over all of them, then ``D^-1/2`` folded in), so no half-stencil planes
and no layout change are needed. The conjugate gradient is the one of
:func:`lposs_lab.propagation.conjugate_gradient` (per-column step sizes, a column frozen once its
residual is below ``tol``), with its vector updates fused into three passes per iteration: the
stencil product also sums ``p.q``, one pass updates ``x`` and ``r`` and sums ``r.r``, one forms the
next direction directly in the padded layout the stencil reads. Column sums are accumulated in
float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange, uint64
from torch import Tensor

from ..config import PixelConfig
from .numba_stencil import padded_width, row_layout, slot_width, stencil_matvec

__all__ = ["neighbourhood_from_features", "numba_pixel_solver"]

_PX = PixelConfig()  # the keyword defaults below (the dataclass is their one source)


@njit(parallel=True, cache=True)
def _edge_logits(feats, half, tau, spatial, out):  # pragma: no cover - compiled
    """``out[p, s] = -||f_p - f_q|| / tau - spatial[s]`` for the neighbour ``q`` at slot ``s`` of
    ``out [H*W, r, R]`` (flattened), ``-inf`` at the centre, outside the image and in the padding slots.

    Each image row is computed slot by slot along the row (contiguous, so it vectorises), then
    transposed into the pixel-major output. Flat ``uint64`` indices keep the loops free of
    negative-index checks (an offset may wrap around; adding a column index wraps it back).
    """
    f, h, w = feats.shape
    rw = out.shape[2]
    t = np.float32(tau)
    neg_inf = np.float32(-np.inf)
    fb = feats.ravel()
    ob = out.ravel()
    rr = out.shape[1] * rw
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        tmp = np.empty(rr * w, dtype=np.float32)
        for s in range(rr):
            dy = s // rw - half
            dx = s % rw - half
            base = uint64(s * w)
            lo = max(0, -dx)
            hi = min(w, w - dx)
            if y + dy < 0 or y + dy >= h or (dy == 0 and dx == 0) or dx > half or lo >= hi:
                for i in range(uint64(0), uint64(w)):
                    tmp[base + i] = neg_inf
                continue
            for i in range(uint64(0), uint64(lo)):
                tmp[base + i] = neg_inf
            for i in range(uint64(hi), uint64(w)):
                tmp[base + i] = neg_inf
            for i in range(uint64(lo), uint64(hi)):
                tmp[base + i] = 0.0
            for k in range(f):
                ra = uint64((k * h + y) * w)
                rb = uint64((k * h + y + dy) * w + dx)
                for i in range(uint64(lo), uint64(hi)):
                    d = fb[ra + i] - fb[rb + i]
                    tmp[base + i] += d * d
            sp = spatial[s]
            for i in range(uint64(lo), uint64(hi)):
                tmp[base + i] = -np.sqrt(tmp[base + i]) / t - sp
        ob_base = uint64(y * w * rr)
        for i in range(uint64(0), uint64(w)):
            for s in range(uint64(0), uint64(rr)):
                ob[ob_base + i * uint64(rr) + s] = tmp[s * uint64(w) + i]


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _normalise(nbhd, h, w, half):  # pragma: no cover - compiled
    """``nbhd[p, s] *= d_p^-1/2 d_q^-1/2`` with ``d`` the row sums (a zero degree counts as 1)."""
    rw = nbhd.shape[2]
    rr = uint64(nbhd.shape[1] * rw)
    nb = nbhd.ravel()
    inv = np.empty(h * w, dtype=np.float32)
    for p in prange(h * w):
        base = uint64(p) * rr
        d = np.float32(0.0)
        for s in range(uint64(0), rr):
            d += nb[base + s]
        inv[p] = np.float32(1.0) / np.sqrt(d) if d > 0 else np.float32(1.0)
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for x in range(w):
            p = y * w + x
            ip = inv[p]
            lo = uint64(max(-half, -x) + half)
            hi = uint64(min(half, w - 1 - x) + half + 1)
            for dy in range(max(-half, -y), min(half, h - 1 - y) + 1):
                base = uint64(p) * rr + uint64((dy + half) * rw)
                q0 = uint64((y + dy) * w + x - half)  # may wrap; lo >= half - x wraps it back
                for s in range(lo, hi):
                    nb[base + s] *= ip * inv[q0 + s]


def neighbourhood_from_features(
    features: Tensor,
    *,
    r: int = _PX.r,
    tau: float = _PX.tau,
    spatial: str = _PX.spatial,
    sigma_s: float = _PX.sigma_s,
) -> tuple[np.ndarray, int]:
    """The normalised pixel graph ``S_hat`` of docs/method.md §4 as a pixel-major neighbourhood.

    Args:
        features: ``[F, H, W]`` pixel features on the CPU.

    Returns:
        ``(nbhd [H*W, r, R] float32, r // 2)`` as :func:`~lposs_lab.kernels.numba_stencil.full_neighbourhood`.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [F, H, W], got {tuple(features.shape)}")
    _, h, w = features.shape
    half = r // 2
    rw = slot_width(half)
    spatial_term = np.zeros((r, rw), dtype=np.float32)
    if spatial == "rbf":
        d = np.arange(-half, half + 1, dtype=np.float32)
        spatial_term[:, :r] = (d[:, None] ** 2 + d[None, :] ** 2) / np.float32(sigma_s) ** 2
    feats = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
    nbhd = np.empty((h * w, r, rw), dtype=np.float32)
    _edge_logits(feats, half, float(tau), spatial_term.ravel(), nbhd)
    torch.from_numpy(nbhd).exp_()
    _normalise(nbhd, h, w, half)
    return nbhd, half


@njit(parallel=True, cache=True)
def _load(scores, r, p, lead):  # pragma: no cover - compiled
    """``r [H*W, Cp]`` and the interior of ``p [H, Ws, Cp]`` from ``scores [C, H, W]`` (pads zero)."""
    c, h, w = scores.shape
    cp = r.shape[1]
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for x in range(w):
            for j in range(cp):
                v = scores[j, y, x] if j < c else np.float32(0.0)
                r[y * w + x, j] = v
                p[y, lead + x, j] = v


@njit(parallel=True, cache=True)
def _store(x, out):  # pragma: no cover - compiled
    """``out [C, H, W]`` from the first ``C`` columns of ``x [H*W, Cp]``."""
    c, h, w = out.shape
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for j in range(c):
            for i in range(w):
                out[j, y, i] = x[y * w + i, j]


@njit(parallel=True, cache=True)
def _row_squares(r, h, dots):  # pragma: no cover - compiled
    """``dots[y] = sum over row y of r * r`` (float64)."""
    w = r.shape[0] // h
    cp = r.shape[1]
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for j in range(cp):
            dots[y, j] = 0.0
        for i in range(y * w, (y + 1) * w):
            for j in range(cp):
                dots[y, j] += np.float64(r[i, j] * r[i, j])


@njit(parallel=True, cache=True)
def _update(x, r, p, lead, q, step, dots):  # pragma: no cover - compiled
    """``x += step p``, ``r -= step q`` and ``dots[y] = sum over row y of r * r``."""
    h = p.shape[0]
    cp = r.shape[1]
    w = r.shape[0] // h
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for j in range(cp):
            dots[y, j] = 0.0
        for i in range(w):
            k = y * w + i
            for j in range(cp):
                x[k, j] += p[y, lead + i, j] * step[j]
                v = r[k, j] - q[k, j] * step[j]
                r[k, j] = v
                dots[y, j] += np.float64(v * v)


@njit(parallel=True, cache=True)
def _direction(p, lead, r, beta):  # pragma: no cover - compiled
    """``p = beta p + r`` over the interior of ``p [H, Ws, Cp]``."""
    h = p.shape[0]
    cp = r.shape[1]
    w = r.shape[0] // h
    for yy in prange(h):
        y = np.int64(yy)  # prange indices may be unsigned
        for i in range(w):
            for j in range(cp):
                p[y, lead + i, j] = p[y, lead + i, j] * beta[j] + r[y * w + i, j]


def numba_pixel_solver(
    features: Tensor,
    *,
    r: int = _PX.r,
    tau: float = _PX.tau,
    alpha: float = _PX.alpha,
    max_iter: int = _PX.max_iter,
    tol: float = _PX.tol,
    spatial: str = _PX.spatial,
    sigma_s: float = _PX.sigma_s,
) -> Callable[[Tensor], Tensor]:
    """Build the pixel graph once; return ``Y [C, H, W] -> X [C, H, W]`` solving ``(I - alpha S_hat) X = Y``.

    Args:
        features: ``[F, H, W]`` pixel features on the CPU.

    Returns:
        A function of a CPU ``[C, H, W]`` tensor returning a new float32 ``[C, H, W]`` tensor after
        ``max_iter`` steps of batched conjugate gradient from zero.
    """
    nbhd, half = neighbourhood_from_features(features, r=r, tau=tau, spatial=spatial, sigma_s=sigma_s)
    _, h, w = features.shape

    def solve(scores: Tensor) -> Tensor:
        if scores.ndim != 3 or tuple(scores.shape[1:]) != (h, w):
            raise ValueError(f"scores must be [C, {h}, {w}], got {tuple(scores.shape)}")
        c = scores.shape[0]
        out = np.zeros((c, h, w), dtype=np.float32)
        if c == 0 or h * w == 0:
            return torch.from_numpy(out)
        cp = padded_width(c)
        y = np.ascontiguousarray(scores.detach().to("cpu", torch.float32).numpy())
        res = np.empty((h * w, cp), dtype=np.float32)
        lead, ws = row_layout(w, cp, half)
        p = np.zeros((h, ws, cp), dtype=np.float32)
        _load(y, res, p, lead)
        x = np.zeros((h * w, cp), dtype=np.float32)
        q = np.empty((h * w, cp), dtype=np.float32)
        dots = np.empty((h, cp), dtype=np.float64)
        _row_squares(res, h, dots)
        rho = dots.sum(0)
        threshold = tol * np.sqrt(rho)
        active = np.sqrt(rho) > threshold
        for it in range(max_iter):
            if not active.any():
                break
            stencil_matvec(nbhd, p, q, half, lead, float(alpha), dots)
            pq = dots.sum(0)
            step = np.where(active, rho / np.where(active, pq, 1.0), 0.0)
            _update(x, res, p, lead, q, step.astype(np.float32), dots)
            rho_new = dots.sum(0)
            active &= np.sqrt(rho_new) > threshold
            if it + 1 < max_iter:
                beta = np.where(active, rho_new / np.where(rho > 0, rho, 1.0), 0.0)
                _direction(p, lead, res, beta.astype(np.float32))
            rho = rho_new
        _store(x, out)
        return torch.from_numpy(out)

    return solve
