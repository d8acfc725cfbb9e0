"""An independent float64 reference of docs/method.md §3-4, written with numpy/scipy for the tests only.

It follows the text of docs/method.md directly: a dense kNN, an explicit scipy sparse graph, and one
``scipy.sparse.linalg.cg`` solve per class column (as the published code does).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg
from skimage.color import rgb2lab


def _solve(s_hat: sp.spmatrix, y: np.ndarray, alpha: float, max_iter: int, tol: float) -> np.ndarray:
    n = s_hat.shape[0]
    lap = sp.identity(n, dtype=np.float64, format="csr") - alpha * s_hat
    out = np.zeros_like(y, dtype=np.float64)
    for c in range(y.shape[1]):
        out[:, c], _ = cg(
            lap, y[:, c].astype(np.float64), x0=np.zeros(n), rtol=tol, atol=0.0, maxiter=max_iter
        )
    return out


def _normalise(w: sp.spmatrix) -> sp.csr_matrix:
    w = sp.csr_matrix(w, dtype=np.float64)
    w.setdiag(0)
    w.eliminate_zeros()
    d = np.asarray(w.sum(axis=1)).ravel()
    d[d == 0] = 1.0
    inv = sp.diags(1.0 / np.sqrt(d))
    return (inv @ w @ inv).tocsr()


def ref_refine_patches(
    features,
    positions,
    scores,
    *,
    k=400,
    gamma=3.0,
    sigma=0.01,
    dist_pow=1.0,
    alpha=0.95,
    max_iter=10,
    tol=1e-6,
    appearance="power",
    sigma_a=0.1,
    spatial="rbf",
):
    f = np.asarray(features, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    p = np.asarray(positions, dtype=np.float64)
    n = f.shape[0]
    k = min(k, n)
    sim = f @ f.T
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(n), k)
    cols = nn.ravel()
    s = sim[rows, cols]
    a = np.maximum(s, 0.0) ** gamma if appearance == "power" else np.exp(-(1.0 - s) / sigma_a)
    d = np.linalg.norm(p[rows] - p[cols], axis=1)
    if spatial == "rbf":
        b = np.exp(-sigma * d**dist_pow)
    elif spatial == "linear":
        b = np.maximum(1.0 - sigma * d, 0.0)
    else:
        b = np.ones_like(d)
    s_mat = sp.coo_matrix((a * b, (rows, cols)), shape=(n, n)).tocsr()
    s_hat = _normalise(s_mat + s_mat.T)
    return _solve(s_hat, np.asarray(scores, dtype=np.float64), alpha, max_iter, tol)


def ref_pixel_graph(feat: np.ndarray, r: int, tau: float, spatial="binary", sigma_s=6.0) -> sp.csr_matrix:
    """feat [F, H, W] -> the unnormalised symmetric pixel weight matrix (every pair listed once each way)."""
    _, h, w = feat.shape
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [], [], []
    half = r // 2
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            if (dy == 0 and dx == 0) or abs(dy) >= h or abs(dx) >= w:
                continue
            ys = slice(max(0, -dy), min(h, h - dy))
            xs = slice(max(0, -dx), min(w, w - dx))
            yt = slice(max(0, dy), min(h, h + dy))
            xt = slice(max(0, dx), min(w, w + dx))
            a, b = feat[:, ys, xs], feat[:, yt, xt]
            if a.size == 0:
                continue
            wt = np.exp(-np.sqrt(((a - b) ** 2).sum(0)) / tau)
            if spatial == "rbf":
                wt = wt * np.exp(-(dy * dy + dx * dx) / sigma_s**2)
            rows.append(idx[ys, xs].ravel())
            cols.append(idx[yt, xt].ravel())
            vals.append(wt.ravel())
    if not rows:
        return sp.csr_matrix((h * w, h * w))
    return sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w)
    ).tocsr()


def ref_lab_features(image: np.ndarray) -> np.ndarray:
    """image [3, H, W] in [0, 1] -> Lab / (100, 128, 128), via scikit-image."""
    lab = rgb2lab(np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1))
    return np.moveaxis(lab / np.array([100.0, 128.0, 128.0]), -1, 0)


def ref_refine_pixels(
    image,
    scores,
    *,
    r=13,
    tau=0.01,
    alpha=0.95,
    max_iter=10,
    tol=1e-6,
    spatial="binary",
    sigma_s=6.0,
    features=None,
):
    feat = ref_lab_features(image) if features is None else np.asarray(features, dtype=np.float64)
    c, h, w = scores.shape
    s_hat = _normalise(ref_pixel_graph(feat, r, tau, spatial, sigma_s))
    y = np.asarray(scores, dtype=np.float64).reshape(c, h * w).T
    return _solve(s_hat, y, alpha, max_iter, tol).T.reshape(c, h, w)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
