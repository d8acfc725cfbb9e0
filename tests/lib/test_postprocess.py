"""PAMR (docs/predictors.md §6) against an independent float64 numpy reference written from the text."""

import numpy as np
import pytest
import torch
from devices import cuda
from reference import rel_err

from lposs_lab import pamr


def ref_pamr(image: np.ndarray, scores: np.ndarray, iterations=10, dilations=(8, 16)) -> np.ndarray:
    """Pixel by pixel, from docs/predictors.md §6: neighbours p + d*delta, coordinates clamped (replicate)."""
    img = np.asarray(image, dtype=np.float64)
    m = np.asarray(scores, dtype=np.float64)
    k, h, w = img.shape
    deltas = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neigh = [(d * dy, d * dx) for d in dilations for dy, dx in deltas if (dy, dx) != (0, 0)]
    around = [(d * dy, d * dx) for d in dilations for dy, dx in deltas]  # centre once per dilation

    def at(y, x):
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    weights = np.zeros((h, w, len(neigh)))
    sources = np.zeros((h, w, len(neigh), 2), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            vals = np.array([img[(slice(None), *at(y + oy, x + ox))] for oy, ox in around])  # [18, K]
            sigma = vals.std(axis=0, ddof=1)  # [K]
            a = np.empty(len(neigh))
            for n, (oy, ox) in enumerate(neigh):
                yy, xx = at(y + oy, x + ox)
                sources[y, x, n] = (yy, xx)
                a[n] = -np.mean(np.abs(img[:, y, x] - img[:, yy, xx]) / (1e-8 + 0.1 * sigma))
            e = np.exp(a - a.max())
            weights[y, x] = e / e.sum()
    for _ in range(iterations):
        gathered = m[:, sources[..., 0], sources[..., 1]]  # [C, H, W, 16]
        m = (gathered * weights[None]).sum(-1)
    return m


@pytest.mark.parametrize(
    ("k", "c", "h", "w", "kwargs"),
    [
        (3, 4, 23, 37, {}),  # non-square, C > 1, smaller than 2 * 16 on one side
        (3, 1, 40, 19, {}),
        (2, 3, 17, 17, {"iterations": 3, "dilations": (1, 2, 5)}),
        (1, 2, 6, 9, {"iterations": 1, "dilations": (2,)}),
    ],
)
def test_pamr_matches_float64_reference(k, c, h, w, kwargs):
    g = torch.Generator().manual_seed(h * w + c)
    image = torch.randn(k, h, w, generator=g)
    image[:, : h // 2] = 0.3  # a flat region: sigma 0 there, the 1e-8 matters
    scores = torch.randn(c, h, w, generator=g)
    out = pamr(image, scores, **kwargs)
    ref = ref_pamr(image.numpy(), scores.numpy(), **kwargs)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    # a float64 input is computed in float64
    out64 = pamr(image.double(), scores.double(), **kwargs)
    assert out64.dtype == torch.float64 and rel_err(out64, ref) <= 1e-10


def test_pamr_batched_equals_per_image_and_properties():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 20, 30, generator=g)
    scores = torch.randn(2, 5, 20, 30, generator=g)
    out = pamr(image, scores)
    for b in range(2):
        assert torch.allclose(out[b], pamr(image[b], scores[b]), rtol=0, atol=1e-6)
    # convex combinations: constant maps stay constant, values stay within the input's range
    const = torch.full((3, 20, 30), 0.7)
    assert torch.allclose(pamr(image[0], const), const, atol=1e-6)
    assert out.min() >= scores.min() - 1e-5 and out.max() <= scores.max() + 1e-5
    assert torch.equal(pamr(image[0], scores[0], iterations=0), scores[0])


@pytest.mark.parametrize(
    ("image", "scores", "kwargs", "message"),
    [
        (torch.zeros(3, 8, 8), torch.zeros(2, 8, 9), {}, "differ in size"),
        (torch.zeros(8, 8), torch.zeros(2, 8, 8), {}, r"image must be \[K, H, W\]"),
        (torch.zeros(3, 8, 8), torch.zeros(1, 2, 8, 8), {}, r"scores must be \[C, H, W\]"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3, 2, 8, 8), {}, "batch sizes differ"),
        (torch.zeros(3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), {}, "float tensors"),
        (torch.zeros(3, 8, 8), torch.zeros(2, 8, 8), {"dilations": ()}, "dilations"),
        (torch.zeros(3, 8, 8), torch.zeros(2, 8, 8), {"dilations": (0, 2)}, "dilations"),
        (torch.zeros(3, 8, 8), torch.zeros(2, 8, 8), {"iterations": -1}, "iterations"),
        (torch.zeros(3, 8, 8), torch.zeros(0, 8, 8), {}, "empty"),
    ],
)
def test_pamr_bad_inputs(image, scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pamr(image, scores, **kwargs)


@cuda
def test_pamr_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 64, 80, generator=g)
    scores = torch.randn(21, 64, 80, generator=g)
    gpu = pamr(image.cuda(), scores.cuda())
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.cpu(), pamr(image, scores)) <= 1e-5
