"""The plumbing of :class:`lposs_lab.LPOSS`, kept out of the class: encoder precision, batched window
encoding, the feature-cache hook, the window setups of an ensemble and the average of their outputs,
the synonym max and the patch stage over one or several graphs.

Everything here is a plain function (or a small accumulator) over tensors and configs; the predictor
composes them in :meth:`lposs_lab.LPOSS.extract`, :meth:`~lposs_lab.LPOSS.propagate_names` and
:meth:`~lposs_lab.LPOSS.predict`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ENCODER_DTYPES, LPConfig, WindowConfig
from .postprocess import UNKNOWN, Abstain
from .postprocess import abstain as apply_abstain
from .propagation import propagate_patches
from .score_files import PatchGrids
from .windows import resize_argmax, stitch_windows

__all__ = [
    "StageTimer",
    "encoder_dtype",
    "encode_windows",
    "cached_features",
    "window_setups",
    "ScoreAverage",
    "average_setups",
    "check_abstain",
    "final_labels",
    "encode_classes",
    "reduce_synonyms",
    "patch_stage",
    "resize_bilinear",
]


class StageTimer:
    """Seconds per stage, summed over calls; CUDA work is waited for before a stage's clock stops.

    Usage: ``timer = StageTimer(device); with timer("patch_lp"): ...; timer.seconds["patch_lp"]``.
    """

    def __init__(self, device: torch.device, stages: Sequence[str] = ()) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.add({stage: time.perf_counter() - t0})

    def add(self, seconds: dict[str, float]) -> None:
        for key, value in seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value


def encoder_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``LPOSSConfig.encoder_dtype``; float32 off CUDA (half precision only pays off,
    and is only tested, there)."""
    if name not in ENCODER_DTYPES:
        raise ValueError(f"unknown encoder_dtype {name!r}; use {', '.join(ENCODER_DTYPES)}")
    dtype = getattr(torch, name)
    return dtype if device.type == "cuda" else torch.float32


def encode_windows(
    vm: nn.Module, vlm: nn.Module, crops: Tensor, batch_size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``crops [B, 3, s, s]`` -> ``(vm [B, gh, gw, Dv], vlm [B, gh, gw, Dc])`` float32 features.

    ``batch_size`` windows per forward pass. When ``vm is vlm`` (CLIP's own features for the graph) one
    pass gives both (the same tensor); ProxyCLIP over the VM's own DINO takes one DINO pass for both.
    The VLM grid is resized bilinearly to the VM's and re-normalised when they differ.
    """
    from .models.proxyclip import shared_vfm_forward

    shared = vm is vlm
    vm_feats, vlm_feats = [], []
    for start in range(0, crops.shape[0], batch_size):
        batch = crops[start : start + batch_size].to(dtype)
        pair = None if shared else shared_vfm_forward(vlm, vm, batch)
        if pair is not None:  # ProxyCLIP whose VFM is the VM: one DINO pass gives both
            vm_feats.append(pair[0].float())
            vlm_feats.append(pair[1].float())
            continue
        vlm_feats.append(vlm(batch).float())
        if not shared:
            vm_feats.append(vm(batch).float())
    vlm_out = torch.cat(vlm_feats)
    vm_out = vlm_out if shared else torch.cat(vm_feats)
    if vlm_out.shape[1:3] != vm_out.shape[1:3]:
        grid = F.interpolate(
            vlm_out.permute(0, 3, 1, 2), size=vm_out.shape[1:3], mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
        vlm_out = F.normalize(grid, dim=-1)
    return vm_out, vlm_out


def cached_features(model: Any, image: Any, window: WindowConfig, image_id: str | None) -> Any:
    """``model.extract(image, window)``, through ``model.feature_cache`` when one is attached and an id given.

    The cache is any object with ``fetch(model, image, window, image_id) -> ImageFeatures`` (see
    :class:`lposs_lab.lab.cache.FeatureStore`).
    """
    if model.feature_cache is None or image_id is None:
        return model.extract(image, window)
    return model.feature_cache.fetch(model, image, window, str(image_id))


def window_setups(window: WindowConfig) -> list[WindowConfig]:
    """The window setups of one prediction: ``window``, then one per ``ensemble`` ``(size, stride)``."""
    extra = [replace(window, size=size, stride=stride, ensemble=()) for size, stride in window.ensemble]
    return [window, *extra]


def resize_bilinear(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """``[C, h, w] -> [C, *size]``, bilinear with ``align_corners=False`` (unchanged at equal size)."""
    if tuple(scores.shape[1:]) == tuple(size):
        return scores
    return F.interpolate(scores[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


class ScoreAverage:
    """The mean of the outputs of several window setups (Table 3's ensemble), at the first one's size.

    Class scores ``[C, h, w]`` are always averaged; per-name scores ``[Q, h, w]`` only when
    ``keep_names`` (abstaining and post-processing need them). A later setup whose resized image differs
    is resized bilinearly (``align_corners=False``) onto the first one's size.
    """

    def __init__(self, keep_names: bool) -> None:
        self.keep_names = keep_names
        self.count = 0
        self.size: tuple[int, int] | None = None
        self._scores: Tensor | None = None
        self._names: Tensor | None = None

    def add(self, scores: Tensor, name_scores: Tensor) -> None:
        if self.size is None:
            self.size = (int(scores.shape[1]), int(scores.shape[2]))
            self._scores = scores
            self._names = name_scores if self.keep_names else None
        else:
            assert self._scores is not None
            self._scores = self._scores + resize_bilinear(scores, self.size)
            if self._names is not None:
                self._names = self._names + resize_bilinear(name_scores, self.size)
        self.count += 1

    def mean(self) -> tuple[Tensor, Tensor | None]:
        """``(class scores [C, h, w], per-name scores [Q, h, w] or None)`` averaged over the setups."""
        if self._scores is None:
            raise RuntimeError("ScoreAverage.mean() before any add()")
        names = None if self._names is None else self._names / self.count
        return self._scores / self.count, names


def average_setups(
    model: Any, image: Any, image_id: str | None, keep_names: bool
) -> tuple[Tensor, Tensor | None, Any, dict[str, float], PatchGrids | None]:
    """Features and propagation of ``image`` for every window setup of ``model.config.window``, averaged.

    Returns ``(class scores [C, h, w], per-name scores [Q, h, w] or None (see :class:`ScoreAverage`),
    the last setup's ImageFeatures, seconds per stage: features, patch_lp, pixel_lp, patch grids)``.
    The patch grids (:class:`lposs_lab.score_files.PatchGrids`) are the lossless low-resolution form of
    the class scores when those are stitched window grids: MaskCLIP or LPOSS over one sliding-window
    setup; else None.
    """
    win = model.config.window
    grid_form = model.method != "lposs_plus" and win.size > 0 and not win.ensemble
    timer = StageTimer(model.device, ("features", "patch_lp", "pixel_lp"))
    average = ScoreAverage(keep_names)
    feats = saved = None
    for setup in window_setups(win):
        with timer("features"):
            feats = model.features(image, setup, image_id)
        num_classes = len(model.classes)
        if grid_form:  # the stitching of LPOSS.propagate_names, keeping its input
            feats = feats.to(model.device)
            grids, stages = model.patch_grids(feats)
            size = (int(feats.image.shape[1]), int(feats.image.shape[2]))
            saved = PatchGrids(grids, tuple(feats.windows), size, model._owner, num_classes)
            with stages("pixel_lp"):
                name_scores = stitch_windows(grids, feats.windows, *size)
            seconds = stages.seconds
        else:
            name_scores, seconds = model.propagate_names(feats)
        timer.add(seconds)
        average.add(reduce_synonyms(name_scores, model._owner, num_classes), name_scores)
    scores, names = average.mean()
    return scores, names, feats, timer.seconds, saved


def check_abstain(abstain: Abstain | None, num_classes: int) -> None:
    """Raise ValueError when an abstain rule without a background class would need label 255 as a class."""
    if abstain is not None and abstain.background is None and num_classes > UNKNOWN:
        raise ValueError(
            f"{num_classes} classes: label {UNKNOWN} is a class and cannot mean unknown; "
            "give the abstain rule a background class"
        )


def final_labels(
    scores: Tensor,
    name_scores: Tensor | None,
    feats: Any,
    owner: Tensor,
    postprocess: Any = None,
    abstain: Abstain | None = None,
) -> Tensor:
    """``[H, W]`` int64 labels at the input size (``feats.original_size``) from the averaged scores.

    Without ``postprocess`` and ``abstain`` the argmax of the bilinear resize of ``scores [C, h, w]``
    (docs/method.md §5). Otherwise ``name_scores [Q, h, w]`` are resized to the input size, passed through
    ``postprocess(feats.image, .)`` (labels: the argmax of its synonym max), then ``abstain`` is applied.
    """
    h, w = feats.original_size
    labels, _ = resize_argmax(scores, h, w)
    if name_scores is None:
        return labels
    full = resize_bilinear(name_scores, (h, w))
    if postprocess is not None:
        full = postprocess(feats.image, full)
        labels = reduce_synonyms(full, owner, scores.shape[0]).argmax(dim=0)
    if abstain is not None:
        labels = apply_abstain(full, abstain, owner=owner, labels=labels)
    return labels


def encode_classes(
    vlm: nn.Module, classes: Sequence[str], cache_dir: Any, device: torch.device
) -> tuple[list[str], Tensor, Tensor]:
    """``(class names, text [Q, D] float32, owner [Q] int64)`` of a vocabulary (``"name;synonym"`` entries).

    The text embeddings come from :func:`lposs_lab.text.text_embeddings` (through ``cache_dir`` when set);
    each class is named by its first synonym and ``owner[q]`` is the class of name ``q``.
    """
    from .text import parse_classes, split_synonyms, text_embeddings

    classes = parse_classes(classes)
    synonyms, owner = split_synonyms(classes)
    with torch.inference_mode():
        text = text_embeddings(vlm, synonyms, cache_dir=cache_dir)
    names = [c.split(";")[0].strip() for c in classes]
    return names, text.to(device, torch.float32), torch.as_tensor(owner, device=device, dtype=torch.long)


def reduce_synonyms(scores: Tensor, owner: Tensor, num_classes: int) -> Tensor:
    """``[Q, ...]`` per-name scores -> ``[C, ...]``: each class the max over its names.

    ``owner [Q]`` holds the class of each name; ``C == Q`` (no synonyms) returns ``scores`` itself.
    """
    if scores.shape[0] == num_classes:
        return scores
    out = scores.new_full((num_classes, *scores.shape[1:]), float("-inf"))
    index = owner.view(-1, *([1] * (scores.ndim - 1))).expand_as(scores)
    return out.scatter_reduce_(0, index, scores, "amax", include_self=True)


def patch_stage(graph: Tensor, positions: Tensor, scores: Tensor, lp: LPConfig, joint: bool) -> Tensor:
    """The patch stage over the windows' patches: ``graph [B, n, D]``, ``positions [B, n, 2]``,
    ``scores [B, n, C]`` -> ``[B * n, C]``.

    ``joint``: one graph over every window's patches (the default); else one graph per window (Table 4).
    """
    b, n, _ = graph.shape
    if joint:
        flat = graph.reshape(b * n, -1)
        return propagate_patches(flat, positions.reshape(-1, 2), scores.reshape(b * n, -1), lp)
    return torch.cat([propagate_patches(graph[i], positions[i], scores[i], lp) for i in range(b)])
