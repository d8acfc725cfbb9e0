"""Label propagation over patches (LPOSS, SPEC §3) and the batched conjugate gradient it shares
with the pixel stage.

All functions are pure, run on the device of their inputs and work in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "knn_inner_product", "patch_graph", "refine_patches"]

APPEARANCE_KERNELS = ("power", "exp")
SPATIAL_KERNELS = ("rbf", "linear", "none")


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, *, max_iter: int = 10, tol: float = 1e-6
) -> Tensor:
    """Solve ``A X = B`` for every column of ``B`` at once by conjugate gradient from ``X = 0``.

    Each column has its own step sizes and stops (is frozen) as soon as its residual satisfies
    ``||r|| <= tol * ||b||`` — the same computation as one scalar CG per column. No host-device
    synchronisation happens on accelerators: frozen columns are masked, not dropped.

    Args:
        matvec: ``X [M, C] -> A X [M, C]`` for a symmetric positive-definite ``A``.
        b: right-hand sides ``[M, C]``.
        max_iter: number of iterations (matrix products) at most.
        tol: relative residual tolerance per column.

    Returns:
        ``X [M, C]`` after at most ``max_iter`` iterations.
    """
    if b.ndim != 2:
        raise ValueError(f"conjugate_gradient expects b of shape [M, C], got {tuple(b.shape)}")
    x = torch.zeros_like(b)
    r = b.clone()
    # Column dot products: blocks of 256 rows summed by a batched product with a ones row (BLAS, several
    # times faster than .sum(0) on [M, C]), then the block sums added pairwise (rounding stays ~1e-6).
    block = 256
    ones = torch.ones((1, block), dtype=b.dtype, device=b.device)
    full = (b.shape[0] // block) * block

    def coldot(u: Tensor, v: Tensor) -> Tensor:
        prod = u * v
        out = prod[full:].sum(0)
        if full:
            out = out + (ones @ prod[:full].view(-1, block, prod.shape[1])).sum(0)[0]
        return out

    rho = coldot(r, r)
    threshold = tol * rho.sqrt()
    active = rho.sqrt() > threshold
    p = r.clone()
    on_cpu = b.device.type == "cpu"
    for _ in range(max_iter):
        if on_cpu and not bool(active.any()):
            break
        q = matvec(p)
        pq = coldot(p, q)
        step = torch.where(active, rho / torch.where(active, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x.addcmul_(p, step)
        r.addcmul_(q, step, value=-1.0)
        rho_new = coldot(r, r)
        active = active & (rho_new.sqrt() > threshold)
        beta = torch.where(
            active, rho_new / torch.where(rho > 0, rho, torch.ones_like(rho)), torch.zeros_like(rho)
        )
        p.mul_(beta).add_(r)
        rho = rho_new
    return x


def knn_inner_product(features: Tensor, k: int, *, chunk_elements: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by inner product, the query itself included.

    Similarities are computed by chunked matrix products, so memory stays
    ``O(chunk_elements + N k)`` and no ``N x N`` matrix is ever materialised.

    Args:
        features: ``[N, D]`` (used as given; normalise first for cosine similarity).
        k: neighbours per node, clamped to ``N``.
        chunk_elements: similarity entries computed at once.

    Returns:
        ``(similarity [N, k], index [N, k])``, each row sorted by decreasing similarity.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got {tuple(features.shape)}")
    n = features.shape[0]
    k = max(1, min(int(k), n))
    rows = max(1, chunk_elements // max(n, 1))
    sims, idxs = [], []
    for start in range(0, n, rows):
        s = features[start : start + rows] @ features.T
        v, i = s.topk(k, dim=1)
        sims.append(v)
        idxs.append(i)
    return torch.cat(sims), torch.cat(idxs)


def _check_kernel(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} kernel {value!r}; valid choices: {', '.join(valid)}")


def patch_graph(
    features: Tensor,
    positions: Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    dist_pow: float = 1.0,
    appearance: str = "power",
    sigma_a: float = 0.1,
    spatial: str = "rbf",
) -> Tensor:
    """The symmetrically normalised patch affinity ``S_hat = D^-1/2 W D^-1/2`` (SPEC §3).

    ``W = S + S^T`` with the diagonal zeroed, ``S`` holding the kNN edge weights
    ``a(f_i.f_j) * b(||p_i - p_j||)`` where ``a`` is ``max(s, 0)^gamma`` (``"power"``) or
    ``exp(-(1 - s) / sigma_a)`` (``"exp"``) and ``b`` is ``exp(-sigma d^dist_pow)`` (``"rbf"``),
    ``max(1 - sigma d, 0)`` (``"linear"``) or 1 (``"none"``). Degrees of 0 become 1.

    Args:
        features: ``[N, D]``, L2-normalised here.
        positions: ``[N, 2]`` patch centres in pixels.

    Returns:
        Sparse CSR ``[N, N]`` float32 tensor on the features' device.
    """
    _check_kernel("appearance", appearance, APPEARANCE_KERNELS)
    _check_kernel("spatial", spatial, SPATIAL_KERNELS)
    if features.ndim != 2 or positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(
            f"expected features [N, D] and positions [N, 2], got {tuple(features.shape)} and "
            f"{tuple(positions.shape)}"
        )
    if features.shape[0] != positions.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but positions {positions.shape[0]}")
    n = features.shape[0]
    f = torch.nn.functional.normalize(features.float(), dim=1)
    pos = positions.to(device=f.device, dtype=torch.float32)
    sim, idx = knn_inner_product(f, k)
    if appearance == "power":
        w = sim.clamp(min=0).pow(gamma)
    else:
        w = torch.exp(-(1.0 - sim) / sigma_a)
    if spatial != "none":
        dist = (pos[:, None, :] - pos[idx]).norm(dim=-1)
        if spatial == "rbf":
            w = w * torch.exp(-sigma * dist.pow(dist_pow))
        else:
            w = w * (1.0 - sigma * dist).clamp(min=0)
    rows = torch.arange(n, device=f.device).repeat_interleave(idx.shape[1])
    cols = idx.reshape(-1)
    vals = w.reshape(-1)
    keep = rows != cols
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # W = S + S^T: every kNN edge is added in both directions.
    all_rows = torch.cat([rows, cols])
    all_cols = torch.cat([cols, rows])
    all_vals = torch.cat([vals, vals])
    deg = torch.zeros(n, device=f.device, dtype=torch.float32).index_add_(0, all_rows, all_vals)
    deg = torch.where(deg == 0, torch.ones_like(deg), deg)
    inv_sqrt = deg.rsqrt()
    # Sorted, duplicate-free CSR straight from the (row, col) keys: one sort, mutual neighbours summed
    # (several times faster than a COO coalesce).
    keys, order = torch.sort(all_rows * n + all_cols)
    keys, slot = torch.unique_consecutive(keys, return_inverse=True)
    summed = torch.zeros(keys.shape[0], device=f.device, dtype=torch.float32)
    summed.index_add_(0, slot, all_vals[order])
    rows_u, cols_u = keys // n, keys % n
    crow = torch.zeros(n + 1, device=f.device, dtype=torch.int64)
    crow[1:] = torch.bincount(rows_u, minlength=n).cumsum(0)
    norm_vals = summed * inv_sqrt[rows_u] * inv_sqrt[cols_u]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols_u, norm_vals, (n, n), check_invariants=False)


def refine_patches(
    features: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    dist_pow: float = 1.0,
    alpha: float = 0.95,
    max_iter: int = 10,
    tol: float = 1e-6,
    appearance: str = "power",
    sigma_a: float = 0.1,
    spatial: str = "rbf",
) -> Tensor:
    """LPOSS: propagate per-patch class scores over the kNN patch graph (SPEC §3).

    Solves ``(I - alpha S_hat) X = Y`` for all classes at once by ``max_iter`` steps of
    conjugate gradient from zero (see :func:`patch_graph` for ``S_hat`` and the kernels).

    Args:
        features: ``[N, D]`` graph features (DINO), L2-normalised inside.
        positions: ``[N, 2]`` patch centres ``(y, x)`` in pixels.
        scores: ``[N, C]`` initial scores ``Y``.

    Returns:
        ``[N, C]`` float32 propagated scores on the device of ``scores``.
    """
    if scores.ndim != 2 or scores.shape[0] != features.shape[0]:
        raise ValueError(
            f"scores must be [N, C] with N = {features.shape[0]} (from features), got {tuple(scores.shape)}"
        )
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s_hat = patch_graph(
        features.to(scores.device),
        positions.to(scores.device),
        k=k,
        gamma=gamma,
        sigma=sigma,
        dist_pow=dist_pow,
        appearance=appearance,
        sigma_a=sigma_a,
        spatial=spatial,
    )
    y = scores.float()

    def matvec(x: Tensor) -> Tensor:
        return x - alpha * (s_hat @ x)

    return conjugate_gradient(matvec, y, max_iter=max_iter, tol=tol)
