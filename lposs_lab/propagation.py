"""Label propagation over patches (LPOSS, docs/method.md §3) and the batched conjugate gradient it shares
with the pixel stage.

All functions are pure, run on the device of their inputs and work in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .config import LPConfig

__all__ = [
    "conjugate_gradient",
    "knn_inner_product",
    "patch_graph",
    "patch_operator",
    "propagate_patches",
    "refine_patches",
]

_LP = LPConfig()  # the keyword defaults of refine_patches (the dataclass is their one source)


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


def _normalised_knn(features: Tensor, positions: Tensor, kernel: LPConfig) -> tuple[Tensor, Tensor]:
    """``A = D^-1/2 S D^-1/2`` in ELL form: ``(index [N, k], value [N, k])``, ``S_hat = A + A^T``.

    Row ``i`` holds node ``i``'s kNN edges (its own entry, the diagonal, weighted 0); ``d`` are the
    degrees of ``W = S + S^T`` (row plus column sums of ``S``), zeros counted as 1. Fixed shapes
    throughout: nothing here waits for the device. ``kernel`` was checked when it was built.
    """
    if features.ndim != 2 or positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(
            f"expected features [N, D] and positions [N, 2], got {tuple(features.shape)} and "
            f"{tuple(positions.shape)}"
        )
    if features.shape[0] != positions.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but positions {positions.shape[0]}")
    f = torch.nn.functional.normalize(features.float(), dim=1)
    pos = positions.to(device=f.device, dtype=torch.float32)
    sim, idx = knn_inner_product(f, kernel.k)
    if kernel.appearance == "power":
        w = sim.clamp(min=0).pow(kernel.gamma)
    else:
        w = torch.exp(-(1.0 - sim) / kernel.sigma_a)
    if kernel.spatial != "none":
        dist = (pos[:, None, :] - pos[idx]).norm(dim=-1)
        if kernel.spatial == "rbf":
            w = w * torch.exp(-kernel.sigma * dist.pow(kernel.dist_pow))
        else:
            w = w * (1.0 - kernel.sigma * dist).clamp(min=0)
    own = torch.arange(f.shape[0], device=f.device)[:, None]
    w = torch.where(idx == own, torch.zeros_like(w), w)  # W's diagonal is zeroed
    deg = w.sum(1).index_add_(0, idx.reshape(-1), w.reshape(-1))
    deg = torch.where(deg == 0, torch.ones_like(deg), deg)
    inv_sqrt = deg.rsqrt()
    return idx, inv_sqrt[:, None] * w * inv_sqrt[idx]


def _csr(crow: Tensor, col: Tensor, val: Tensor, n: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, (n, n), check_invariants=False)


def _csr_halves(idx: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` and ``A^T`` of :func:`_normalised_knn` as valid CSR matrices (sorted, distinct columns)."""
    n, k = idx.shape
    col, order = idx.sort(dim=1)
    forward = _csr(
        torch.arange(0, n * k + 1, k, device=idx.device), col.reshape(-1), val.gather(1, order).reshape(-1), n
    )
    # A^T: the same entries keyed by (column, row); one sort orders rows and the columns within them.
    own = torch.arange(n, device=idx.device)[:, None].expand(n, k).reshape(-1)
    keys, order = torch.sort(idx.reshape(-1) * n + own)
    rows = keys // n
    crow = torch.searchsorted(rows, torch.arange(n + 1, device=idx.device))
    backward = _csr(crow, keys % n, val.reshape(-1)[order], n)
    return forward, backward


def patch_graph(features: Tensor, positions: Tensor, kernel: LPConfig | None = None) -> Tensor:
    """The symmetrically normalised patch affinity ``S_hat = D^-1/2 W D^-1/2`` (docs/method.md §3).

    ``W = S + S^T`` with the diagonal zeroed, ``S`` holding the kNN edge weights
    ``a(f_i.f_j) * b(||p_i - p_j||)`` where ``a`` is ``max(s, 0)^gamma`` (``"power"``) or
    ``exp(-(1 - s) / sigma_a)`` (``"exp"``) and ``b`` is ``exp(-sigma d^dist_pow)`` (``"rbf"``),
    ``max(1 - sigma d, 0)`` (``"linear"``) or 1 (``"none"``). Degrees of 0 become 1.

    This merges mutual neighbours into one entry, which needs the number of distinct edges on the
    host; :func:`refine_patches` uses :func:`patch_operator` instead, which never waits for the device.

    Args:
        features: ``[N, D]``, L2-normalised here.
        positions: ``[N, 2]`` patch centres in pixels.
        kernel: the graph's ``k``, ``gamma``, ``sigma``, ``dist_pow``, ``appearance``, ``sigma_a`` and
            ``spatial`` (default :class:`lposs_lab.LPConfig` ``()``; its solver fields are not read).

    Returns:
        Sparse CSR ``[N, N]`` float32 tensor on the features' device, columns sorted and distinct per row.
    """
    idx, val = _normalised_knn(features, positions, kernel or _LP)
    n = idx.shape[0]
    own = torch.arange(n, device=idx.device)[:, None].expand(idx.shape).reshape(-1)
    keep = own != idx.reshape(-1)
    rows, cols, vals = own[keep], idx.reshape(-1)[keep], val.reshape(-1)[keep]
    keys, order = torch.sort(torch.cat([rows * n + cols, cols * n + rows]))
    keys, slot = torch.unique_consecutive(keys, return_inverse=True)
    summed = torch.zeros(keys.shape[0], device=idx.device, dtype=torch.float32)
    summed.index_add_(0, slot, torch.cat([vals, vals])[order])
    crow = torch.searchsorted(keys // n, torch.arange(n + 1, device=idx.device))
    return _csr(crow, keys % n, summed, n)


def patch_operator(
    features: Tensor, positions: Tensor, kernel: LPConfig | None = None
) -> Callable[[Tensor], Tensor]:
    """``X [N, C] -> S_hat X`` for the graph of :func:`patch_graph` (same arguments).

    ``S_hat = A + A^T`` is applied as two sparse products with the fixed-size kNN matrix ``A`` and its
    transpose, so building and applying it never needs a host-device synchronisation (the merged graph's
    size depends on the data), and it is faster to build on the CPU too.
    """
    idx, val = _normalised_knn(features, positions, kernel or _LP)
    forward, backward = _csr_halves(idx, val)

    def apply(x: Tensor) -> Tensor:
        return torch.addmm(forward @ x, backward, x)

    return apply


def propagate_patches(features: Tensor, positions: Tensor, scores: Tensor, config: LPConfig) -> Tensor:
    """:func:`refine_patches` with its hyperparameters as one :class:`lposs_lab.LPConfig`.

    Solves ``(I - config.alpha S_hat) X = Y`` for all classes at once by ``config.max_iter`` steps of
    conjugate gradient from zero (see :func:`patch_graph` for ``S_hat`` and the kernels, and
    :func:`patch_operator` for how it is applied). ``config.graph_features`` is not read: ``features``
    are the graph.

    Args:
        features: ``[N, D]`` graph features (DINO), L2-normalised inside.
        positions: ``[N, 2]`` patch centres ``(y, x)`` in pixels.
        scores: ``[N, C]`` initial scores ``Y``.
        config: the kernel and solver settings.

    Returns:
        ``[N, C]`` float32 propagated scores on the device of ``scores``.
    """
    if scores.ndim != 2 or scores.shape[0] != features.shape[0]:
        raise ValueError(
            f"scores must be [N, C] with N = {features.shape[0]} (from features), got {tuple(scores.shape)}"
        )
    s_hat = patch_operator(features.to(scores.device), positions.to(scores.device), config)
    y = scores.float()
    alpha = config.alpha

    def matvec(x: Tensor) -> Tensor:
        return x - alpha * s_hat(x)

    return conjugate_gradient(matvec, y, max_iter=config.max_iter, tol=config.tol)


def refine_patches(
    features: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    k: int = _LP.k,
    gamma: float = _LP.gamma,
    sigma: float = _LP.sigma,
    dist_pow: float = _LP.dist_pow,
    alpha: float = _LP.alpha,
    max_iter: int = _LP.max_iter,
    tol: float = _LP.tol,
    appearance: str = _LP.appearance,
    sigma_a: float = _LP.sigma_a,
    spatial: str = _LP.spatial,
) -> Tensor:
    """LPOSS: propagate per-patch class scores over the kNN patch graph (docs/method.md §3).

    The keyword arguments are the fields of :class:`lposs_lab.LPConfig` (same defaults, checked the
    same way); :func:`propagate_patches` takes them as one config.

    Args:
        features: ``[N, D]`` graph features (DINO), L2-normalised inside.
        positions: ``[N, 2]`` patch centres ``(y, x)`` in pixels.
        scores: ``[N, C]`` initial scores ``Y``.

    Returns:
        ``[N, C]`` float32 propagated scores on the device of ``scores``.

    Raises:
        ValueError: shapes that do not fit, or a hyperparameter out of range (a
            :class:`lposs_lab.errors.ConfigError` naming it and the valid values).
    """
    config = LPConfig(
        k=k,
        gamma=gamma,
        sigma=sigma,
        dist_pow=dist_pow,
        alpha=alpha,
        max_iter=max_iter,
        tol=tol,
        appearance=appearance,
        sigma_a=sigma_a,
        spatial=spatial,
    )
    return propagate_patches(features, positions, scores, config)
