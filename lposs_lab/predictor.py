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
from .pixels import PIXEL_FEATURES, needs_depth, pixel_features, pixel_stage
from .postprocess import Abstain
from .predictor_parts import (
    StageTimer,
    average_setups,
    cached_features,
    check_abstain,
    encode_classes,
    encode_windows,
    encoder_dtype,
    final_labels,
    patch_stage,
    reduce_synonyms,
)
from .score_files import PatchGrids
from .windows import (
    Window,
    crop_windows,
    patch_positions,
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
        patch_grids: for MaskCLIP / LPOSS over sliding windows, the per-window patch grids whose
            stitching gives ``low_res_scores`` (:meth:`lposs_lab.score_files.PatchGrids.scores`): the
            same scores in a fraction of the memory; None otherwise.
    """

    labels: Tensor
    class_names: list[str]
    low_res_scores: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    patch_grids: PatchGrids | None = None

    @property
    def scores(self) -> Tensor:
        """``[C, H, W]`` class scores at the input size (bilinear resize of :attr:`low_res_scores`)."""
        h, w = self.labels.shape
        return F.interpolate(self.low_res_scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]


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
        self.encoder_dtype = dtype = encoder_dtype(self.config.encoder_dtype, self.device)
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
        error_style: str = "python",
        **overrides: Any,
    ) -> LPOSS:
        """Build the encoders named by ``config`` (weights fetched/cached by huggingface_hub), the predictor.

        ``overrides`` replace top-level config fields, e.g. ``LPOSS.from_config(vm="dino_b8")`` or, for
        ProxyCLIP, ``vfm="dino_b8", vfm_pretrained=PATH``.
        ``text_cache_dir="auto"`` keeps the text embeddings of each vocabulary on disk in
        :func:`lposs_lab.text.default_text_cache_dir` (not for random-init VLMs, which are cheap to encode);
        a folder uses that one, ``None`` keeps them in memory only. ``error_style``: how a missing-weights
        error names the local-file settings, ``"python"`` (``vm_pretrained=PATH``) or ``"hydra"``
        (``vm.pretrained=PATH``, the command line's overrides).
        """
        from .models import create_vlm, create_vm
        from .models.registry import vfm_options
        from .models.weights import STYLES, missing_weights_error

        if error_style not in STYLES:
            raise ValueError(f"unknown error_style {error_style!r}; valid: python, hydra")
        if config is None:
            config = LPOSSConfig()
        elif not isinstance(config, LPOSSConfig):
            config = LPOSSConfig.from_dict(config)
        if overrides:
            config = LPOSSConfig.from_dict({**_shallow(config), **overrides})
        device = resolve_device(config.device)
        proxy = vfm_options(
            config.vlm, vfm=config.vfm, vfm_pretrained=config.vfm_pretrained, vm=config.vm,
            vm_pretrained=config.vm_pretrained,
        )  # fmt: skip
        missing: list[WeightsUnavailableError] = []
        vlm = vm = None
        try:
            pretrained = _pretrained(config.vlm_pretrained)
            vlm = create_vlm(config.vlm, pretrained=pretrained, device=device, **proxy)
        except WeightsUnavailableError as exc:
            missing.append(exc)
        if config.vm in VLM_AS_VM:  # CLIP's own features for the graph: no separate VM
            vm = vlm
        else:
            try:
                vm = create_vm(config.vm, pretrained=_pretrained(config.vm_pretrained), device=device)
            except WeightsUnavailableError as exc:
                missing.append(exc)
        if missing:  # name every missing checkpoint at once, in the caller's terms
            raise missing_weights_error(missing, error_style)
        depth = None
        if needs_depth(config.pixel.feature) and config.pixel.enabled and method in (None, "lposs_plus"):
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
        vocabulary = encode_classes(self.vlm, classes, self.text_cache_dir, self.device)
        self._classes, self._text, self._owner = vocabulary

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
        vm, vlm = encode_windows(self.vm, self.vlm, crops, self.batch_size, self.encoder_dtype)
        return ImageFeatures(img, original_size, windows, vm, vlm, int(self.vm.patch_size))

    def features(
        self, image: Any, window: WindowConfig | None = None, image_id: str | None = None
    ) -> ImageFeatures:
        """:meth:`extract`, through :attr:`feature_cache` when one is attached and ``image_id`` is given."""
        return cached_features(self, image, window or self.config.window, image_id)

    @torch.inference_mode()
    def pixel_features(self, feats: ImageFeatures) -> Tensor | None:
        """``[F, h, w]`` pixel-stage features for ``pixel.feature`` (None: Lab, computed by refine_pixels)."""
        px = self.config.pixel
        if px.feature == "lab":
            return None
        depth = feats.depth
        if depth is None and needs_depth(px.feature):
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
        return reduce_synonyms(scores, self._owner, len(self.classes)), timings

    @torch.inference_mode()
    def propagate_names(self, feats: ImageFeatures) -> tuple[Tensor, dict[str, float]]:
        """As :meth:`propagate`, before the synonym max: ``[Q, h, w]``, one row per name (synonym)."""
        feats = feats.to(self.device)
        grids, timer = self.patch_grids(feats)
        (_, h, w), px = feats.image.shape, self.config.pixel
        with timer("pixel_lp"):
            if self.method == "lposs_plus":
                scores = stitch_windows(grids, feats.windows, h, w)
                scores = pixel_stage(feats.image, scores, px, features=self.pixel_features(feats))
            elif self.config.window.size <= 0:
                scores = grids[0]  # the patch grid goes straight to the original size (docs/method.md §5)
            else:
                scores = stitch_windows(grids, feats.windows, h, w)
        return scores, timer.seconds

    @torch.inference_mode()
    def patch_grids(self, feats: ImageFeatures) -> tuple[Tensor, StageTimer]:
        """``[B, Q, gh, gw]`` per-window, per-name patch scores (after the patch stage but for MaskCLIP)."""
        if self._text is None:
            raise RuntimeError("no classes set: call set_classes([...]) first or pass classes= to predict()")
        cfg, feats, timer = self.config, feats.to(self.device), StageTimer(self.device)
        b, gh, gw, _ = feats.vm.shape
        y = feats.vlm.reshape(b * gh * gw, -1) @ self._text.T  # [N, T]
        with timer("patch_lp"):
            if self.method != "maskclip":
                graph = (feats.vm if cfg.lp.graph_features == "vm" else feats.vlm).reshape(b, gh * gw, -1)
                pos = patch_positions(feats.windows, (gh, gw), feats.patch_size, device=self.device)
                ys = y.reshape(b, gh * gw, -1)
                y = patch_stage(graph, pos.reshape(b, -1, 2), ys, cfg.lp, cfg.window.joint)
        return y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2), timer

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
        check_abstain(abstain, len(names))
        t_start = time.perf_counter()
        keep_names = abstain is not None or postprocess is not None
        # one window setup, or the ensemble's setups averaged
        scores, name_scores, feats, timings, grids = average_setups(self, image, image_id, keep_names)
        labels = final_labels(scores, name_scores, feats, self._owner, postprocess, abstain)
        timings["total"] = time.perf_counter() - t_start
        grids = None if grids is None else replace(grids, grids=grids.grids.cpu(), owner=grids.owner.cpu())
        return Prediction(labels.cpu(), names, scores.cpu(), timings, grids)

    def __repr__(self) -> str:
        cfg = self.config
        return f"LPOSS(method={self.method!r}, vm={cfg.vm!r}, vlm={cfg.vlm!r}, device={self.device})"


def _shallow(config: LPOSSConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def labels_to_numpy(pred: Prediction) -> np.ndarray:
    """The label map as an ``[H, W]`` uint8 (<= 255 classes) or uint16 numpy array."""
    arr = pred.labels.numpy()
    return arr.astype(np.uint8 if len(pred.class_names) <= 255 else np.uint16)


def _pretrained(value: Any) -> Any:
    """``None``: the registry's weights; ``False``: random init; a string: a checkpoint or hf-hub spec."""
    return True if value is None else value
