"""Post-processing of dense class scores: PAMR, and abstaining (unknown / background) by probability.

Both follow docs/predictors.md §6 (the initial predictors' own protocols) and work on any scores, from
:class:`lposs_lab.LPOSS`, :func:`lposs_lab.refine` or another segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = ["UNKNOWN", "pamr", "PAMRStep", "Abstain", "abstain", "class_probabilities"]

#: Label value of pixels that abstain (no class is probable enough): the usual ignore index.
UNKNOWN = 255

_DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def _check_pamr_args(image: Tensor, scores: Tensor, iterations: int, dilations: Sequence[int]) -> None:
    if not isinstance(image, Tensor) or not isinstance(scores, Tensor):
        raise TypeError("pamr expects torch tensors for image and scores")
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [K, H, W] or [B, K, H, W], got shape {tuple(image.shape)}")
    if scores.ndim != image.ndim:
        raise ValueError(
            f"scores must be [C, H, W] (or [B, C, H, W] for a batched image), got shape "
            f"{tuple(scores.shape)} for image {tuple(image.shape)}"
        )
    if scores.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and image {tuple(image.shape)} differ in size: resize the scores "
            "to the guide image first"
        )
    if image.ndim == 4 and scores.shape[0] != image.shape[0]:
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, scores {scores.shape[0]}")
    if image.shape[-3] < 1 or scores.shape[-3] < 1 or image.shape[-1] < 1 or image.shape[-2] < 1:
        raise ValueError(f"empty image or scores: {tuple(image.shape)}, {tuple(scores.shape)}")
    if not image.is_floating_point() or not scores.is_floating_point():
        raise ValueError(f"image and scores must be float tensors, got {image.dtype} and {scores.dtype}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not dilations or any(int(d) != d or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {tuple(dilations)}")


def _neighbours(x: Tensor, dilations: Sequence[int], *, centre: bool) -> Tensor:
    """``[B, K, H, W] -> [B, K, P, H, W]``: values at ``p + d * delta``, replicate padding.

    ``P = 8 * len(dilations)`` (``9 *`` with ``centre``), dilation-major, directions row-major.
    """
    h, w = x.shape[-2:]
    pad = max(dilations)
    # Replicate padding by the largest dilation equals clamping the coordinates: the same for every d.
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    out = []
    for d in dilations:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) and not centre:
                    continue
                y0, x0 = pad + dy * d, pad + dx * d
                out.append(padded[..., y0 : y0 + h, x0 : x0 + w])
    return torch.stack(out, dim=2)


def pamr(
    image: Tensor,
    scores: Tensor,
    *,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> Tensor:
    r"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020) as NACLIP uses it
    (docs/predictors.md §6).

    For each pixel ``p`` and neighbour ``n = p + d * delta`` (``delta`` in the 8 directions, ``d`` in
    ``dilations``; replicate padding), with ``sigma_p[k]`` the unbiased standard deviation of channel
    ``k`` over the ``9 * len(dilations)`` values ``I_{p + d delta}`` (the centre counted once per
    dilation):

    .. math::
        a_{pn} = -\operatorname{mean}_k \frac{|I_p[k] - I_n[k]|}{10^{-8} + 0.1\,\sigma_p[k]},
        \qquad w_p = \operatorname{softmax}_n(a_{p\cdot}),
        \qquad M_p \leftarrow \sum_n w_{pn} M_n \ (\text{iterations times}).

    Args:
        image: ``[K, H, W]`` (or ``[B, K, H, W]``) float guide image; NACLIP uses the CLIP-normalised
            RGB input resized bilinearly to the scores' size.
        scores: ``[C, H, W]`` (or ``[B, C, H, W]``) class scores at the guide's size (NACLIP: the
            cosines at the original image size, before the temperature). All classes at once.
        iterations: number of propagation steps (10 in NACLIP).
        dilations: neighbour distances (``(8, 16)`` in NACLIP).

    Returns:
        Refined scores, same shape as ``scores``, float32 (float64 for float64 inputs), on its device.
    """
    _check_pamr_args(image, scores, iterations, dilations)
    batched = image.ndim == 4
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    guide = (image if batched else image[None]).to(scores.device, dtype)
    m = (scores if batched else scores[None]).to(dtype)
    dil = tuple(int(d) for d in dilations)
    around = _neighbours(guide, dil, centre=True)  # [B, K, 9D, H, W]
    std = around.std(dim=2, unbiased=True, keepdim=True)  # [B, K, 1, H, W]
    del around
    diff = (guide[:, :, None] - _neighbours(guide, dil, centre=False)).abs()  # [B, K, 8D, H, W]
    affinity = -(diff / (1e-8 + 0.1 * std)).mean(dim=1)  # [B, 8D, H, W]
    del diff
    weights = torch.softmax(affinity, dim=1)[:, None]  # [B, 1, 8D, H, W]
    for _ in range(iterations):
        m = _weighted_neighbour_sum(m, weights, dil)
    return m if batched else m[0]


def _weighted_neighbour_sum(m: Tensor, weights: Tensor, dilations: Sequence[int]) -> Tensor:
    """``sum_n weights[:, :, n] * m[p + offset_n]`` over the 8D neighbours, without stacking them."""
    h, w = m.shape[-2:]
    pad = max(dilations)
    padded = F.pad(m, (pad, pad, pad, pad), mode="replicate")
    out = torch.zeros_like(m)
    n = 0
    for d in dilations:
        for dy, dx in _DIRECTIONS:
            y0, x0 = pad + dy * d, pad + dx * d
            out.addcmul_(padded[..., y0 : y0 + h, x0 : x0 + w], weights[:, :, n])
            n += 1
    return out


@dataclass(frozen=True)
class PAMRStep:
    """PAMR as a post-processing step of :meth:`lposs_lab.LPOSS.predict` (NACLIP, docs/predictors.md §6).

    Called with the predictor's resized input image ``[3, h, w]`` in ``[0, 1]`` and the per-name scores
    ``[Q, H, W]`` at the original size; the guide is that input CLIP-normalised (OpenAI mean/std) and
    resized bilinearly to ``(H, W)``. Returns the refined ``[Q, H, W]`` scores.
    """

    iterations: int = 10
    dilations: tuple[int, ...] = (8, 16)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if self.iterations < 0 or not self.dilations or min(self.dilations) < 1:
            raise ConfigError(
                f"postprocess: iterations={self.iterations} must be >= 0 and "
                f"dilations={list(self.dilations)} a non-empty list of integers >= 1"
            )

    def __call__(self, image: Tensor, scores: Tensor) -> Tensor:
        from .models.maskclip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, h, w], got {tuple(image.shape)}")
        x = image.to(scores.device, torch.float32)
        x = (x - x.new_tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / x.new_tensor(OPENAI_CLIP_STD).view(3, 1, 1)
        guide = F.interpolate(x[None], size=tuple(scores.shape[-2:]), mode="bilinear", align_corners=False)[0]
        return pamr(guide, scores, iterations=self.iterations, dilations=self.dilations)


@dataclass(frozen=True)
class Abstain:
    """Abstain where no class is probable enough (the methods' ``prob_thd`` / ``area_thd``).

    Probabilities are ``softmax(logit_scale * scores)`` over **all names** (synonyms as separate
    columns), then the max over each class's names (docs/predictors.md §6, in that order).

    Attributes:
        threshold: pixels whose top class probability is below it abstain (``prob_thd``).
        logit_scale: temperature of the softmax. Default 40, the most common choice of docs/predictors.md
            (SCLIP, NACLIP, ProxyCLIP, SC-CLIP; ClearCLIP uses 50). Those methods tuned it on raw CLIP
            cosines; LPOSS / LPOSS+ scores are propagated, ``(I - alpha S)^-1``-like sums whose
            spread differs from cosines, so calibrate ``logit_scale`` and ``threshold`` for them.
        background: ``None``: abstaining pixels get :data:`UNKNOWN` (255); a class index: they get
            that class (the methods' convention, class 0 = background on VOC/Context/COCO-Object).
        area_threshold: optional ``area_thd``: classes other than ``background`` whose argmax area
            is at most ``area_threshold`` times the argmax area of all those classes get probability
            0 (their pixels then go to the next most probable class), before the threshold.
    """

    threshold: float
    logit_scale: float = 40.0
    background: int | None = None
    area_threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"unknown_threshold={self.threshold} is out of range; valid: a probability in [0, 1]"
            )
        if not self.logit_scale > 0:
            raise ConfigError(f"logit_scale={self.logit_scale} is out of range; valid: a number > 0")
        if self.background is not None and (int(self.background) != self.background or self.background < 0):
            raise ConfigError(
                f"background={self.background} is out of range; valid: a class index >= 0 or null"
            )
        if self.area_threshold is not None and not 0.0 <= self.area_threshold <= 1.0:
            raise ConfigError(
                f"area_threshold={self.area_threshold} is out of range; valid: a fraction in [0, 1]"
            )


def _owner_tensor(owner: Tensor | Sequence[int] | None, q: int, device: torch.device) -> Tensor:
    if owner is None:
        return torch.arange(q, device=device)
    own = torch.as_tensor(owner, device=device, dtype=torch.long)
    if own.shape != (q,):
        raise ValueError(f"owner must give one class index per name ({q}), got shape {tuple(own.shape)}")
    if q and int(own.min()) < 0:
        raise ValueError("owner class indices must be >= 0")
    return own


def class_probabilities(
    scores: Tensor, *, logit_scale: float = 40.0, owner: Tensor | Sequence[int] | None = None
) -> Tensor:
    """``softmax(logit_scale * scores)`` over all names, then the max over each class's names.

    Args:
        scores: ``[Q, H, W]`` per-name scores (Q names, synonyms included).
        owner: ``[Q]`` class index of each name (default: one name per class).

    Returns:
        ``[C, H, W]`` float32 class probabilities, ``C = owner.max() + 1``.
    """
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [Q >= 1, H, W], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor, got {scores.dtype}")
    q = scores.shape[0]
    own = _owner_tensor(owner, q, scores.device)
    prob = torch.softmax(
        logit_scale * scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32), dim=0
    )
    c = int(own.max()) + 1
    if c == q and bool((own == torch.arange(q, device=own.device)).all()):
        return prob
    out = prob.new_zeros((c, *prob.shape[1:]))
    index = own.view(-1, 1, 1).expand_as(prob)
    return out.scatter_reduce_(0, index, prob, "amax", include_self=True)


def abstain(
    scores: Tensor,
    rule: Abstain,
    *,
    owner: Tensor | Sequence[int] | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Labels with abstention: :data:`UNKNOWN` (or ``rule.background``) where no class is probable.

    docs/predictors.md §6 order: probabilities ``softmax_Q(logit_scale * scores)`` over all names, a
    class's probability is the max over its names; the area filter (if set); the label is the argmax
    (or ``labels`` when given, the predictor's own, except at the pixels of area-filtered classes);
    pixels whose top probability is below ``rule.threshold`` abstain.

    Args:
        scores: ``[Q, H, W]`` per-name scores at the label map's size.
        rule: the :class:`Abstain` settings.
        owner: ``[Q]`` class index of each name (default: one name per class).
        labels: ``[H, W]`` labels to keep where the rule does not change them (default: argmax of the
            class probabilities).

    Returns:
        ``[H, W]`` int64 labels on the device of ``scores``.
    """
    # float64: with large logit scales a float32 softmax saturates to exactly 1.0 and no pixel could abstain
    prob = class_probabilities(scores.double(), logit_scale=rule.logit_scale, owner=owner)
    c = prob.shape[0]
    if rule.background is not None and rule.background >= c:
        raise ValueError(f"background class {rule.background} out of range for {c} classes")
    if rule.background is None and c > UNKNOWN:
        raise ValueError(
            f"{c} classes: label {UNKNOWN} is a class, it cannot also mean unknown; pass background="
        )
    if labels is None:
        labels = prob.argmax(dim=0)
    else:
        if labels.shape != prob.shape[1:]:
            raise ValueError(f"labels must be {tuple(prob.shape[1:])}, got {tuple(labels.shape)}")
        labels = labels.to(prob.device, torch.long)
    if rule.area_threshold is not None:
        area = torch.bincount(labels.reshape(-1), minlength=c).to(torch.float64)
        foreground = torch.ones(c, dtype=torch.bool, device=prob.device)
        if rule.background is not None:
            foreground[rule.background] = False
        total = area[foreground].sum()
        small = foreground & (area <= rule.area_threshold * total)
        if bool(small.any()):
            prob = prob.masked_fill(small.view(-1, 1, 1), 0.0)
            labels = torch.where(small[labels], prob.argmax(dim=0), labels)
    top = prob.max(dim=0).values
    fill = UNKNOWN if rule.background is None else int(rule.background)
    if rule.threshold >= 1.0 and scores.shape[0] > 1:
        # with two names or more every probability is below 1 (even where float64 rounds it to 1)
        return torch.full_like(labels, fill)
    return torch.where(top < rule.threshold, torch.full_like(labels, fill), labels)
