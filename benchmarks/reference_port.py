"""The published structure of LPOSS/LPOSS+ ported to the CPU, as the baseline of the benchmark.

Written from docs/method.md §3-4 with numpy/scipy only: an explicit scipy CSR graph and one float32
``scipy.sparse.linalg.cg`` per class column from ``x0 = 0`` (``rtol=1e-6``, ``maxiter=10``), which
is how the authors' code solves both stages. Nothing here imports :mod:`lposs_lab`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg
from skimage.color import rgb2lab

__all__ = [
    "pixel_laplacian",
    "patch_laplacian",
    "solve_per_class",
    "port_refine_pixels",
    "port_refine_patches",
]

LAB_SCALE = np.array([100.0, 128.0, 128.0], dtype=np.float32)


def _normalised_laplacian(w: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """``L = I - alpha D^-1/2 W D^-1/2`` (float32) with zero degrees set to 1."""
    deg = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()
    deg[deg == 0] = 1.0
    inv = sp.diags((1.0 / np.sqrt(deg)).astype(np.float32))
    s_hat = (inv @ w @ inv).tocsr().astype(np.float32)
    eye = sp.identity(w.shape[0], dtype=np.float32, format="csr")
    return (eye - np.float32(alpha) * s_hat).tocsr()


def pixel_laplacian(
    image: np.ndarray, *, r: int = 13, tau: float = 0.01, alpha: float = 0.95
) -> sp.csr_matrix:
    """docs/method.md §4: the graph of an ``[H, W, 3]`` RGB image in ``[0, 1]``, a float32 CSR ``[HW, HW]``
    Laplacian.

    Every pixel is joined to all pixels of the ``r x r`` window around it (itself excluded, clipped
    at the border) with weight ``exp(-||lab_i - lab_j||_2 / tau)``, Lab divided by ``(100, 128, 128)``;
    ``L = I - alpha D^-1/2 W D^-1/2`` with zero degrees set to 1. The weights are computed one
    neighbour offset at a time on the image grid and the CSR arrays are assembled directly (the
    ``r*r`` slots in raster order give sorted column indices), so the port is not slowed by
    generic sparse assembly.
    """
    h, w, _ = image.shape
    lab = (rgb2lab(image.astype(np.float64)) / LAB_SCALE).astype(np.float32).transpose(2, 0, 1)
    half = r // 2
    slots = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]
    vals = np.zeros((len(slots), h, w), dtype=np.float32)
    valid = np.zeros((len(slots), h, w), dtype=bool)
    pairs = []
    for m, (dy, dx) in enumerate(slots):
        if abs(dy) >= h or abs(dx) >= w:
            continue
        src = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
        dst = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
        valid[m][src] = True
        if (dy, dx) != (0, 0):
            diff = lab[:, src[0], src[1]] - lab[:, dst[0], dst[1]]
            vals[m][src] = np.exp(-np.sqrt((diff * diff).sum(0)) / np.float32(tau))
            pairs.append((m, src, dst))
    deg = vals.sum(0)
    deg[deg == 0] = 1.0
    inv = (1.0 / np.sqrt(deg)).astype(np.float32)
    for m, src, dst in pairs:
        vals[m][src] *= np.float32(-alpha) * inv[src] * inv[dst]
    vals[len(slots) // 2] = 1.0
    shift = np.array([dy * w + dx for dy, dx in slots], dtype=np.int32)
    mask = np.ascontiguousarray(valid.reshape(len(slots), h * w).T)
    del valid
    data = np.ascontiguousarray(vals.reshape(len(slots), h * w).T)[mask]
    del vals
    cols = (np.arange(h * w, dtype=np.int32)[:, None] + shift[None, :])[mask]
    indptr = np.zeros(h * w + 1, dtype=np.int64)
    np.cumsum(mask.sum(1), out=indptr[1:])
    return sp.csr_matrix((data, cols, indptr), shape=(h * w, h * w))


def patch_laplacian(
    features: np.ndarray,
    positions: np.ndarray,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    alpha: float = 0.95,
) -> sp.csr_matrix:
    """docs/method.md §3: the graph of ``N`` patches (features ``[N, D]``, centres ``[N, 2]``), a float32 CSR
    Laplacian.

    Dense inner-product kNN (``k`` clamped to ``N``, the node itself included) by ``argpartition``,
    ``s_ij = max(f_i.f_j, 0)^gamma exp(-sigma ||p_i - p_j||)``, ``W = S + S^T`` with a zero diagonal.
    """
    f = features.astype(np.float32)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n = f.shape[0]
    k = min(k, n)
    sim = f @ f.T
    nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    cols = nn.ravel()
    dist = np.linalg.norm(positions[rows].astype(np.float32) - positions[cols].astype(np.float32), axis=1)
    vals = np.maximum(sim[rows, cols], 0.0) ** gamma * np.exp(-sigma * dist)
    s = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, n))
    w = (s + s.T).tolil()
    w.setdiag(0)
    w = w.tocsr()
    w.eliminate_zeros()
    return _normalised_laplacian(w, alpha)


def solve_per_class(
    lap: sp.csr_matrix, y: np.ndarray, *, max_iter: int = 10, tol: float = 1e-6
) -> np.ndarray:
    """One float32 ``scipy.sparse.linalg.cg`` from zero per column of ``y [N, C]``; returns ``[N, C]``."""
    out = np.empty(y.shape, dtype=np.float32)
    x0 = np.zeros(y.shape[0], dtype=np.float32)
    for c in range(y.shape[1]):
        b = np.ascontiguousarray(y[:, c], dtype=np.float32)
        out[:, c], _ = cg(lap, b, x0=x0, rtol=tol, atol=0.0, maxiter=max_iter)
    return out


def port_refine_pixels(image: np.ndarray, scores: np.ndarray, **kwargs) -> np.ndarray:
    """LPOSS+ pixel stage: ``image [H, W, 3]``, ``scores [C, H, W]`` -> refined ``[C, H, W]`` float32."""
    c, h, w = scores.shape
    lap = pixel_laplacian(image, **kwargs)
    y = scores.reshape(c, h * w).T
    return solve_per_class(lap, y).T.reshape(c, h, w)


def port_refine_patches(
    features: np.ndarray, positions: np.ndarray, scores: np.ndarray, **kwargs
) -> np.ndarray:
    """LPOSS patch stage: ``features [N, D]``, ``positions [N, 2]``, ``scores [N, C]`` -> ``[N, C]``."""
    return solve_per_class(patch_laplacian(features, positions, **kwargs), scores)
