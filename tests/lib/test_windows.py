import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lposs_lab.windows import (
    Window,
    crop_windows,
    resize_argmax,
    resize_image,
    resized_shape,
    stitch_windows,
    window_grid,
)


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((375, 500), (448, 597)),  # VOC-like: short side to 448, int(500 * 448/375 + .5) = 597
        ((1024, 2048), (448, 896)),  # Cityscapes x0.4375
        ((512, 683), (448, 598)),
        ((1, 1), (448, 448)),  # upscaled
        ((12, 3000), (8, 2048)),  # long side bound wins
        ((1, 10000), (1, 2048)),  # at least one pixel
    ],
)
def test_resized_shape(hw, expected):
    assert resized_shape(*hw) == expected


def test_resize_is_opencv_bilinear_on_uint8():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    out = resize_image(img)
    assert out.dtype == np.uint8 and out.shape == (448, 627, 3)
    assert np.array_equal(out, cv2.resize(img, (627, 448), interpolation=cv2.INTER_LINEAR))


def test_window_grid_counts_and_spans():
    wins = window_grid(448, 597)
    # n = max(H - 224 + 112 - 1, 0) // 112 + 1 per axis
    assert len(wins) == 3 * 5
    assert wins[0] == Window(0, 224, 0, 224)
    assert wins[4] == Window(0, 224, 373, 597)  # last column clamped to the border
    assert wins[-1] == Window(224, 448, 373, 597)
    assert all(w.height == 224 and w.width == 224 for w in wins)
    # 448/224 windows and no windows
    assert [(w.y1, w.x1) for w in window_grid(448, 896, 448, 224)] == [(0, 0), (0, 224), (0, 448)]
    assert window_grid(448, 597, 0, 0) == [Window(0, 448, 0, 597)]
    # a side smaller than the window gives one window of that side
    assert window_grid(100, 300) == [Window(0, 100, 0, 224), Window(0, 100, 76, 300)]


def test_window_coverage_is_complete():
    for h, w in [(448, 597), (448, 2048), (8, 2048), (300, 300)]:
        cover = np.zeros((h, w), int)
        for win in window_grid(h, w):
            cover[win.y1 : win.y2, win.x1 : win.x2] += 1
        assert cover.min() >= 1


def test_crop_and_stitch_constant_and_upsampling():
    img = torch.rand(3, 300, 400)
    wins = window_grid(300, 400)
    crops = crop_windows(img, wins)
    assert crops.shape == (len(wins), 3, 224, 224)
    assert torch.equal(crops[1], img[:, 0:224, 112:336])
    const = torch.full((len(wins), 2, 14, 14), 3.0)
    assert torch.allclose(stitch_windows(const, wins, 300, 400), torch.full((2, 300, 400), 3.0))
    # one window: a plain bilinear upsample (a padded 13x13 grid stretched over 200x200)
    grid = torch.rand(1, 4, 13, 13)
    out = stitch_windows(grid, [Window(0, 200, 0, 200)], 200, 200)
    assert torch.allclose(out, F.interpolate(grid, size=(200, 200), mode="bilinear", align_corners=False)[0])


def test_stitch_averages_overlaps():
    wins = [Window(0, 4, 0, 4), Window(0, 4, 2, 6)]
    grids = torch.stack([torch.ones(1, 4, 4), 3 * torch.ones(1, 4, 4)])
    out = stitch_windows(grids, wins, 4, 6)[0]
    assert torch.all(out[:, :2] == 1) and torch.all(out[:, 2:4] == 2) and torch.all(out[:, 4:] == 3)


def test_resize_argmax_chunks_equal_full():
    scores = torch.randn(11, 17, 23)
    labels, best = resize_argmax(scores, 40, 50, max_elements=40 * 50 * 3)
    full = F.interpolate(scores[None], size=(40, 50), mode="bilinear", align_corners=False)[0]
    assert torch.equal(labels, full.argmax(0))
    assert torch.allclose(best, full.max(0).values)
