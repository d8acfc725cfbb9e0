import numpy as np
import pytest
import torch
from devices import cuda
from reference import ref_lab_features, ref_refine_pixels, rel_err

from lposs_lab import lab_features, pixel_graph, refine_pixels
from lposs_lab.kernels import available_backends
from lposs_lab.pixels import stencil_offsets

CPU_BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "numba")]


def _image(h, w, seed=0, flat=True):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g)
    if flat:  # flat regions: identical colours give weight exactly 1
        img[:, : h // 2, : w // 2] = torch.tensor([0.2, 0.5, 0.7])[:, None, None]
        img[:, h // 2 :, w // 3 :] = 1.0
    return img


@pytest.mark.parametrize(
    ("h", "w", "kwargs"),
    [
        (23, 31, {}),
        (40, 17, {"r": 5, "tau": 0.1}),
        (9, 50, {"spatial": "rbf", "sigma_s": 3.0}),
        (5, 4, {}),  # image smaller than the 13x13 stencil
        (1, 30, {"r": 7}),
        (16, 16, {"alpha": 0.8, "max_iter": 20}),
    ],
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refine_pixels_matches_float64_reference(h, w, kwargs, backend):
    img = _image(h, w)
    scores = torch.randn(4, h, w, generator=torch.Generator().manual_seed(1))
    out = refine_pixels(img, scores, backend=backend, **kwargs)
    ref = ref_refine_pixels(img.numpy(), scores.numpy(), **kwargs)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_refine_pixels_custom_features_and_class_chunks(backend):
    img = _image(20, 24)
    feats = torch.rand(4, 20, 24, generator=torch.Generator().manual_seed(5))
    scores = torch.randn(11, 20, 24, generator=torch.Generator().manual_seed(2))
    out = refine_pixels(img, scores, features=feats, tau=0.3, backend=backend)
    ref = ref_refine_pixels(img.numpy(), scores.numpy(), features=feats.numpy(), tau=0.3)
    assert rel_err(out, ref) <= 1e-4
    chunked = refine_pixels(
        img, scores, features=feats, tau=0.3, max_bytes=10 * 4 * 20 * 24 * 2, backend=backend
    )  # 2 classes/chunk
    assert torch.allclose(chunked, out, rtol=0, atol=1e-6)


def test_one_pixel_image_is_unchanged():
    img = torch.rand(3, 1, 1)
    scores = torch.randn(3, 1, 1)
    assert torch.allclose(refine_pixels(img, scores), scores)


def test_lab_matches_scikit_image():
    img = _image(30, 40, flat=False)
    img[:, 0, :5] = torch.tensor([[0.0, 1.0, 0.01, 0.04045, 0.5]])
    assert rel_err(lab_features(img), ref_lab_features(img.numpy())) <= 1e-5


def test_stencil_offsets_and_graph_layout():
    offs = stencil_offsets(13)
    assert (
        len(offs) == 84 and (0, 1) in offs and (6, -6) in offs and (0, -1) not in offs and (0, 0) not in offs
    )
    weights, offsets = pixel_graph(torch.zeros(3, 4, 5), r=3)
    assert weights.shape == (4, 4, 5)
    # last column has no right neighbour, last row no lower one
    n = offsets.index((0, 1))
    assert torch.all(weights[n, :, -1] == 0) and torch.all(weights[n, :, :-1] > 0)
    n = offsets.index((1, 0))
    assert torch.all(weights[n, -1, :] == 0)
    with pytest.raises(ValueError, match="odd"):
        stencil_offsets(4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"image must be \[3, H, W\]"):
        refine_pixels(torch.rand(4, 5, 5), torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match="scores must be"):
        refine_pixels(torch.rand(3, 5, 5), torch.rand(2, 5, 6))


@cuda
def test_refine_pixels_cuda_matches_reference():
    img = _image(33, 47)
    scores = torch.randn(5, 33, 47)
    img_gpu, scores_gpu = img.cuda(), scores.cuda()
    refine_pixels(img_gpu, scores_gpu)  # compiles the kernel (Triton may wait for the device then)
    for spatial in ("binary", "rbf"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the propagation never waits for the device
        try:
            out = refine_pixels(img_gpu, scores_gpu, spatial=spatial)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    out = refine_pixels(img_gpu, scores_gpu)
    assert out.device.type == "cuda"
    assert rel_err(out.cpu(), ref_refine_pixels(img.numpy(), scores.numpy())) <= 1e-4
    assert np.isfinite(out.cpu().numpy()).all()
