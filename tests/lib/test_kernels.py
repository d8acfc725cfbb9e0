"""Stencil backends against the pure-torch reference, and the backend dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lposs_lab.kernels import BACKENDS, available_backends, resolve_backend, stencil_operator
from lposs_lab.kernels.torch_stencil import torch_stencil_operator
from lposs_lab.pixels import refine_pixels, stencil_offsets

REPO = Path(__file__).resolve().parents[2]
CPU_BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "numba")]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(h: int, w: int, r: int, c: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    offsets = stencil_offsets(r)
    weights = torch.rand((len(offsets), h, w), generator=g) / len(offsets)
    x = torch.randn((h * w, c), generator=g)
    return weights.to(device), offsets, x.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max() / b.abs().max().cpu().clamp(min=1e-30))


SHAPES = [
    (17, 23, 13, 21),
    (17, 23, 3, 8),
    (17, 23, 5, 40),
    (9, 14, 13, 70),  # more classes than the padding threshold
    (1, 31, 5, 3),
    (29, 1, 13, 9),
    (4, 3, 13, 5),  # smaller than the stencil
    (1, 1, 13, 2),
    (6, 7, 1, 3),  # r = 1: no neighbours, the operator is the identity
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("h", "w", "r", "c"), SHAPES)
def test_cpu_backends_match_torch_reference(backend, h, w, r, c):
    weights, offsets, x = _problem(h, w, r, c)
    ref = torch_stencil_operator(weights, offsets, 0.95)(x)
    out = stencil_operator(weights, offsets, 0.95, backend=backend)(x)
    assert out.shape == (h * w, c) and out.dtype == torch.float32
    assert _rel(out, ref) < 2e-6
    if r == 1:
        assert torch.equal(out, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_whose_neighbour_is_outside_are_ignored(backend):
    weights, offsets, x = _problem(9, 10, 5, 4, seed=3)
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(10), indexing="ij")
    noisy = weights.clone()
    for n, (dy, dx) in enumerate(offsets):
        outside = (ys + dy >= 9) | (xs + dx < 0) | (xs + dx >= 10)
        noisy[n][outside] = 1e6
    ref = torch_stencil_operator(weights, offsets, 0.5)(x)
    assert _rel(stencil_operator(noisy, offsets, 0.5, backend=backend)(x), ref) < 2e-6


def test_numba_accepts_strided_double_input_and_repeated_calls():
    pytest.importorskip("numba")
    weights, offsets, x = _problem(11, 13, 5, 10, seed=1)
    op = stencil_operator(weights, offsets, 0.9, backend="numba")
    ref = torch_stencil_operator(weights, offsets, 0.9)
    xt = x.double().T.contiguous().T  # non-contiguous float64 view
    assert _rel(op(xt), ref(x)) < 2e-6
    # Reuses its padded buffer with a different class count of the same padded width.
    assert _rel(op(x[:, :7]), ref(x[:, :7])) < 2e-6
    assert _rel(op(x[:, :10]), ref(x[:, :10])) < 2e-6
    with pytest.raises(ValueError, match=r"X must be \[H\*W, C\]"):
        op(torch.zeros(5, 3))


def test_bad_offsets_raise():
    pytest.importorskip("numba")
    weights = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="forward half"):
        stencil_operator(weights, [(0, 1), (0, -1)], 0.9, backend="numba")
    with pytest.raises(ValueError, match="2 planes but 1 offsets"):
        stencil_operator(weights, [(0, 1)], 0.9, backend="numba")


def test_refine_pixels_equal_across_backends():
    g = torch.Generator().manual_seed(0)
    image = torch.rand((3, 19, 26), generator=g)
    scores = torch.randn((12, 19, 26), generator=g)
    outs = {b: refine_pixels(image, scores, backend=b) for b in CPU_BACKENDS}
    ref = outs["torch"]
    # The propagation really changes the scores, and every backend gives the same result.
    assert _rel(ref, scores) > 1e-2
    for b, out in outs.items():
        assert _rel(out, ref) < 1e-5, b
    # Class chunking (max_bytes) does not change the numba result either.
    if "numba" in outs:
        chunked = refine_pixels(image, scores, backend="numba", max_bytes=10 * 4 * 19 * 26 * 5)
        assert _rel(chunked, ref) < 1e-5


def test_dispatch_choices_and_errors(monkeypatch):
    assert BACKENDS == ("auto", "torch", "numba", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == ("numba" if "numba" in available_backends("cpu") else "torch")
    assert resolve_backend("auto", "mps") == "torch"
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match=r"unknown stencil backend 'cupy'; valid choices: auto, torch"):
        resolve_backend("cupy", "cpu")
    with pytest.raises(ValueError, match=r"'triton' is unavailable: .*needs CUDA.*on cpu: auto, torch"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match=r"'numba' is unavailable: the numba backend runs on CPU"):
        resolve_backend("numba", "cuda")
    op = stencil_operator(torch.rand(4, 5, 5), stencil_offsets(3), 0.9)
    expected = "numba_stencil" if "numba" in available_backends("cpu") else "torch_stencil"
    assert op.__module__.endswith(expected)


@pytest.mark.slow  # a subprocess
def test_import_does_not_pull_triton_or_numba():
    code = "import sys, lposs_lab.pixels; print('triton' in sys.modules, 'numba' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import torch
    from lposs_lab.kernels import stencil_operator
    from lposs_lab.kernels.torch_stencil import torch_stencil_operator
    from lposs_lab.kernels.triton_stencil import triton_stencil_operator
    from lposs_lab.pixels import refine_pixels, stencil_offsets

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for h, w, r, c, bp in [(7, 9, 5, 3, 16), (1, 6, 3, 10, 8), (5, 1, 3, 2, 8), (3, 4, 13, 5, 16)]:
        offs = stencil_offsets(r)
        wts = torch.rand((len(offs), h, w), generator=g) / len(offs)
        x = torch.randn((h * w, c), generator=g)
        ref = torch_stencil_operator(wts, offs, 0.95)(x)
        out = triton_stencil_operator(wts, offs, 0.95, block_p=bp)(x)
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
    op = stencil_operator(wts, offs, 0.95, backend="triton")
    assert op.__module__.endswith("triton_stencil"), op.__module__
    image = torch.rand((3, 6, 7), generator=g)
    scores = torch.randn((4, 6, 7), generator=g)
    a = refine_pixels(image, scores, r=3, backend="triton")
    b = refine_pixels(image, scores, r=3, backend="torch")
    worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    print("WORST", worst)
    """
)


@pytest.mark.slow  # a subprocess
def test_triton_kernel_under_interpreter_on_cpu():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _INTERPRET_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("WORST")[-1])
    assert worst < 2e-6


@cuda
def test_triton_on_cuda_matches_reference():
    pytest.importorskip("triton")
    for h, w, r, c in [(17, 23, 13, 21), (1, 40, 5, 3), (33, 1, 13, 70), (4, 3, 13, 5)]:
        weights, offsets, x = _problem(h, w, r, c, device="cuda")
        ref = torch_stencil_operator(weights, offsets, 0.95)(x)
        out = stencil_operator(weights, offsets, 0.95, backend="triton")(x)
        assert out.device.type == "cuda"
        assert _rel(out, ref) < 2e-6
    g = torch.Generator().manual_seed(0)
    image = torch.rand((3, 30, 41), generator=g).cuda()
    scores = torch.randn((7, 30, 41), generator=g).cuda()
    auto = refine_pixels(image, scores)
    ref = refine_pixels(image.cpu(), scores.cpu(), backend="torch")
    assert _rel(auto, ref) < 1e-5


@pytest.mark.parametrize(
    ("h", "w", "r", "spatial", "f"),
    [
        (17, 23, 13, "binary", 3),
        (9, 30, 5, "rbf", 4),
        (1, 12, 5, "binary", 3),
        (4, 3, 13, "binary", 3),
        (1, 1, 3, "rbf", 3),
    ],
)
def test_fused_numba_graph_equals_planes_laid_out(h, w, r, spatial, f):
    pytest.importorskip("numba")
    from lposs_lab.kernels.numba_solver import neighbourhood_from_features
    from lposs_lab.kernels.numba_stencil import full_neighbourhood
    from lposs_lab.pixels import pixel_graph

    g = torch.Generator().manual_seed(h * w + r)
    feats = torch.rand((f, h, w), generator=g) * 0.05
    feats[:, : h // 2] = 0.3  # a flat region: weights exactly 1 before normalisation
    planes, offsets = pixel_graph(feats, r=r, tau=0.02, spatial=spatial, sigma_s=2.5)
    want, half = full_neighbourhood(planes, offsets)
    got, half2 = neighbourhood_from_features(feats, r=r, tau=0.02, spatial=spatial, sigma_s=2.5)
    rw = -(-r // 8) * 8  # stencil rows stored in whole groups of eight
    assert half2 == half and got.shape == want.shape == (h * w, r, rw)
    assert float(abs(got - want).max()) <= 2e-6 * max(float(abs(want).max()), 1e-30)
    # Exactly symmetric: the weight of (p, q) is the weight of (q, p), bit for bit; zero elsewhere.
    for p in range(h * w):
        y, x = divmod(p, w)
        for i in range(r):
            for j in range(rw):
                dy, dx = i - half, j - half
                if j < r and 0 <= y + dy < h and 0 <= x + dx < w:
                    assert got[p, i, j] == got[(y + dy) * w + x + dx, r - 1 - i, r - 1 - j]
                else:
                    assert got[p, i, j] == 0


@pytest.mark.parametrize("c", [1, 8, 13, 70])
def test_fused_numba_solver_equals_generic_cg(c):
    pytest.importorskip("numba")
    from lposs_lab.kernels.numba_solver import numba_pixel_solver
    from lposs_lab.pixels import lab_features, pixel_graph
    from lposs_lab.propagation import conjugate_gradient

    g = torch.Generator().manual_seed(c)
    h, w = 15, 22
    feats = lab_features(torch.rand((3, h, w), generator=g))
    scores = torch.randn((c, h, w), generator=g)
    scores[0] = 0.0  # a zero column never starts
    if c > 1:
        scores[1] = 1.0  # a column that converges early and is then frozen
    planes, offsets = pixel_graph(feats, r=5, tau=0.05)
    op = torch_stencil_operator(planes, offsets, 0.9)
    for max_iter, tol in [(10, 1e-6), (25, 1e-3), (1, 1e-6)]:
        want = conjugate_gradient(op, scores.permute(1, 2, 0).reshape(h * w, c), max_iter=max_iter, tol=tol)
        want = want.reshape(h, w, c).permute(2, 0, 1)
        got = numba_pixel_solver(feats, r=5, tau=0.05, alpha=0.9, max_iter=max_iter, tol=tol)(scores)
        assert got.shape == (c, h, w) and got.dtype == torch.float32
        assert torch.equal(got[0], torch.zeros(h, w))
        assert _rel(got, want) < 1e-5, (max_iter, tol)


def test_row_stride_spreads_rows_over_cache_sets():
    pytest.importorskip("numba")
    from lposs_lab.kernels.numba_stencil import padded_width, row_layout, row_stride, slot_width

    assert [padded_width(c) for c in (1, 8, 9, 21, 171)] == [8, 8, 16, 24, 176]
    assert [slot_width(h) for h in (0, 1, 3, 4, 6, 8)] == [8, 8, 8, 16, 16, 24]
    # 640 pixels x 24 classes is 960 cache lines a row: every row would start in L1 set 0.
    ws = row_stride(640, 24, 6)
    assert 640 < ws < 672 and (ws * 24 * 4 // 64) % 64 != 0
    assert row_stride(23, 8, 6) >= 23
    # Room for a full 16-wide stencil row read at both borders.
    lead, ws = row_layout(640, 24, 6)
    assert lead == 6 and ws >= 6 + 640 + 16 - 6 - 1
