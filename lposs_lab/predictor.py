"""The user-facing predictor: an image and a list of class names in, a label map out (docs/method.md §0-5)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LPOSSConfig, WindowConfig
from .errors import ConfigError, DeviceUnavailableError, WeightsUnavailableError
from .pixels import PIXEL_FEATURES, pixel_features, pixel_stage
from .postprocess import UNKNOWN, Abstain
from .postprocess import abstain as apply_abstain
from .propagation import refine_patches
from .windows import (
    Window,
    crop_windows,
    patch_positions,
    resize_argmax,
    resized_image_tensor,
    stitch_windows,
    window_grid,
)

__all__ = ["LPOSS", "Prediction", "ImageFeatures", "METHODS", "VLM_AS_VM", "resolve_device"]

METHODS = ("maskclip", "lposs", "lposs_plus")
#: VM names that mean "no separate VM: the VLM's own dense features are the graph features" (Table 4).
VLM_AS_VM = ("clip_b16",)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but CUDA is not available on this machine; use device=cpu "
            "(or device=auto)"
        )
    return dev


@dataclass
class ImageFeatures:
    """Encoder outputs of one image for one window setup: everything propagation needs but the text.

    Attributes:
        image: ``[3, h, w]`` float resized image in ``[0, 1]`` (the re-quantised uint8 / 255).
        original_size: ``(H, W)`` of the input image.
        windows: the windows over the resized image.
        vm: ``[B, gh, gw, Dv]`` L2-normalised VM (graph) features per window.
        vlm: ``[B, gh, gw, Dc]`` L2-normalised VLM features per window, on the VM grid.
        patch_size: the VM patch size (for patch positions).
        depth: optional ``[h, w]`` depth in ``[0, 1]`` of the resized image (computed on demand otherwise).
    """

    image: Tensor
    original_size: tuple[int, int]
    windows: list[Window]
    vm: Tensor
    vlm: Tensor
    patch_size: int
    depth: Tensor | None = None

    def to(self, device: torch.device | str) -> ImageFeatures:
        vlm = self.vlm.to(device)
        vm = vlm if self.vm is self.vlm else self.vm.to(device)
        depth = None if self.depth is None else self.depth.to(device)
        image = self.image.to(device)
        return ImageFeatures(image, self.original_size, self.windows, vm, vlm, self.patch_size, depth)


@dataclass
class Prediction:
    """Result of :meth:`LPOSS.predict`.

    Attributes:
        labels: ``[H, W]`` int64 class indices at the input image's size; :data:`lposs_lab.UNKNOWN`
            (255) where an ``abstain`` rule without a background class abstained.
        class_names: one name per class (the first synonym of each ``;`` group).
        low_res_scores: ``[C, h, w]`` class scores before the final resize (resized-image resolution).
        timings: seconds spent per stage (``features``, ``patch_lp``, ``pixel_lp``, ``total``).
    """

    labels: Tensor
    class_names: list[str]
    low_res_scores: Tensor
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> Tensor:
        """``[C, H, W]`` class scores at the input size (bilinear resize of :attr:`low_res_scores`)."""
        h, w = self.labels.shape
        return F.interpolate(self.low_res_scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LPOSS:
    """LPOSS / LPOSS+ predictor over a VM (graph features) and a VLM (initial scores).

    Usage::

        model = LPOSS.from_config(vm="dino_b16", vlm="maskclip_b16")
        model.set_classes(["cat", "dog;puppy", "sky"])
        pred = model.predict("photo.jpg")      # or model.predict(image, classes=[...])
        pred.labels, pred.class_names

    Args:
        vm: module mapping ``[B, 3, h, w]`` images in ``[0, 1]`` to ``[B, gh, gw, D]`` features,
            with a ``patch_size`` attribute (see :func:`lposs_lab.models.create_vm`).
        vlm: same for the VLM, with ``encode_text`` (see :func:`lposs_lab.models.create_vlm`).
        config: hyperparameters; ``config.vm``/``config.vlm`` are informative here.
        method: ``"lposs_plus"`` (default when the pixel stage is enabled), ``"lposs"`` or ``"maskclip"``.
        device: where everything runs (default: ``config.device``).
        batch_size: windows per encoder forward pass.
        depth_model: depth estimator ``[B, 3, h, w] -> [B, h, w]`` for ``pixel.feature`` depth / lab+depth
            (see :func:`lposs_lab.models.depth.create_depth`).
        text_cache_dir: folder where the text embeddings of each vocabulary are stored and reused across
            processes (``None``: kept in memory for this process only).

    Attributes:
        feature_cache: optional store with ``fetch(model, image, window, image_id) -> ImageFeatures``
            (see :class:`lposs_lab.lab.cache.FeatureStore`), used by :meth:`features` when an id is given.
    """

    def __init__(
        self,
        vm: nn.Module,
        vlm: nn.Module,
        config: LPOSSConfig | None = None,
        *,
        method: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        depth_model: nn.Module | None = None,
        text_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = config or LPOSSConfig()
        self.device = resolve_device(device if device is not None else self.config.device)
        method = method or ("lposs_plus" if self.config.pixel.enabled else "lposs")
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        self.method = method
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            self.config.encoder_dtype
        )
        if dtype is None:
            raise ValueError(
                f"unknown encoder_dtype {self.config.encoder_dtype!r}; use float32, float16 or bfloat16"
            )
        if dtype != torch.float32 and self.device.type != "cuda":
            dtype = torch.float32  # half precision encoders only pay off (and are only tested) on CUDA
        self.encoder_dtype = dtype
        self.vm = vm.to(self.device, dtype).eval()
        self.vlm = vlm.to(self.device, dtype).eval()
        if self.config.pixel.feature not in PIXEL_FEATURES:
            raise ValueError(
                f"unknown pixel feature {self.config.pixel.feature!r}; valid: {', '.join(PIXEL_FEATURES)}"
            )
        self.depth_model = None if depth_model is None else depth_model.to(self.device).eval()
        self.feature_cache: Any = None
        self.batch_size = batch_size
        self.text_cache_dir = None if text_cache_dir is None else Path(text_cache_dir).expanduser()
        self._classes: list[str] | None = None
        self._text: Tensor | None = None
        self._owner: Tensor | None = None

    @classmethod
    def from_config(
        cls,
        config: LPOSSConfig | Mapping[str, Any] | None = None,
        *,
        method: str | None = None,
        text_cache_dir: str | os.PathLike | None = "auto",
        **overrides: Any,
    ) -> LPOSS:
        """Build the encoders named by ``config`` (weights fetched/cached by huggingface_hub), the predictor.

        ``overrides`` replace top-level config fields, e.g. ``LPOSS.from_config(vm="dino_b8")``.
        ``text_cache_dir="auto"`` keeps the text embeddings of each vocabulary on disk in
        :func:`lposs_lab.text.default_text_cache_dir` (not for random-init VLMs, which are cheap to encode);
        a folder uses that one, ``None`` keeps them in memory only.
        """
        from .models import create_vlm, create_vm

        if config is None:
            config = LPOSSConfig()
        elif not isinstance(config, LPOSSConfig):
            config = LPOSSConfig.from_dict(config)
        if overrides:
            config = LPOSSConfig.from_dict({**_shallow(config), **overrides})
        device = resolve_device(config.device)
        missing: list[WeightsUnavailableError] = []
        vlm = vm = None
        try:
            vlm = create_vlm(config.vlm, pretrained=_pretrained(config.vlm_pretrained), device=device)
        except WeightsUnavailableError as exc:
            missing.append(exc)
        if config.vm in VLM_AS_VM:  # CLIP's own features for the graph: no separate VM
            vm = vlm
        else:
            try:
                vm = create_vm(config.vm, pretrained=_pretrained(config.vm_pretrained), device=device)
            except WeightsUnavailableError as exc:
                missing.append(exc)
        if missing:  # name every missing checkpoint at once
            raise WeightsUnavailableError.combine(missing)
        depth = None
        if config.pixel.feature != "lab" and config.pixel.enabled and method in (None, "lposs_plus"):
            from .models.depth import create_depth

            depth = create_depth(config.pixel.depth_model, device=device)
        if text_cache_dir == "auto":
            from .text import default_text_cache_dir

            random_init = "random:" in str(getattr(vlm, "weights_id", "random:"))
            text_cache_dir = None if random_init else default_text_cache_dir()
        return cls(
            vm, vlm, config, method=method, device=device, depth_model=depth, text_cache_dir=text_cache_dir
        )

    # ------------------------------------------------------------------ classes
    def set_classes(self, classes: Sequence[str]) -> None:
        """Set the vocabulary: class names, each possibly ``"name;synonym;..."`` (text encoded once here)."""
        from .text import parse_classes, split_synonyms, text_embeddings

        classes = parse_classes(classes)
        synonyms, owner = split_synonyms(classes)
        with torch.inference_mode():
            text = text_embeddings(self.vlm, synonyms, cache_dir=self.text_cache_dir)
        self._classes = [c.split(";")[0].strip() for c in classes]
        self._text = text.to(self.device, torch.float32)
        self._owner = torch.as_tensor(owner, device=self.device, dtype=torch.long)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            raise RuntimeError("no classes set: call set_classes([...]) first or pass classes= to predict()")
        return list(self._classes)

    # ------------------------------------------------------------------ stages
    @torch.inference_mode()
    def extract(self, image: Any, window: WindowConfig | None = None) -> ImageFeatures:
        """Decode, resize and encode an image: per-window VM and VLM features (docs/method.md §1-2)."""
        win = window or self.config.window
        img, original_size = resized_image_tensor(
            image, short_side=win.short_side, long_side=win.long_side, device=self.device
        )
        windows = window_grid(img.shape[1], img.shape[2], win.size, win.stride)
        crops = crop_windows(img, windows)
        vm_feats, vlm_feats = [], []
        shared = self.vm is self.vlm
        for start in range(0, crops.shape[0], self.batch_size):
            batch = crops[start : start + self.batch_size].to(self.encoder_dtype)
            pair = None if shared else _shared_vfm_pass(self.vlm, self.vm, batch)
            if pair is not None:  # ProxyCLIP whose VFM is the VM: one DINO pass gives both
                vm_feats.append(pair[0].float())
                vlm_feats.append(pair[1].float())
                continue
            vlm_feats.append(self.vlm(batch).float())
            if not shared:
                vm_feats.append(self.vm(batch).float())
        vlm = torch.cat(vlm_feats)
        vm = vlm if shared else torch.cat(vm_feats)
        if vlm.shape[1:3] != vm.shape[1:3]:
            grid = F.interpolate(
                vlm.permute(0, 3, 1, 2), size=vm.shape[1:3], mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)
            vlm = F.normalize(grid, dim=-1)
        return ImageFeatures(img, original_size, windows, vm, vlm, int(self.vm.patch_size))

    def features(
        self, image: Any, window: WindowConfig | None = None, image_id: str | None = None
    ) -> ImageFeatures:
        """:meth:`extract`, through :attr:`feature_cache` when one is attached and ``image_id`` is given."""
        win = window or self.config.window
        if self.feature_cache is None or image_id is None:
            return self.extract(image, win)
        return self.feature_cache.fetch(self, image, win, str(image_id))

    @torch.inference_mode()
    def pixel_features(self, feats: ImageFeatures) -> Tensor | None:
        """``[F, h, w]`` pixel-stage features for ``pixel.feature`` (None: Lab, computed by refine_pixels)."""
        px = self.config.pixel
        if px.feature == "lab":
            return None
        depth = feats.depth
        if depth is None:
            if self.depth_model is None:
                raise ValueError(
                    f"pixel.feature={px.feature} needs a depth model; "
                    "build with LPOSS.from_config or pass depth_model="
                )
            depth = self.depth_model(feats.image[None].to(self.device))[0]
        return pixel_features(feats.image, depth, px.feature, depth_weight=px.depth_weight)

    @torch.inference_mode()
    def propagate(self, feats: ImageFeatures) -> tuple[Tensor, dict[str, float]]:
        """Scores ``[C, h, w]`` before the final resize, from cached features and the current classes."""
        scores, timings = self.propagate_names(feats)
        return self._reduce_synonyms(scores), timings

    @torch.inference_mode()
    def propagate_names(self, feats: ImageFeatures) -> tuple[Tensor, dict[str, float]]:
        """As :meth:`propagate`, before the synonym max: ``[Q, h, w]``, one row per name (synonym)."""
        if self._text is None:
            raise RuntimeError("no classes set: call set_classes([...]) first or pass classes= to predict()")
        cfg = self.config
        feats = feats.to(self.device)
        timings: dict[str, float] = {}
        b, gh, gw, _ = feats.vm.shape
        y = feats.vlm.reshape(b * gh * gw, -1) @ self._text.T  # [N, T]
        _, h, w = feats.image.shape
        whole = cfg.window.size <= 0
        t0 = time.perf_counter()
        if self.method != "maskclip":
            graph = feats.vm if cfg.lp.graph_features == "vm" else feats.vlm
            graph = graph.reshape(b, gh * gw, -1)
            pos = patch_positions(feats.windows, (gh, gw), feats.patch_size, device=self.device)
            pos = pos.reshape(b, -1, 2)
            lp = cfg.lp.kernel_kwargs()
            ys = y.reshape(b, gh * gw, -1)
            if cfg.window.joint:
                y = refine_patches(graph.reshape(b * gh * gw, -1), pos.reshape(-1, 2), y, **lp)
            else:  # one graph per window (ablation)
                y = torch.cat([refine_patches(graph[i], pos[i], ys[i], **lp) for i in range(b)])
        _sync(self.device)
        timings["patch_lp"] = time.perf_counter() - t0
        grids = y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
        t0 = time.perf_counter()
        if self.method == "lposs_plus":
            scores = stitch_windows(grids, feats.windows, h, w)
            scores = pixel_stage(feats.image, scores, cfg.pixel, features=self.pixel_features(feats))
        elif whole:
            scores = grids[0]  # the patch grid goes straight to the original size (docs/method.md §5)
        else:
            scores = stitch_windows(grids, feats.windows, h, w)
        _sync(self.device)
        timings["pixel_lp"] = time.perf_counter() - t0
        return scores, timings

    def _reduce_synonyms(self, scores: Tensor) -> Tensor:
        assert self._owner is not None and self._classes is not None
        n = len(self._classes)
        if scores.shape[0] == n:
            return scores
        out = scores.new_full((n, *scores.shape[1:]), float("-inf"))
        index = self._owner.view(-1, *([1] * (scores.ndim - 1))).expand_as(scores)
        return out.scatter_reduce_(0, index, scores, "amax", include_self=True)

    # ------------------------------------------------------------------ all at once
    def predict(
        self,
        image: Any,
        classes: Sequence[str] | None = None,
        *,
        image_id: str | None = None,
        abstain: Abstain | None = None,
        postprocess: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Prediction:
        """Segment one image (path, PIL image, numpy array or tensor) into the current classes.

        Args:
            image: any input :func:`lposs_lab.image_io.to_rgb_uint8` accepts.
            classes: optional vocabulary; when given it replaces the current one (see :meth:`set_classes`).
            image_id: the image's id in its dataset: features come from :attr:`feature_cache` when set.
            abstain: optional :class:`lposs_lab.Abstain` rule (off by default: labels as the paper).
                The per-name scores are resized to the input size, ``softmax(logit_scale * .)`` is
                taken over all names, then the max over each class's synonyms (docs/predictors.md §6);
                pixels whose top probability is below ``abstain.threshold`` get
                :data:`lposs_lab.UNKNOWN` (255) or ``abstain.background``. Elsewhere the labels are
                the ones without the rule (but for area-filtered classes, see :func:`lposs_lab.abstain`).
            postprocess: optional step on the per-name scores at the input size before the labels are
                taken, ``f(resized image [3, h, w], scores [Q, H, W]) -> [Q, H, W]``, e.g.
                :class:`lposs_lab.postprocess.PAMRStep` (NACLIP's protocol). The labels are then the argmax
                over classes of the synonym max of its output; ``low_res_scores`` stay the scores before it.

        Returns:
            A :class:`Prediction` with the label map at the input size.
        """
        if classes is not None:
            self.set_classes(classes)
        names = self.classes
        if abstain is not None and abstain.background is None and len(names) > UNKNOWN:
            raise ValueError(
                f"{len(names)} classes: label {UNKNOWN} is a class and cannot mean unknown; "
                "give the abstain rule a background class"
            )
        t_start = time.perf_counter()
        windows = [self.config.window]
        for size, stride in self.config.window.ensemble:
            windows.append(replace(self.config.window, size=size, stride=stride, ensemble=()))
        total = name_total = None
        timings: dict[str, float] = {"features": 0.0, "patch_lp": 0.0, "pixel_lp": 0.0}
        size = None
        for win in windows:
            t0 = time.perf_counter()
            feats = self.features(image, win, image_id)
            _sync(self.device)
            timings["features"] += time.perf_counter() - t0
            name_scores, t = self.propagate_names(feats)
            scores = self._reduce_synonyms(name_scores)
            for key, value in t.items():
                timings[key] += value
            if total is None:
                total, size = scores, scores.shape[1:]
                name_total = name_scores if abstain is not None or postprocess is not None else None
            else:  # ensemble: average the outputs of the window setups
                if scores.shape[1:] != size:
                    scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
                total = total + scores
                if name_total is not None:
                    if name_scores.shape[1:] != size:
                        name_scores = F.interpolate(
                            name_scores[None], size=size, mode="bilinear", align_corners=False
                        )[0]
                    name_total = name_total + name_scores
        assert total is not None
        scores = total / len(windows)
        h, w = feats.original_size
        labels, _ = resize_argmax(scores, h, w)
        if name_total is not None:  # per-name scores at the input size: post-processing, abstaining
            full = F.interpolate(
                (name_total / len(windows))[None], size=(h, w), mode="bilinear", align_corners=False
            )[0]
            if postprocess is not None:
                full = postprocess(feats.image, full)
                labels = self._reduce_synonyms(full).argmax(dim=0)
            if abstain is not None:
                labels = apply_abstain(full, abstain, owner=self._owner, labels=labels)
        timings["total"] = time.perf_counter() - t_start
        return Prediction(labels.cpu(), names, scores.cpu(), timings)

    def __repr__(self) -> str:
        cfg = self.config
        return f"LPOSS(method={self.method!r}, vm={cfg.vm!r}, vlm={cfg.vlm!r}, device={self.device})"


def _shallow(config: LPOSSConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def labels_to_numpy(pred: Prediction) -> np.ndarray:
    """The label map as an ``[H, W]`` uint8 (<= 255 classes) or uint16 numpy array."""
    arr = pred.labels.numpy()
    return arr.astype(np.uint8 if len(pred.class_names) <= 255 else np.uint16)


def _shared_vfm_pass(vlm: nn.Module, vm: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(vm features, vlm features)`` from one VM pass when the VLM is ProxyCLIP over the VM's own DINO
    (same ``weights_id``), else ``None`` (see :func:`lposs_lab.models.proxyclip.shared_vfm_forward`)."""
    from .models.proxyclip import shared_vfm_forward

    return shared_vfm_forward(vlm, vm, batch)


def _pretrained(value: Any) -> Any:
    """``None``: the registry's weights; ``False``: random init; a string: a checkpoint or hf-hub spec."""
    return True if value is None else value
