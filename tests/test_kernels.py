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

REPO = Path(__file__).resolve().parents[1]
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
