import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from devices import cuda
from reference import ref_refine_patches, rel_err

from lposs_lab import conjugate_gradient, knn_inner_product, patch_graph, refine_patches
from lposs_lab.config import LPConfig
from lposs_lab.propagation import patch_operator


def _inputs(n=300, d=32, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    pos = torch.rand(n, 2, generator=g) * 400
    scores = torch.randn(n, c, generator=g)
    return feats, pos, scores


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"k": 17},
        {"k": 5000},  # k > N: clamped to N
        {"gamma": 7.0, "sigma": 0.0005, "dist_pow": 2.0},
        {"alpha": 0.5, "max_iter": 25},
        {"appearance": "exp", "sigma_a": 0.2},
        {"spatial": "none"},
        {"spatial": "linear", "sigma": 0.002},
    ],
)
def test_refine_patches_matches_float64_reference(kwargs):
    feats, pos, scores = _inputs()
    out = refine_patches(feats, pos, scores, **kwargs)
    ref = ref_refine_patches(feats.numpy(), pos.numpy(), scores.numpy(), **kwargs)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4


def test_refine_patches_window_grid_positions_and_structure():
    # Patches of 2 windows of 14x14 at stride 112, as the predictor builds them.
    from lposs_lab.windows import Window, patch_positions

    pos = patch_positions([Window(0, 224, 0, 224), Window(0, 224, 112, 336)], (14, 14), 16)
    assert pos.shape == (392, 2)
    assert (
        pos[0].tolist() == [8.0, 8.0]
        and pos[196].tolist() == [8.0, 120.0]
        and pos[-1].tolist() == [216.0, 328.0]
    )
    feats, _, scores = _inputs(n=392)
    out = refine_patches(feats, pos, scores)
    ref = ref_refine_patches(feats.numpy(), pos.numpy(), scores.numpy())
    assert rel_err(out, ref) <= 1e-4


def test_refine_patches_tiny_graph_and_single_node():
    feats, pos, scores = _inputs(n=3, c=2)
    assert rel_err(refine_patches(feats, pos, scores), ref_refine_patches(feats, pos, scores)) <= 1e-4
    # a single node has no edge: degree 0 -> 1, S_hat = 0, X = Y
    one = refine_patches(feats[:1], pos[:1], scores[:1])
    assert torch.allclose(one, scores[:1])


def test_zero_score_column_stays_zero():
    feats, pos, scores = _inputs()
    scores[:, 2] = 0
    out = refine_patches(feats, pos, scores)
    assert torch.count_nonzero(out[:, 2]) == 0
    assert torch.count_nonzero(out[:, 1]) > 0


def test_graph_is_symmetric_normalised_without_diagonal():
    feats, pos, _ = _inputs(n=120)
    csr = patch_graph(feats, pos, LPConfig(k=10))
    # A valid CSR: rows in order, columns sorted and unique within each row (mutual neighbours summed).
    crow, col = csr.crow_indices(), csr.col_indices()
    for i in range(csr.shape[0]):
        row = col[crow[i] : crow[i + 1]]
        assert torch.all(row[1:] > row[:-1])
    torch.sparse_csr_tensor(crow, col, csr.values(), csr.shape, check_invariants=True)
    s = csr.to_dense().numpy()
    assert np.allclose(s, s.T, atol=1e-7)
    assert np.all(np.diag(s) == 0)
    # eigenvalues of D^-1/2 W D^-1/2 lie in [-1, 1], the top one is 1
    eig = np.linalg.eigvalsh(s.astype(np.float64))
    assert eig.max() == pytest.approx(1.0, abs=1e-5) and eig.min() >= -1 - 1e-5


@pytest.mark.parametrize(("n", "k"), [(120, 10), (40, 400), (1, 5)])
def test_operator_applies_the_merged_graph(n, k):
    # refine_patches applies S_hat = A + A^T as two fixed-size sparse products (no device waits)
    feats, pos, scores = _inputs(n=n)
    kernel = LPConfig(k=k, spatial="linear", sigma=0.003)
    op = patch_operator(feats, pos, kernel)
    csr = patch_graph(feats, pos, kernel)
    out = op(scores)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert torch.allclose(out, csr @ scores, rtol=1e-5, atol=1e-6)
    if n > 1:
        assert torch.count_nonzero(out) > 0


def test_knn_includes_self_and_is_chunked_exactly():
    feats, _, _ = _inputs(n=257)
    f = torch.nn.functional.normalize(feats, dim=1)
    sim, idx = knn_inner_product(f, 9)
    sim_c, idx_c = knn_inner_product(f, 9, chunk_elements=1000)  # 3 rows per chunk
    assert torch.equal(idx, idx_c) and torch.allclose(sim, sim_c)
    assert torch.equal(idx[:, 0], torch.arange(257))
    full = (f @ f.T).topk(9, dim=1)
    assert torch.equal(full.indices, idx)


def test_batched_cg_equals_per_column_scipy_and_respects_tolerance():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 40, generator=g, dtype=torch.float64)
    spd = a @ a.T + 40 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, 5, generator=g, dtype=torch.float64)
    b[:, 4] = 0
    for iters in (1, 3, 10, 60):
        x = conjugate_gradient(lambda v: spd @ v, b, max_iter=iters, tol=1e-6)
        for c in range(5):
            ref, _ = spla.cg(spd.numpy(), b[:, c].numpy(), rtol=1e-6, atol=0.0, maxiter=iters)
            assert np.allclose(x[:, c].numpy(), ref, rtol=1e-9, atol=1e-12)
    # converged columns stop: the residual meets the tolerance
    x = conjugate_gradient(lambda v: spd @ v, b, max_iter=200, tol=1e-8)
    res = (spd @ x - b).norm(dim=0)
    assert torch.all(res[:4] <= 1e-8 * b[:, :4].norm(dim=0) * 1.0001)


def test_bad_shapes_and_kernels_raise_clear_errors():
    feats, pos, scores = _inputs(n=10)
    with pytest.raises(ValueError, match="scores must be"):
        refine_patches(feats, pos, scores[:5])
    with pytest.raises(ValueError, match="positions"):
        refine_patches(feats, pos[:, :1], scores)
    with pytest.raises(ValueError, match="valid: rbf | linear | none"):
        refine_patches(feats, pos, scores, spatial="gauss")
    with pytest.raises(ValueError, match="alpha"):
        refine_patches(feats, pos, scores, alpha=1.0)


@cuda
def test_refine_patches_cuda_matches_cpu():
    feats, pos, scores = _inputs(n=500)
    cpu = refine_patches(feats, pos, scores)
    feats, pos, scores = feats.cuda(), pos.cuda(), scores.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the propagation never waits for the device
    try:
        gpu = refine_patches(feats, pos, scores)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.cpu(), cpu) <= 1e-4
