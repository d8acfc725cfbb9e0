"""Hyperparameters of the method as frozen dataclasses.

The Hydra configs under ``conf/`` map one-to-one onto these classes; nothing in the math reads a
config object. Defaults are the ones of docs/method.md (the numerics behind the paper's tables).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["LPConfig", "PixelConfig", "WindowConfig", "LPOSSConfig", "ENCODER_DTYPES", "DEPTH_MODEL_NAMES"]

#: ``PixelConfig.feature`` choices; :func:`lposs_lab.pixels.register_pixel_feature` adds to them.
PIXEL_FEATURE_NAMES: list[str] = ["lab", "depth", "lab+depth"]

#: ``LPOSSConfig.encoder_dtype`` choices.
ENCODER_DTYPES = ("float32", "float16", "bfloat16")

#: ``PixelConfig.depth_model`` choices (the keys of :data:`lposs_lab.models.depth.DEPTH_MODELS`, which maps
#: each to its weights; named here too so that a config is checked without importing torch)
DEPTH_MODEL_NAMES = ("depth_anything_v2_small", "tiny_random")


def _check(section: str, name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        key = f"{section}.{name}" if section else name
        raise ConfigError(f"{key}={value!r} is out of range; valid: {valid}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(section, name, value, value in choices, " | ".join(choices))


@dataclass(frozen=True)
class LPConfig:
    """Label propagation over patches (docs/method.md §3).

    Attributes:
        k: neighbours per node in the kNN graph, the node itself included (clamped to N).
        gamma: exponent of the appearance kernel ``max(f_i.f_j, 0)^gamma``.
        sigma: scale of the spatial kernel ``exp(-sigma * d^dist_pow)`` (d in pixels).
        dist_pow: power of the patch-centre distance in the spatial kernel.
        alpha: propagation strength in ``L = I - alpha * S_hat``.
        max_iter: conjugate-gradient iterations.
        tol: per-column relative residual at which CG stops early.
        appearance: ``"power"`` (``s^gamma``, default) or ``"exp"`` (``exp(-(1 - s) / sigma_a)``).
        sigma_a: scale of the ``"exp"`` appearance kernel.
        spatial: ``"rbf"`` (default), ``"linear"`` (``max(1 - sigma * d, 0)``) or ``"none"``.
        graph_features: ``"vm"`` (default, DINO) or ``"vlm"`` (CLIP's own features for S_a).
    """

    k: int = 400
    gamma: float = 3.0
    sigma: float = 0.01
    dist_pow: float = 1.0
    alpha: float = 0.95
    max_iter: int = 10
    tol: float = 1e-6
    appearance: str = "power"
    sigma_a: float = 0.1
    spatial: str = "rbf"
    graph_features: str = "vm"

    def __post_init__(self) -> None:
        n = "lp"
        _check(n, "k", self.k, _integer(self.k) and self.k >= 1, "an integer >= 1")
        for name in ("gamma", "sigma", "tol"):
            value = getattr(self, name)
            _check(n, name, value, _number(value) and value >= 0, "a number >= 0")
        for name in ("dist_pow", "sigma_a"):
            value = getattr(self, name)
            _check(n, name, value, _number(value) and value > 0, "a number > 0")
        _check(n, "alpha", self.alpha, _number(self.alpha) and 0 <= self.alpha < 1, "0 <= alpha < 1")
        _check(
            n, "max_iter", self.max_iter, _integer(self.max_iter) and self.max_iter >= 1, "an integer >= 1"
        )
        _choice(n, "appearance", self.appearance, ("power", "exp"))
        _choice(n, "spatial", self.spatial, ("rbf", "linear", "none"))
        _choice(n, "graph_features", self.graph_features, ("vm", "vlm"))


@dataclass(frozen=True)
class PixelConfig:
    """Label propagation over pixels, the "+" of LPOSS+ (docs/method.md §4).

    Attributes:
        enabled: run the pixel stage (LPOSS+) or stop after the patch stage (LPOSS).
        r: side of the square neighbourhood (odd), self excluded.
        tau: scale of the colour kernel ``exp(-||lab_i - lab_j|| / tau)``.
        alpha, max_iter, tol: as for :class:`LPConfig`.
        spatial: ``"binary"`` (default: every pixel of the window counts fully) or ``"rbf"``.
        sigma_s: scale in pixels of the ``"rbf"`` spatial factor ``exp(-d^2 / sigma_s^2)``.
        feature: ``"lab"`` (default), ``"depth"`` or ``"lab+depth"`` (depth from ``depth_model``).
        depth_model: depth estimator for the depth features (``depth_anything_v2_small``, ``tiny_random``).
        depth_weight: scale of the depth channel (in ``[0, 1]`` per image) in the pixel feature.
        backend: ``"auto"``, ``"torch"``, ``"numba"`` or ``"triton"``.
        max_bytes: memory budget of one CG over classes; classes are solved in chunks beyond it.
    """

    enabled: bool = True
    r: int = 13
    tau: float = 0.01
    alpha: float = 0.95
    max_iter: int = 10
    tol: float = 1e-6
    spatial: str = "binary"
    sigma_s: float = 6.0
    feature: str = "lab"
    depth_model: str = "depth_anything_v2_small"
    depth_weight: float = 1.0
    backend: str = "auto"
    max_bytes: int = 1 << 29

    def __post_init__(self) -> None:
        n = "pixel"
        _check(n, "r", self.r, _integer(self.r) and self.r >= 1 and self.r % 2 == 1, "an odd integer >= 1")
        for name in ("tau", "sigma_s"):
            value = getattr(self, name)
            _check(n, name, value, _number(value) and value > 0, "a number > 0")
        for name in ("tol", "depth_weight"):
            value = getattr(self, name)
            _check(n, name, value, _number(value) and value >= 0, "a number >= 0")
        _check(n, "alpha", self.alpha, _number(self.alpha) and 0 <= self.alpha < 1, "0 <= alpha < 1")
        _check(
            n, "max_iter", self.max_iter, _integer(self.max_iter) and self.max_iter >= 1, "an integer >= 1"
        )
        _check(n, "max_bytes", self.max_bytes, _integer(self.max_bytes) and self.max_bytes >= 1, "bytes >= 1")
        _choice(n, "spatial", self.spatial, ("binary", "rbf"))
        _choice(n, "feature", self.feature, tuple(PIXEL_FEATURE_NAMES))
        _choice(n, "depth_model", self.depth_model, DEPTH_MODEL_NAMES)
        _choice(n, "backend", self.backend, ("auto", "torch", "numba", "triton"))

    #: the fields that are :func:`lposs_lab.refine_pixels` arguments (the rest choose features or the stage)
    SOLVER_FIELDS = ("r", "tau", "alpha", "max_iter", "tol", "spatial", "sigma_s", "backend", "max_bytes")

    def solver_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lposs_lab.refine_pixels` / :func:`lposs_lab.refine`."""
        return {name: getattr(self, name) for name in self.SOLVER_FIELDS}


@dataclass(frozen=True)
class WindowConfig:
    """Resize and sliding windows (docs/method.md §1).

    Attributes:
        size: window side in pixels; 0 means no windows (the whole image is one window).
        stride: window stride in pixels.
        short_side: the resized image's short side is at most this.
        long_side: the resized image's long side is at most this.
        joint: one graph over the patches of all windows (default, docs/method.md §1) or one graph per window.
        ensemble: extra ``(size, stride)`` setups whose outputs are averaged with this one's (Table 3).
    """

    size: int = 224
    stride: int = 112
    short_side: int = 448
    long_side: int = 2048
    joint: bool = True
    ensemble: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        n = "window"
        for name in ("size", "stride", "short_side", "long_side"):
            value = getattr(self, name)
            # no windows (size 0): the stride is unused and may be 0
            low = 0 if name == "size" or (name == "stride" and self.size == 0) else 1
            _check(n, name, value, _integer(value) and value >= low, f"an integer >= {low}")
        _check(
            n,
            "long_side",
            self.long_side,
            self.long_side >= self.short_side,
            f">= short_side ({self.short_side})",
        )
        pairs = tuple(tuple(e) for e in self.ensemble)
        _check(
            n, "ensemble", self.ensemble, all(len(e) == 2 for e in pairs), "a list of [size, stride] pairs"
        )
        # Hydra hands lists over; keep the dataclass hashable and comparable.
        object.__setattr__(self, "ensemble", tuple(tuple(int(v) for v in e) for e in pairs))
        for size, stride in self.ensemble:
            _check(n, "ensemble", [size, stride], size >= 1 and stride >= 1, "sizes and strides >= 1")


@dataclass(frozen=True)
class LPOSSConfig:
    """Everything a :class:`lposs_lab.LPOSS` predictor needs.

    Attributes:
        vm: vision model for the graph (``dino_b16``, ``dino_b8``, ``dinov2_b14``, ``tiny_random``...).
        vlm: vision-language model for the initial scores (``maskclip_b16``, ``tiny_random``).
        vm_pretrained: ``None`` for the registry's weights (fetched/cached by huggingface_hub), a local
            checkpoint path or ``hf-hub:org/repo``, or ``False`` for random init.
        vlm_pretrained: same for the VLM.
        vfm: ProxyCLIP only: the proxy model, a VM name (``dino_b16``, ``dino_b8``, ``dinov2_b14``);
            ``None``: the VLM entry's own (``dino_b16`` for ``proxyclip_b16``).
        vfm_pretrained: ProxyCLIP only: the proxy model's weights as ``vm_pretrained``; ``None``: the VM's
            (``vm_pretrained``) when the proxy model is the VM, else the registry's.
        lp: patch-stage hyperparameters.
        pixel: pixel-stage hyperparameters.
        window: window setup.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``...) or ``"auto"``.
        encoder_dtype: ``"float32"`` or ``"float16"``/``"bfloat16"`` for the encoders (CUDA only).

    Raises:
        ConfigError: a value out of range, or ``pixel.backend="triton"`` (with the pixel stage enabled) where
            Triton cannot run: no CUDA device, ``device`` not CUDA, or triton not installed
            (``TRITON_INTERPRET=1`` runs it on the CPU). Checked when built, before any model is.
    """

    vm: str = "dino_b16"
    vlm: str = "maskclip_b16"
    vm_pretrained: str | bool | None = None
    vlm_pretrained: str | bool | None = None
    vfm: str | None = None
    vfm_pretrained: str | bool | None = None
    lp: LPConfig = field(default_factory=LPConfig)
    pixel: PixelConfig = field(default_factory=PixelConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    device: str = "auto"
    encoder_dtype: str = "float32"

    def __post_init__(self) -> None:
        _choice("", "encoder_dtype", self.encoder_dtype, ENCODER_DTYPES)
        dev = str(self.device)
        kind, _, index = dev.partition(":")
        valid_device = dev == "auto" or (
            kind in ("cpu", "cuda", "mps", "xpu") and (not index or index.isdigit())
        )
        _check("", "device", self.device, valid_device, "auto | cpu | cuda | cuda:N")
        if self.pixel.enabled and self.pixel.backend == "triton":
            reason = _triton_unavailable(dev)
            if reason is not None:
                raise ConfigError(f"pixel.backend='triton' cannot run here; valid here: {reason}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LPOSSConfig:
        """Build from a plain (possibly nested) mapping, e.g. a resolved Hydra config.

        Unknown keys raise :class:`lposs_lab.errors.ConfigError` naming the key and the valid ones.
        """
        nested = {"lp": LPConfig, "pixel": PixelConfig, "window": WindowConfig}
        kwargs: dict[str, Any] = {}
        valid = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key not in valid:
                raise ConfigError(f"unknown LPOSS config key {key!r}; valid keys: {sorted(valid)}")
            if key in nested and not isinstance(value, nested[key]):
                kwargs[key] = _sub(nested[key], value, key)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LPOSSConfig:
        """Copy with top-level fields replaced."""
        return replace(self, **changes)


def _cuda_device_files() -> bool:
    """Whether this machine may have a GPU torch can use: on Linux a CUDA (or ROCm, or WSL) GPU shows
    as a device file, so without one the answer is no and torch need not be imported to ask."""
    if os.name != "posix" or not Path("/dev").is_dir():
        return True  # no cheap test: ask torch
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _triton_unavailable(device: str) -> str | None:
    """Why the Triton pixel-stage kernel cannot run on ``device`` (``auto``, ``cuda``, ``cpu``...), or None.

    The answer starts with the backends that can run instead."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernel on CPU tensors (tests)
    if device.partition(":")[0] not in ("auto", "cuda"):
        return f"auto | torch | numba; triton needs a CUDA device, and device={device}"
    if not _cuda_device_files():
        return f"auto | torch | numba; triton needs a CUDA device, this machine has none (device={device})"
    import torch  # only here: a config that asks for triton on a machine with a GPU

    if not torch.cuda.is_available():
        return f"auto | torch | numba; triton needs a CUDA device, and torch sees none (device={device})"
    if importlib.util.find_spec("triton") is None:
        return "auto | torch; triton is not installed (pip install triton)"
    return None


def _sub(kind: type, value: Mapping[str, Any] | None, name: str):
    value = dict(value or {})
    valid = {f.name for f in fields(kind)}
    unknown = sorted(set(value) - valid)
    if unknown:
        raise ConfigError(f"unknown {name} option(s) {unknown}; valid keys: {sorted(valid)}")
    return kind(**value)
