"""The segmentation behind the web app, without Gradio: models kept per (vm, vlm, device), the features of
the last images kept so that moving a propagation slider reruns only the propagation.

``Engine.segment(path, classes, ...)`` checks its input (one-line :class:`AppInputError` messages), runs the
initial predictor (MaskCLIP scores), LPOSS and LPOSS+ on the same image features and returns their label
maps, per-stage seconds and what was adjusted (a downscaled image).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lposs_lab.config import LPOSSConfig
from lposs_lab.errors import UserError
from lposs_lab.image_io import load_image
from lposs_lab.postprocess import Abstain
from lposs_lab.predictor import LPOSS, METHODS, ImageFeatures, resolve_device
from lposs_lab.text import parse_classes

__all__ = [
    "AppInputError",
    "Engine",
    "Params",
    "Result",
    "MAX_CLASSES",
    "MAX_SIDE",
    "WINDOWS",
    "METHOD_LABELS",
]

#: Most classes one request may ask for (COCO-Stuff's 171 fit; hundreds are refused).
MAX_CLASSES = 200
#: Longest image side kept; larger images are downscaled (with a notice) before anything else.
MAX_SIDE = 2048
#: Window setups offered in the page: label -> (size, stride); size 0 is one window over the whole image.
WINDOWS = {"224 / stride 112": (224, 112), "448 / stride 224": (448, 224), "whole image": (0, 0)}
METHOD_LABELS = {"maskclip": "initial predictor", "lposs": "LPOSS", "lposs_plus": "LPOSS+"}
#: Features of this many (image, window, model) triples are kept in memory.
FEATURES_KEPT = 4
#: Results of this many (method, controls, image) are kept: a slider reruns only the methods it affects.
RESULTS_KEPT = 12


class AppInputError(UserError, ValueError):
    """A request the app cannot serve as asked (the message is shown in the page, one line)."""


@dataclass(frozen=True)
class Params:
    """The page's propagation controls; ``None`` keeps the library default (``lposs_lab.config``)."""

    k: int | None = None
    gamma: float | None = None
    sigma: float | None = None
    r: int | None = None
    tau: float | None = None
    window: str | None = None
    threshold: float = 0.0

    def apply(self, config: LPOSSConfig) -> LPOSSConfig:
        """``config`` with these values (checked by the config dataclasses)."""
        lp = {k: v for k, v in (("k", self.k), ("gamma", self.gamma), ("sigma", self.sigma)) if v is not None}
        px = {k: v for k, v in (("r", self.r), ("tau", self.tau)) if v is not None}
        win = {}
        if self.window is not None:
            if self.window not in WINDOWS:
                raise AppInputError(f"unknown window {self.window!r}; valid: {', '.join(WINDOWS)}")
            size, stride = WINDOWS[self.window]
            win = {"size": size, "stride": stride if size else config.window.stride}
        if "k" in lp:
            lp["k"] = int(lp["k"])
        if "r" in px:
            px["r"] = int(px["r"])
        return replace(
            config,
            lp=replace(config.lp, **lp),
            pixel=replace(config.pixel, **px),
            window=replace(config.window, **win),
        )


@dataclass
class Result:
    """One segmentation request's outcome.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB as segmented (after any downscale).
        class_names: display names, one per class asked for.
        classes: the classes as asked (with their synonyms).
        labels: method -> ``[H, W]`` uint8 label map (255: unknown, with an abstain threshold).
        scores: method -> ``[C, H, W]`` float16 class scores at the image size.
        timings: method -> seconds per stage (``features``, ``patch_lp``, ``pixel_lp``, ``total``).
        notices: what was adjusted (e.g. a downscale), one line each.
        random_init: which encoders have random weights (their masks are meaningless).
        features_reused: whether the image's features came from the kept ones (no encoder pass).
        unchanged: the methods whose controls did not move since a kept result (not recomputed).
    """

    image: np.ndarray
    class_names: list[str]
    classes: list[str]
    labels: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    timings: dict[str, dict[str, float]]
    notices: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)
    features_reused: bool = False
    unchanged: list[str] = field(default_factory=list)


class _KeptFeatures:
    """The predictor's ``feature_cache`` protocol over the last few images, in memory."""

    def __init__(self, size: int = FEATURES_KEPT) -> None:
        self.size = size
        self.items: OrderedDict[tuple[Any, ...], ImageFeatures] = OrderedDict()
        self.hits = 0

    def fetch(self, model: LPOSS, image: Any, window: Any, image_id: str) -> ImageFeatures:
        key = (id(model), image_id, window)
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        feats = model.extract(image, window)
        self.items[key] = feats
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return feats


def parse_class_box(text: str | None) -> list[str]:
    """The classes box (``,`` between classes, ``;`` synonyms), checked; at most :data:`MAX_CLASSES`."""
    if text is None or not str(text).strip():
        raise AppInputError("no classes given: type them as \"cat, dog;puppy, sky\" (',' between classes)")
    try:
        classes = parse_classes(str(text))
    except UserError as exc:
        raise AppInputError(str(exc).replace("pass classes=", "type ")) from None
    if len(classes) > MAX_CLASSES:
        raise AppInputError(f"{len(classes)} classes asked for; at most {MAX_CLASSES} per image: remove some")
    return classes


def read_image(path: str | Path | None, max_side: int = MAX_SIDE) -> tuple[np.ndarray, list[str]]:
    """``[H, W, 3]`` uint8 RGB of an uploaded file and the notices (a downscale), or an AppInputError."""
    if path is None or not str(path):
        raise AppInputError("no image given: upload, paste or pick an example image first")
    name = Path(str(path)).name
    try:
        rgb = load_image(path)
    except UserError as exc:
        raise AppInputError(str(exc).replace(str(path), name)) from None
    notices = []
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
        notices.append(
            f"the image ({w}x{h}) was downscaled to {size[0]}x{size[1]} (longest side at most {max_side}); "
            "label maps and scores are at that size"
        )
    return rgb, notices


def _memo_key(
    method: str, config: LPOSSConfig, threshold: float, request: tuple[Any, ...]
) -> tuple[Any, ...]:
    """What a method's result depends on: the initial predictor only on the window setup, LPOSS also on
    ``lp``, LPOSS+ also on ``pixel``; all on the abstain threshold, the image, classes and model."""
    parts: list[Any] = [method, request, config.window, float(threshold or 0.0)]
    if method != "maskclip":
        parts.append(config.lp)
    if method == "lposs_plus":
        parts.append(config.pixel)
    return tuple(parts)


def _digest(rgb: np.ndarray) -> str:
    return hashlib.sha1(repr(rgb.shape).encode() + rgb.tobytes()).hexdigest()


class Engine:
    """Models kept per (vm, vlm, device) and the features of the last images.

    Args:
        vm: graph-feature encoder name (``lposs_lab.models.VM_MODELS``).
        vlm: default initial predictor (``lposs_lab.models.VLM_MODELS``).
        device: ``auto``, ``cpu`` or ``cuda``.
        config: base hyperparameters (default :class:`lposs_lab.LPOSSConfig`).
    """

    def __init__(self, vm: str, vlm: str, device: str = "auto", config: LPOSSConfig | None = None) -> None:
        self.vm, self.vlm = vm, vlm
        self.device = str(resolve_device(device))
        self.config = replace(config or LPOSSConfig(), vm=vm, vlm=vlm, device=self.device)
        self.models: dict[tuple[str, str, str], LPOSS] = {}
        self._vocab: dict[tuple[str, str, str], list[str]] = {}
        self.features = _KeptFeatures()
        self.results: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, dict[str, float]]] = (
            OrderedDict()
        )
        self.lock = threading.Lock()

    def model(self, vlm: str | None = None) -> LPOSS:
        """The predictor of ``(vm, vlm, device)``, built on first use and kept."""
        key = (self.vm, vlm or self.vlm, self.device)
        if key not in self.models:
            from lposs_lab.models import VLM_MODELS

            if key[1] not in VLM_MODELS:
                raise AppInputError(f"unknown initial predictor {key[1]!r}; valid: {', '.join(VLM_MODELS)}")
            model = LPOSS.from_config(replace(self.config, vlm=key[1]), method="lposs_plus")
            model.feature_cache = self.features
            self.models[key] = model
        return self.models[key]

    def random_init(self, vlm: str | None = None) -> list[str]:
        """``["vm=...", "vlm=..."]`` for the encoders without trained weights."""
        from lposs_lab.models.registry import has_trained_weights

        out = []
        for kind, name, pretrained in (
            ("vm", self.vm, self.config.vm_pretrained),
            ("vlm", vlm or self.vlm, self.config.vlm_pretrained),
        ):
            if not has_trained_weights(kind, name, True if pretrained is None else pretrained):
                out.append(f"{kind}={name}")
        return out

    def segment(
        self,
        path: str | Path | None,
        classes: str | None,
        *,
        vlm: str | None = None,
        methods: Sequence[str] = METHODS,
        params: Params | None = None,
    ) -> Result:
        """Segment one uploaded image with ``methods`` (default: all three) on shared features."""
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise AppInputError(f"unknown method {bad[0] if bad else ''!r}; valid: {', '.join(METHODS)}")
        params = params or Params()
        class_list = parse_class_box(classes)
        rgb, notices = read_image(path)
        try:
            config = params.apply(self.config)
            abstain = Abstain(float(params.threshold)) if params.threshold and params.threshold > 0 else None
        except (UserError, ValueError) as exc:  # the config dataclasses' range checks
            raise AppInputError(str(exc)) from None
        digest = _digest(rgb)
        with self.lock:
            model = self.model(vlm)
            key = (self.vm, vlm or self.vlm, self.device)
            if self._vocab.get(key) != class_list:
                model.set_classes(class_list)
                self._vocab[key] = class_list
            hits = self.features.hits
            labels, scores, timings, kept = {}, {}, {}, []
            for method in methods:
                memo = _memo_key(method, config, params.threshold, (key, digest, tuple(class_list)))
                if memo in self.results:  # none of this method's controls moved: its last result
                    self.results.move_to_end(memo)
                    labels[method], scores[method], timings[method] = self.results[memo]
                    kept.append(method)
                    continue
                model.method, model.config = method, config
                t0 = time.perf_counter()
                pred = model.predict(rgb, image_id=digest, abstain=abstain)
                labels[method] = pred.labels.numpy().astype(np.uint8)
                scores[method] = pred.scores.numpy().astype(np.float16)
                timings[method] = {k: round(v, 4) for k, v in pred.timings.items()}
                timings[method]["total"] = round(time.perf_counter() - t0, 4)
                self.results[memo] = (labels[method], scores[method], timings[method])
                while len(self.results) > RESULTS_KEPT:
                    self.results.popitem(last=False)
            reused = self.features.hits - hits + len(kept) >= len(methods)
            names = model.classes
        return Result(
            rgb, names, class_list, labels, scores, timings, notices, self.random_init(vlm), reused, kept
        )
