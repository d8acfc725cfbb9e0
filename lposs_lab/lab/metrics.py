"""Segmentation metrics (docs/method.md §7) as torchmetrics ``Metric``s whose states sum across DDP processes.

- :class:`SegmentationIoU`: per-class intersection and union accumulated over a split; mIoU is the mean over
  classes with a non-zero union. Pixels whose target is the ignore index are not counted.
- :class:`BoundaryIoU` (Cheng et al. 2021): the same on boundary bands, band = mask minus its erosion with a
  3x3 kernel repeated ``max(1, round(0.02 * image diagonal))`` times, the image border counting as outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "BoundaryIoU",
    "SegmentationIoU",
    "boundary_band",
    "boundary_iterations",
    "per_image_miou",
]


def _check_pair(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Validate and reshape to ``[B, H, W]`` int64 (pred on target's device)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError("pred and target must be torch tensors of class indices")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim != 3:
        raise ValueError(f"pred and target must be [H, W] or [B, H, W], got shape {tuple(pred.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred and target must hold integer class indices, not floats (take argmax first)")
    pred = pred.to(device=target.device, dtype=torch.int64)
    target = target.to(torch.int64)
    bad_t = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad_t.any()):
        v = int(target[bad_t][0])
        raise ValueError(
            f"target holds label {v} outside 0..{num_classes - 1} (ignore {ignore_index}); "
            "check the benchmark's num_classes and reduce_zero_label"
        )
    bad_p = (pred != ignore_index) & ((pred < 0) | (pred >= num_classes))
    if bool(bad_p.any()):
        v = int(pred[bad_p][0])
        raise ValueError(f"pred holds class {v} outside 0..{num_classes - 1} (or {ignore_index} for none)")
    return pred, target


def _iou_from_totals(intersection: Tensor, union: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class IoU ``[C]`` (NaN where union is 0) and its NaN-mean (NaN when every union is 0)."""
    inter = intersection.to(torch.float64)
    uni = union.to(torch.float64)
    iou = torch.where(uni > 0, inter / uni.clamp_min(1), torch.full_like(uni, math.nan))
    valid = uni > 0
    miou = (
        iou[valid].mean()
        if bool(valid.any())
        else torch.tensor(math.nan, dtype=torch.float64, device=iou.device)
    )
    return miou, iou


def _confusion_counts(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, ...]:
    """Intersection, pred area, target area ``[C]`` (int64), hits and count over non-ignored target pixels."""
    valid = target != ignore_index
    t = target[valid]
    p = pred[valid]
    hit = p == t
    inter = torch.bincount(t[hit], minlength=num_classes)
    area_t = torch.bincount(t, minlength=num_classes)
    area_p = torch.bincount(p[p != ignore_index], minlength=num_classes)
    return inter, area_p, area_t, hit.sum(), valid.sum()


class _CountMetric(Metric):
    """A metric whose states are integer counts: ``counts()`` of some images, accumulated by ``update``.

    Subclasses name their states in ``STATES`` and compute them in :meth:`counts`.
    """

    STATES: tuple[str, ...] = ()

    def counts(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_counts(self, counts: dict[str, Tensor]) -> None:
        """Accumulate states computed by :meth:`counts` (of this process or saved by an earlier run)."""
        self.update(counts=counts)

    def update(
        self,
        pred: Tensor | None = None,
        target: Tensor | None = None,
        *,
        counts: dict[str, Tensor] | None = None,
    ) -> None:
        """Add images (see :meth:`counts` for ``pred`` and ``target``), or counts made by :meth:`counts`."""
        if counts is None:
            if pred is None or target is None:
                raise TypeError("update needs pred and target, or counts=")
            counts = self.counts(pred, target)
        names = tuple(self.STATES)
        if set(counts) != set(names):
            raise ValueError(f"{type(self).__name__} counts need keys {sorted(names)}, got {sorted(counts)}")
        for name in names:
            state = getattr(self, name)
            value = torch.as_tensor(counts[name])
            if value.shape != state.shape:
                raise ValueError(
                    f"count {name!r} has shape {tuple(value.shape)}, expected {tuple(state.shape)} "
                    "(saved with another num_classes?)"
                )
            setattr(self, name, state + value.to(device=state.device, dtype=state.dtype))


class SegmentationIoU(_CountMetric):
    """Per-class IoU accumulated over a split (MMSeg's ``total_area`` mIoU).

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value not scored (predictions there are ignored too).

    States (int64, summed across processes): ``intersection [C]``, ``union [C]``, ``correct``, ``labeled``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} must not be a class index (0..{num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("labeled", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    STATES = ("intersection", "union", "correct", "labeled")

    def counts(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """This metric's states for ``pred`` alone (nothing is accumulated): ``{name: int64 tensor}``.

        Args:
            pred: ``[H, W]`` or ``[B, H, W]`` integer class indices (``ignore_index`` = no prediction).
            target: same shape, ground-truth labels with ``ignore_index`` for unlabeled pixels.
        """
        pred, target = _check_pair(pred, target, self.num_classes, self.ignore_index)
        inter, area_p, area_t, correct, labeled = _confusion_counts(
            pred, target, self.num_classes, self.ignore_index
        )
        union = area_p + area_t - inter
        return {"intersection": inter, "union": union, "correct": correct, "labeled": labeled}

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"mIoU": [], "per_class_iou": [C], "pixel_accuracy": []}`` (float64, in [0, 1])."""
        miou, iou = _iou_from_totals(self.intersection, self.union)
        acc = self.correct.to(torch.float64) / self.labeled.clamp_min(1).to(torch.float64)
        if int(self.labeled) == 0:
            acc = torch.full_like(acc, math.nan)
        return {"mIoU": miou, "per_class_iou": iou, "pixel_accuracy": acc}


#: Boundary IoU band width as a fraction of the image diagonal (Cheng et al. 2021): the one default of
#: ``metrics.dilation_ratio`` (``conf/metrics/default.yaml`` states the same value, tests check it).
DILATION_RATIO = 0.02


def boundary_iterations(height: int, width: int, dilation_ratio: float = DILATION_RATIO) -> int:
    """Number of 3x3 erosions for an image: ``max(1, round(dilation_ratio * sqrt(H^2 + W^2)))``."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def boundary_band(masks: Tensor, iterations: int) -> Tensor:
    """Inner boundary band of binary masks: mask minus its erosion.

    The erosion repeats a 3x3 square erosion ``iterations`` times with everything outside the image counted as
    background, computed in one pass as a separable (2k+1) min-pool over the zero-padded mask (equivalent).

    Args:
        masks: ``[N, H, W]`` bool masks.
        iterations: number of 3x3 erosions ``k >= 1``.

    Returns:
        ``[N, H, W]`` bool band, on the masks' device.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if masks.shape[0] == 0:
        return masks.bool()
    k = iterations
    x = masks.to(torch.float16 if masks.is_cuda else torch.float32)[:, None]
    # erosion = 1 - dilation of the complement; outside the image the complement is 1 (padding value 1)
    comp = F.pad(1 - x, (k, k, k, k), value=1.0)
    comp = F.max_pool2d(comp, kernel_size=(1, 2 * k + 1), stride=1)
    comp = F.max_pool2d(comp, kernel_size=(2 * k + 1, 1), stride=1)
    eroded = comp[:, 0] < 0.5
    return masks.bool() & ~eroded


class BoundaryIoU(_CountMetric):
    """Boundary IoU accumulated over a split (docs/method.md §7).

    Per image and per class present in the ground truth or the prediction, the GT band and the predicted band
    (see :func:`boundary_band`) are intersected and united; counts are summed over the split per class.
    The prediction is set to ignore where the target is ignore first, so ignored pixels are in neither mask.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value not scored.
        dilation_ratio: band width as a fraction of the image diagonal (0.02).
        class_chunk: masks eroded at once (bounds memory on large images).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        dilation_ratio: float = DILATION_RATIO,
        class_chunk: int = 16,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} must not be a class index (0..{num_classes - 1})")
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dilation_ratio = float(dilation_ratio)
        self.class_chunk = max(1, int(class_chunk))
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    STATES = ("intersection", "union")

    def counts(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """This metric's states for ``pred`` alone (nothing is accumulated): ``{name: int64 tensor}``.

        Args:
            pred: ``[H, W]`` or ``[B, H, W]`` integer class indices.
            target: same shape, ground truth with ``ignore_index`` for unlabeled pixels.
        """
        pred, target = _check_pair(pred, target, self.num_classes, self.ignore_index)
        iters = boundary_iterations(pred.shape[1], pred.shape[2], self.dilation_ratio)
        inter_tot = torch.zeros(self.num_classes, dtype=torch.int64, device=pred.device)
        union_tot = torch.zeros_like(inter_tot)
        for p, t in zip(pred, target, strict=True):
            p = torch.where(t == self.ignore_index, torch.full_like(p, self.ignore_index), p)
            present = torch.unique(torch.cat([t.flatten(), p.flatten()]))
            present = present[present != self.ignore_index]
            for start in range(0, present.numel(), self.class_chunk):
                cls = present[start : start + self.class_chunk]
                gt = t[None] == cls[:, None, None]
                pr = p[None] == cls[:, None, None]
                bands = boundary_band(torch.cat([gt, pr]), iters)
                gb, pb = bands[: cls.numel()], bands[cls.numel() :]
                inter_tot[cls] += (gb & pb).flatten(1).sum(1)
                union_tot[cls] += (gb | pb).flatten(1).sum(1)
        return {"intersection": inter_tot, "union": union_tot}

    def compute(self) -> dict[str, Tensor]:
        """Return ``{"mBIoU": [], "per_class_biou": [C]}`` (float64; NaN-mean over classes with a band)."""
        miou, iou = _iou_from_totals(self.intersection, self.union)
        return {"mBIoU": miou, "per_class_biou": iou}


def per_image_miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """mIoU of each image on its own (NaN-mean over classes present in its GT or prediction).

    Args:
        pred: ``[H, W]`` or ``[B, H, W]`` integer class indices.
        target: same shape, ground truth with ``ignore_index``.
        num_classes: number of classes ``C``.

    Returns:
        float64 tensor, ``[]`` for one image or ``[B]``; NaN for an image with no scored pixel.
    """
    single = pred.ndim == 2
    pred, target = _check_pair(pred, target, num_classes, ignore_index)
    b = pred.shape[0]
    offset = torch.arange(b, device=pred.device)[:, None, None] * num_classes
    valid = target != ignore_index
    t = (target + offset)[valid]
    p_raw = pred[valid]
    p = p_raw + offset.expand_as(pred)[valid]
    hit = p_raw == target[valid]
    n = b * num_classes
    inter = torch.bincount(t[hit], minlength=n).view(b, num_classes)
    area_t = torch.bincount(t, minlength=n).view(b, num_classes)
    area_p = torch.bincount(p[p_raw != ignore_index], minlength=n).view(b, num_classes)
    union = (area_p + area_t - inter).to(torch.float64)
    iou = torch.where(
        union > 0, inter.to(torch.float64) / union.clamp_min(1), torch.full_like(union, math.nan)
    )
    out = torch.nanmean(iou, dim=1)
    return out[0] if single else out
