"""Metrics against hand-computed values and an independent scipy reference (SPEC section 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lposs_lab.lab.data.benchmarks import reduce_zero_label
from lposs_lab.lab.metrics import (
    BoundaryIoU,
    SegmentationIoU,
    boundary_band,
    boundary_iterations,
    load_metric_states,
    metric_states,
    per_image_miou,
)

I = 255  # noqa: E741 - ignore index, keeps the hand-written maps readable


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------- mIoU


TARGET = [[0, 0, 1], [1, I, 2]]
PRED = [[0, 1, 1], [1, 0, 1]]
# valid pixels: (0,0) 0/0 hit, (0,1) t0/p1, (0,2) 1/1 hit, (1,0) 1/1 hit, (1,2) t2/p1; (1,1) ignored
# intersection [1, 2, 0]; target area [2, 2, 1]; pred area [1, 4, 0]; union [2, 4, 1]


def test_miou_hand_computed():
    m = SegmentationIoU(num_classes=3)
    m.update(t(PRED), t(TARGET))
    out = m.compute()
    assert m.intersection.tolist() == [1, 2, 0]
    assert m.union.tolist() == [2, 4, 1]
    assert out["per_class_iou"].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert float(out["mIoU"]) == pytest.approx(1 / 3)
    assert float(out["pixel_accuracy"]) == pytest.approx(3 / 5)


def test_class_absent_from_both_is_excluded_from_mean():
    m = SegmentationIoU(num_classes=4)
    m.update(t(PRED), t(TARGET))
    out = m.compute()
    assert math.isnan(float(out["per_class_iou"][3]))
    assert float(out["mIoU"]) == pytest.approx(1 / 3)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    pred = [[0, 1, 1], [1, 0, 3]]  # class 3 predicted at (1,2), never in GT
    m = SegmentationIoU(num_classes=4)
    m.update(t(pred), t(TARGET))
    out = m.compute()
    # intersection [1,2,0,0]; pred area [1,3,0,1]; target area [2,2,1,0]; union [2,3,1,1]
    assert out["per_class_iou"].tolist() == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    assert float(out["mIoU"]) == pytest.approx((0.5 + 2 / 3) / 4)


def test_prediction_at_ignored_pixels_not_counted_and_reduce_zero_label():
    raw = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    target = reduce_zero_label(raw)
    assert target.tolist() == [[255, 0], [1, 255]]
    pred = t([[1, 0], [1, 1]])  # class 1 at both ignored pixels: must not enter class 1's union
    m = SegmentationIoU(num_classes=2)
    m.update(pred, torch.from_numpy(target))
    out = m.compute()
    assert out["per_class_iou"].tolist() == [1.0, 1.0]
    assert float(out["pixel_accuracy"]) == 1.0
    assert int(m.labeled) == 2


def test_no_labeled_pixel_gives_nan():
    m = SegmentationIoU(num_classes=2)
    m.update(t([[0, 1]]), t([[I, I]]))
    out = m.compute()
    assert math.isnan(float(out["mIoU"])) and math.isnan(float(out["pixel_accuracy"]))
    # the predictions at ignored pixels did not create a union
    assert m.union.tolist() == [0, 0]


def _random_maps(rng, n, h, w, c, ignore_frac=0.1):
    target = rng.integers(0, c, size=(n, h, w))
    target[rng.random((n, h, w)) < ignore_frac] = I
    pred = np.where(rng.random((n, h, w)) < 0.6, target, rng.integers(0, c, size=(n, h, w)))
    pred[pred == I] = 0
    return torch.from_numpy(pred), torch.from_numpy(target)


def test_accumulation_equals_one_big_computation():
    rng = np.random.default_rng(0)
    pred, target = _random_maps(rng, 5, 9, 13, 6)
    acc = SegmentationIoU(num_classes=6)
    for p, g in zip(pred, target, strict=True):
        acc.update(p, g)
    acc.update(pred[:0], target[:0])  # an empty batch changes nothing
    big = SegmentationIoU(num_classes=6)
    big.update(pred.reshape(1, -1, 13), target.reshape(1, -1, 13))
    a, b = acc.compute(), big.compute()
    assert torch.equal(acc.intersection, big.intersection) and torch.equal(acc.union, big.union)
    assert float(a["mIoU"]) == float(b["mIoU"])
    # and against a plain numpy confusion matrix
    valid = target.numpy() != I
    conf = np.zeros((6, 6), dtype=np.int64)
    np.add.at(conf, (target.numpy()[valid], pred.numpy()[valid]), 1)
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert float(a["mIoU"]) == pytest.approx(np.nanmean(iou))


def test_per_image_miou_matches_metric_on_each_image():
    rng = np.random.default_rng(1)
    pred, target = _random_maps(rng, 3, 8, 10, 5)
    per = per_image_miou(pred, target, 5)
    assert per.shape == (3,) and per.dtype == torch.float64
    for i in range(3):
        m = SegmentationIoU(num_classes=5)
        m.update(pred[i], target[i])
        assert float(per[i]) == pytest.approx(float(m.compute()["mIoU"]))
    single = per_image_miou(t(PRED), t(TARGET), 3)
    assert single.shape == () and float(single) == pytest.approx(1 / 3)


def test_bad_inputs_raise_clear_errors():
    m = SegmentationIoU(num_classes=3)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        m.update(t([[0, 1]]), t([[0, 3]]))
    with pytest.raises(ValueError, match="outside 0..2"):
        m.update(t([[0, 7]]), t([[0, 1]]))
    with pytest.raises(ValueError, match="differs from target shape"):
        m.update(t([[0, 1]]), t([[0, 1, 1]]))
    with pytest.raises(ValueError, match="argmax"):
        m.update(torch.zeros(2, 2), t([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="must not be a class index"):
        SegmentationIoU(num_classes=300)


# ---------------------------------------------------------------- boundary bands


def test_band_of_full_mask_is_border_ring():
    band = boundary_band(torch.ones(1, 5, 5, dtype=torch.bool), 1)[0]
    expected = [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1],
    ]
    assert band.int().tolist() == expected
    band2 = boundary_band(torch.ones(1, 5, 5, dtype=torch.bool), 2)[0]
    # two erosions leave only the centre pixel: everything else is band
    assert band2.int().tolist() == [[1] * 5, [1] * 5, [1, 1, 0, 1, 1], [1] * 5, [1] * 5]
    assert boundary_band(torch.ones(1, 5, 5, dtype=torch.bool), 3)[0].all()


def test_band_of_interior_square():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 1:6, 1:6] = True
    band = boundary_band(m, 1)[0].int().tolist()
    expected = [
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 1, 0, 0, 0, 1, 0],
        [0, 1, 0, 0, 0, 1, 0],
        [0, 1, 0, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]
    assert band == expected


def test_boundary_iterations_from_diagonal():
    assert boundary_iterations(6, 6) == 1  # 0.02 * 8.49 rounds to 0 -> at least 1
    assert boundary_iterations(100, 100) == 3  # 0.02 * 141.4 = 2.83
    assert boundary_iterations(512, 512) == 14  # 0.02 * 724.1 = 14.48
    assert boundary_iterations(1024, 2048) == 46  # 0.02 * 2289.7 = 45.79


def test_boundary_iou_two_halves_shifted_prediction():
    # 6x6, k = 1. GT: columns 0-2 class 0, 3-5 class 1. Prediction: columns 0-1 class 0, 2-5 class 1.
    gt = t([[0, 0, 0, 1, 1, 1]] * 6)
    pred = t([[0, 0, 1, 1, 1, 1]] * 6)
    m = BoundaryIoU(num_classes=2)
    m.update(gt, gt)
    assert m.compute()["per_class_biou"].tolist() == [1.0, 1.0]
    m = BoundaryIoU(num_classes=2)
    m.update(pred, gt)
    # class 0: GT band 14 px (interior col 1 rows 1-4 eroded), pred band = all 12 px of cols 0-1; overlap 8
    # class 1: GT band 14 px (col 4 rows 1-4 eroded), pred band 16 px (cols 3-4 rows 1-4 eroded); overlap 10
    assert m.intersection.tolist() == [8, 10]
    assert m.union.tolist() == [18, 20]
    assert float(m.compute()["mBIoU"]) == pytest.approx((8 / 18 + 10 / 20) / 2)


def test_boundary_iou_prediction_ignored_where_gt_ignored():
    # 4x6, k = 1. GT: cols 0-2 class 0, col 3 ignore, cols 4-5 class 1. Prediction: class 0 everywhere.
    gt = t([[0, 0, 0, I, 1, 1]] * 4)
    pred = torch.zeros(4, 6, dtype=torch.int64)
    m = BoundaryIoU(num_classes=3)
    m.update(pred, gt)
    # the ignored column is outside both masks: class 0 GT band = 12 - 2 interior = 10 px; pred class 0 is
    # cols 0-2 (same band, 10 px) plus cols 4-5 (all 8 px band). class 1: GT band 8 px, no prediction.
    assert m.intersection.tolist() == [10, 0, 0]
    assert m.union.tolist() == [18, 8, 0]
    out = m.compute()
    assert math.isnan(float(out["per_class_biou"][2]))  # absent from both: not in the mean
    assert float(out["mBIoU"]) == pytest.approx((10 / 18 + 0) / 2)


def test_boundary_iou_iterations_on_bigger_image():
    # 100x100 -> 3 erosions. GT: class 0 with a 20x20 class-1 square; prediction: all class 0.
    gt = torch.zeros(100, 100, dtype=torch.int64)
    gt[40:60, 40:60] = 1
    pred = torch.zeros_like(gt)
    m = BoundaryIoU(num_classes=2)
    m.update(pred, gt)
    outer_ring = 100 * 100 - 94 * 94  # 3 px wide band along the image border
    hole_ring = 26 * 26 - 20 * 20  # class-0 pixels within 3 px (Chebyshev) of the square
    square_band = 20 * 20 - 14 * 14
    assert m.intersection.tolist() == [outer_ring, 0]
    assert m.union.tolist() == [outer_ring + hole_ring, square_band]
    assert float(m.compute()["mBIoU"]) == pytest.approx(outer_ring / (outer_ring + hole_ring) / 2)


def _reference_boundary_counts(pred: np.ndarray, gt: np.ndarray, c: int, ratio: float = 0.02):
    """Independent Boundary IoU counts with scipy's binary erosion (outside the image = 0)."""
    inter = np.zeros(c, dtype=np.int64)
    union = np.zeros(c, dtype=np.int64)
    for p, g in zip(pred, gt, strict=True):
        h, w = g.shape
        k = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
        p = np.where(g == I, I, p)
        for cls in range(c):
            gm, pm = g == cls, p == cls
            if not (gm.any() or pm.any()):
                continue
            st = np.ones((3, 3), dtype=bool)
            gb = gm & ~ndimage.binary_erosion(gm, structure=st, iterations=k, border_value=0)
            pb = pm & ~ndimage.binary_erosion(pm, structure=st, iterations=k, border_value=0)
            inter[cls] += (gb & pb).sum()
            union[cls] += (gb | pb).sum()
    return inter, union


def _blobby_labels(rng, n, h, w, c):
    noise = rng.random((n, c, h, w))
    smooth = ndimage.uniform_filter(noise, size=(1, 1, 7, 7))
    labels = smooth.argmax(1)
    labels[rng.random((n, h, w)) < 0.03] = I
    return labels


@pytest.mark.parametrize("size", [(37, 53), (120, 90)])
def test_boundary_iou_matches_scipy_reference(size):
    rng = np.random.default_rng(size[0])
    c = 5
    gt = _blobby_labels(rng, 3, *size, c)
    pred = _blobby_labels(rng, 3, *size, c)
    pred[pred == I] = 0
    m = BoundaryIoU(num_classes=c, class_chunk=2)  # chunking must not change anything
    m.update(torch.from_numpy(pred), torch.from_numpy(gt))
    inter, union = _reference_boundary_counts(pred, gt, c)
    assert m.intersection.numpy().tolist() == inter.tolist()
    assert m.union.numpy().tolist() == union.tolist()
    assert (union > 0).all()


def test_boundary_accumulation_equals_batched_update():
    rng = np.random.default_rng(3)
    gt = torch.from_numpy(_blobby_labels(rng, 4, 30, 40, 4))
    pred = torch.from_numpy(_blobby_labels(rng, 4, 30, 40, 4)).clamp_max(3)
    one = BoundaryIoU(num_classes=4)
    one.update(pred, gt)
    many = BoundaryIoU(num_classes=4)
    for p, g in zip(pred, gt, strict=True):
        many.update(p, g)
    assert torch.equal(one.intersection, many.intersection) and torch.equal(one.union, many.union)


# ---------------------------------------------------------------- resumable states


@pytest.mark.parametrize("cls", [SegmentationIoU, BoundaryIoU])
def test_metric_states_roundtrip_resumes_accumulation(cls):
    rng = np.random.default_rng(4)
    pred, target = _random_maps(rng, 4, 12, 12, 3)
    full = cls(num_classes=3)
    full.update(pred, target)
    first = cls(num_classes=3)
    first.update(pred[:2], target[:2])
    states = metric_states(first)
    assert set(states) >= {"intersection", "union"} and all(v.device.type == "cpu" for v in states.values())
    resumed = cls(num_classes=3)
    load_metric_states(resumed, states)
    resumed.update(pred[2:], target[2:])
    for name, value in metric_states(full).items():
        assert torch.equal(value, metric_states(resumed)[name]), name
    with pytest.raises(ValueError, match="num_classes"):
        load_metric_states(cls(num_classes=4), states)
    with pytest.raises(ValueError, match="need keys"):
        load_metric_states(cls(num_classes=3), {"intersection": states["intersection"]})


def test_metric_reset_and_states_are_summed_for_ddp():
    m = SegmentationIoU(num_classes=3)
    assert {name: fx.__name__ for name, fx in m._reductions.items()} == {
        "intersection": "dim_zero_sum",
        "union": "dim_zero_sum",
        "correct": "dim_zero_sum",
        "labeled": "dim_zero_sum",
    }
    m.update(t(PRED), t(TARGET))
    m.reset()
    assert m.intersection.tolist() == [0, 0, 0] and int(m.labeled) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_boundary_iou_on_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    gt = torch.from_numpy(_blobby_labels(rng, 2, 64, 80, 6))
    pred = torch.from_numpy(_blobby_labels(rng, 2, 64, 80, 6)).clamp_max(5)
    cpu = BoundaryIoU(num_classes=6)
    cpu.update(pred, gt)
    gpu = BoundaryIoU(num_classes=6).cuda()
    gpu.update(pred.cuda(), gt.cuda())
    assert gpu.intersection.device.type == "cuda"
    assert torch.equal(cpu.intersection, gpu.intersection.cpu()) and torch.equal(cpu.union, gpu.union.cpu())
    miou = SegmentationIoU(num_classes=6).cuda()
    miou.update(pred.cuda(), gt.cuda())
    assert miou.compute()["mIoU"].device.type == "cuda"
