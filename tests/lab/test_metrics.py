"""Metrics against hand-computed values and an independent scipy reference (docs/method.md §7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scoring import np_boundary_counts, np_miou, np_pixel_accuracy

from lposs_lab.lab.data.benchmarks import reduce_zero_label
from lposs_lab.lab.metrics import (
    BoundaryIoU,
    SegmentationIoU,
    boundary_band,
    boundary_iterations,
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
    counts = m.counts(t(PRED), t(TARGET))
    assert counts["intersection"].tolist() == [1, 2, 0] and counts["union"].tolist() == [2, 4, 1]
    assert int(counts["correct"]) == 3 and int(counts["labeled"]) == 5
    m.update(t(PRED), t(TARGET))
    out = m.compute()
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
    assert int(m.counts(pred, torch.from_numpy(target))["labeled"]) == 2


def test_no_labeled_pixel_gives_nan():
    m = SegmentationIoU(num_classes=2)
    m.update(t([[0, 1]]), t([[I, I]]))
    out = m.compute()
    assert math.isnan(float(out["mIoU"])) and math.isnan(float(out["pixel_accuracy"]))
    # the predictions at ignored pixels did not create a union
    assert m.counts(t([[0, 1]]), t([[I, I]]))["union"].tolist() == [0, 0]


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
    assert torch.equal(a["per_class_iou"], b["per_class_iou"]) and float(a["mIoU"]) == float(b["mIoU"])
    assert float(a["pixel_accuracy"]) == float(b["pixel_accuracy"])
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
    counts = m.counts(pred, gt)
    m.update(pred, gt)
    # class 0: GT band 14 px (interior col 1 rows 1-4 eroded), pred band = all 12 px of cols 0-1; overlap 8
    # class 1: GT band 14 px (col 4 rows 1-4 eroded), pred band 16 px (cols 3-4 rows 1-4 eroded); overlap 10
    assert counts["intersection"].tolist() == [8, 10]
    assert counts["union"].tolist() == [18, 20]
    assert float(m.compute()["mBIoU"]) == pytest.approx((8 / 18 + 10 / 20) / 2)


def test_boundary_iou_prediction_ignored_where_gt_ignored():
    # 4x6, k = 1. GT: cols 0-2 class 0, col 3 ignore, cols 4-5 class 1. Prediction: class 0 everywhere.
    gt = t([[0, 0, 0, I, 1, 1]] * 4)
    pred = torch.zeros(4, 6, dtype=torch.int64)
    m = BoundaryIoU(num_classes=3)
    counts = m.counts(pred, gt)
    m.update(pred, gt)
    # the ignored column is outside both masks: class 0 GT band = 12 - 2 interior = 10 px; pred class 0 is
    # cols 0-2 (same band, 10 px) plus cols 4-5 (all 8 px band). class 1: GT band 8 px, no prediction.
    assert counts["intersection"].tolist() == [10, 0, 0]
    assert counts["union"].tolist() == [18, 8, 0]
    out = m.compute()
    assert math.isnan(float(out["per_class_biou"][2]))  # absent from both: not in the mean
    assert float(out["mBIoU"]) == pytest.approx((10 / 18 + 0) / 2)


def test_boundary_iou_iterations_on_bigger_image():
    # 100x100 -> 3 erosions. GT: class 0 with a 20x20 class-1 square; prediction: all class 0.
    gt = torch.zeros(100, 100, dtype=torch.int64)
    gt[40:60, 40:60] = 1
    pred = torch.zeros_like(gt)
    m = BoundaryIoU(num_classes=2)
    counts = m.counts(pred, gt)
    m.update(pred, gt)
    outer_ring = 100 * 100 - 94 * 94  # 3 px wide band along the image border
    hole_ring = 26 * 26 - 20 * 20  # class-0 pixels within 3 px (Chebyshev) of the square
    square_band = 20 * 20 - 14 * 14
    assert counts["intersection"].tolist() == [outer_ring, 0]
    assert counts["union"].tolist() == [outer_ring + hole_ring, square_band]
    assert float(m.compute()["mBIoU"]) == pytest.approx(outer_ring / (outer_ring + hole_ring) / 2)


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
    inter, union = np_boundary_counts(pred, gt, c)
    assert (union > 0).all()
    for chunk in (2, 16):  # chunking must not change anything
        m = BoundaryIoU(num_classes=c, class_chunk=chunk)
        counts = m.counts(torch.from_numpy(pred), torch.from_numpy(gt))
        assert counts["intersection"].tolist() == inter.tolist()
        assert counts["union"].tolist() == union.tolist()
        m.update(torch.from_numpy(pred), torch.from_numpy(gt))
        assert float(m.compute()["mBIoU"]) == pytest.approx(float(np.mean(inter / union)), abs=1e-12)


def test_boundary_accumulation_equals_batched_update():
    rng = np.random.default_rng(3)
    gt = torch.from_numpy(_blobby_labels(rng, 4, 30, 40, 4))
    pred = torch.from_numpy(_blobby_labels(rng, 4, 30, 40, 4)).clamp_max(3)
    one = BoundaryIoU(num_classes=4)
    one.update(pred, gt)
    many = BoundaryIoU(num_classes=4)
    for p, g in zip(pred, gt, strict=True):
        many.update(p, g)
    a, b = one.compute(), many.compute()
    assert torch.equal(a["per_class_biou"], b["per_class_biou"]) and float(a["mBIoU"]) == float(b["mBIoU"])
    inter, union = np_boundary_counts(pred.numpy(), gt.numpy(), 4)
    assert float(a["mBIoU"]) == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])))


# ---------------------------------------------------------------- counts: resumable, summable


def _split(seed, n=4, h=12, w=12, c=3):
    """A small split of blobby maps with ignored pixels and a prediction for it."""
    rng = np.random.default_rng(seed)
    gt = torch.from_numpy(_blobby_labels(rng, n, h, w, c))
    pred = torch.from_numpy(_blobby_labels(rng, n, h, w, c))
    pred[pred == I] = 0
    return pred, gt


@pytest.mark.parametrize("cls", [SegmentationIoU, BoundaryIoU])
def test_counts_are_pure_and_add_counts_equals_update(cls):
    pred, gt = _split(4)
    m = cls(num_classes=3)
    counts = m.counts(pred, gt)
    assert set(counts) == set(cls.STATES)
    assert all(v.dtype == torch.int64 for v in counts.values())
    # counts() accumulates nothing: afterwards one image scores as that image alone
    m.update(pred[:1], gt[:1])
    alone = cls(num_classes=3)
    alone.update(pred[:1], gt[:1])
    for key, value in m.compute().items():
        assert torch.allclose(value, alone.compute()[key], equal_nan=True), key
    by_update = cls(num_classes=3)
    by_update.update(pred, gt)
    by_counts = cls(num_classes=3)
    by_counts.add_counts(counts)
    by_kw = cls(num_classes=3)
    by_kw.update(counts=counts)
    want = by_update.compute()
    for other in (by_counts, by_kw):
        got = other.compute()
        for key in want:
            assert torch.allclose(got[key], want[key], equal_nan=True), key
    with pytest.raises(TypeError, match="pred and target, or counts="):
        cls(num_classes=3).update(pred)


def test_per_image_counts_sum_to_the_split_and_equal_the_numpy_reference():
    pred, gt = _split(5, n=5, h=17, w=23, c=4)
    m = SegmentationIoU(num_classes=4)
    per_image = [m.counts(p, g) for p, g in zip(pred, gt, strict=True)]
    summed = {k: sum(c[k] for c in per_image) for k in SegmentationIoU.STATES}
    whole = m.counts(pred, gt)
    for k in SegmentationIoU.STATES:
        assert torch.equal(summed[k], whole[k]), k
    ref, inter, union = np_miou(pred.numpy(), gt.numpy(), 4)
    assert summed["intersection"].tolist() == inter.astype(int).tolist()
    assert summed["union"].tolist() == union.astype(int).tolist()
    m.add_counts(summed)
    out = m.compute()
    assert float(out["mIoU"]) == pytest.approx(ref, abs=1e-12)
    assert float(out["pixel_accuracy"]) == pytest.approx(np_pixel_accuracy(pred.numpy(), gt.numpy()))
    # the boundary counts too: per image (each its own erosion depth) summed = the scipy reference
    b = BoundaryIoU(num_classes=4)
    bsum = {k: sum(b.counts(p, g)[k] for p, g in zip(pred, gt, strict=True)) for k in BoundaryIoU.STATES}
    inter_b, union_b = np_boundary_counts(pred.numpy(), gt.numpy(), 4)
    assert bsum["intersection"].tolist() == inter_b.tolist() and bsum["union"].tolist() == union_b.tolist()


@pytest.mark.parametrize("cls", [SegmentationIoU, BoundaryIoU])
def test_resuming_from_saved_counts_equals_one_uninterrupted_pass(cls):
    pred, gt = _split(6, n=6)
    full = cls(num_classes=3)
    full.update(pred, gt)
    # an earlier run's per-image counts as JSON-like lists (what the state files hold), then the rest
    saved = [
        {k: v.tolist() for k, v in cls(num_classes=3).counts(p, g).items()}
        for p, g in zip(pred[:2], gt[:2], strict=True)
    ]
    resumed = cls(num_classes=3)
    for rec in saved:
        resumed.add_counts({k: torch.tensor(v, dtype=torch.int64) for k, v in rec.items()})
    resumed.update(pred[2:], gt[2:])
    want, got = full.compute(), resumed.compute()
    for key in want:
        assert torch.equal(got[key].isnan(), want[key].isnan()) and torch.allclose(
            got[key], want[key], equal_nan=True
        ), key
    counts = cls(num_classes=3).counts(pred, gt)
    with pytest.raises(ValueError, match="num_classes"):
        cls(num_classes=4).add_counts(counts)
    with pytest.raises(ValueError, match="need keys"):
        cls(num_classes=3).add_counts({"intersection": counts["intersection"]})


def test_reset_forgets_what_was_added():
    m = SegmentationIoU(num_classes=3)
    m.update(t([[2, 2, 2], [2, 2, 2]]), t(TARGET))
    m.reset()
    m.update(t(PRED), t(TARGET))  # after reset: exactly this image's numbers
    assert float(m.compute()["mIoU"]) == pytest.approx(1 / 3)
    assert float(m.compute()["pixel_accuracy"]) == pytest.approx(3 / 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_boundary_iou_on_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    gt = torch.from_numpy(_blobby_labels(rng, 2, 64, 80, 6))
    pred = torch.from_numpy(_blobby_labels(rng, 2, 64, 80, 6)).clamp_max(5)
    cpu = BoundaryIoU(num_classes=6)
    cpu.update(pred, gt)
    gpu = BoundaryIoU(num_classes=6).cuda()
    gpu.update(pred.cuda(), gt.cuda())
    gpu_counts = BoundaryIoU(num_classes=6).cuda().counts(pred.cuda(), gt.cuda())
    assert gpu_counts["intersection"].device.type == "cuda"
    for key, value in BoundaryIoU(num_classes=6).counts(pred, gt).items():
        assert torch.equal(value, gpu_counts[key].cpu()), key
    assert float(cpu.compute()["mBIoU"]) == float(gpu.compute()["mBIoU"])
    miou = SegmentationIoU(num_classes=6).cuda()
    miou.update(pred.cuda(), gt.cuda())
    assert miou.compute()["mIoU"].device.type == "cuda"
