"""The Hydra edge: a resolved run config becomes the library's frozen dataclasses and built objects.

This module and the task modules beside it are the only code that reads an OmegaConf config. Importing it
needs no torch (the predictor, post-processing and cache modules are imported where used), so
:mod:`~lposs_lab.lab.tasks.precheck` can check a run's config, paths and outputs within a second or two.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from lposs_lab.config import LPOSSConfig
from lposs_lab.errors import ConfigError, OutputError

if TYPE_CHECKING:
    from lposs_lab.postprocess import Abstain, PAMRStep
    from lposs_lab.predictor import LPOSS

    from ..cache import FeatureCacheSpec

from ..stats import CIConfig

__all__ = [
    "lposs_config",
    "method_name",
    "build_predictor",
    "text_cache_dir",
    "plain",
    "run_dir_of",
    "hydra_overrides",
    "check_output_dir",
    "cache_spec",
    "abstain_rule",
    "random_init_encoders",
    "postprocess_step",
    "ci_config",
]


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved); other values as they are."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _encoder_name(group: dict[str, Any], default: str) -> str:
    """A ``vm`` / ``vlm`` group's encoder: ``name`` (a registry name or a builder's import path) or, in a
    config of the user's own, ``_target_`` (a builder's import path; it wins over ``name``)."""
    return str(group.get("_target_") or group.get("name") or default)


def lposs_config(cfg: DictConfig) -> LPOSSConfig:
    """Map the ``vm``, ``vlm``, ``lp``, ``pixel`` and ``window`` groups onto :class:`LPOSSConfig`.

    ``vlm.vfm`` / ``vlm.vfm_pretrained`` (ProxyCLIP's proxy model) become ``vfm`` / ``vfm_pretrained``.
    """
    vm = plain(cfg.get("vm")) or {}
    vlm = plain(cfg.get("vlm")) or {}
    default = LPOSSConfig()  # a key the config leaves out takes the dataclass's value
    return LPOSSConfig.from_dict(
        {
            "vm": _encoder_name(vm, default.vm),
            "vlm": _encoder_name(vlm, default.vlm),
            "vm_pretrained": vm.get("pretrained"),
            "vlm_pretrained": vlm.get("pretrained"),
            "vfm": vlm.get("vfm"),
            "vfm_pretrained": vlm.get("vfm_pretrained"),
            **{key: plain(cfg[key]) for key in ("lp", "pixel", "window") if cfg.get(key) is not None},
            "device": str(cfg.get("device", default.device)),
            "encoder_dtype": str(cfg.get("encoder_dtype", default.encoder_dtype)),
        }
    )


def method_name(cfg: DictConfig, config: LPOSSConfig) -> str:
    """``method.name``, with ``pixel.enabled=false`` turning LPOSS+ into LPOSS."""
    method = cfg.get("method") or {}
    name = str(method.get("name", "lposs_plus")) if isinstance(method, DictConfig | dict) else str(method)
    if name == "lposs_plus" and not config.pixel.enabled:
        name = "lposs"
    return name


def text_cache_dir(cfg: Any) -> str | None:
    """``text_cache_dir`` of a run config: ``"auto"`` (default), a folder, or ``None`` (memory only)."""
    value = cfg.get("text_cache_dir", "auto") if cfg is not None else "auto"
    return None if value in (None, "", "none", "null") else str(value)


def random_init_encoders(config: LPOSSConfig) -> list[str]:
    """``["vm=NAME", ...]``: the encoders of ``config`` without trained weights (outputs say so)."""
    from lposs_lab.models.registry import has_trained_weights  # timm/open_clip: only when asked
    from lposs_lab.predictor import VLM_AS_VM

    out = []
    for kind in ("vm", "vlm"):
        source = "vlm" if kind == "vm" and config.vm in VLM_AS_VM else kind  # clip_b16: the VLM's features
        pretrained = getattr(config, f"{source}_pretrained")
        pretrained = True if pretrained is None else pretrained  # None: the registry's weights
        if not has_trained_weights(source, getattr(config, source), pretrained):
            out.append(f"{kind}={getattr(config, kind)}")
    return out


def build_predictor(cfg: DictConfig) -> LPOSS:
    """The predictor a resolved run config describes (encoders built, weights fetched or cached)."""
    from lposs_lab.predictor import LPOSS

    config = lposs_config(cfg)
    return LPOSS.from_config(
        config, method=method_name(cfg, config), text_cache_dir=text_cache_dir(cfg), error_style="hydra"
    )


def run_dir_of(cfg: DictConfig) -> Path:
    """Hydra's output folder of this run (``paths.output_dir``; the current folder outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # HydraConfig not set (composed in a test or a notebook)
        paths = cfg.get("paths") or {}
        try:
            out = paths.get("output_dir")
        except InterpolationResolutionError:
            out = None
        return Path(str(out)) if out else Path.cwd()


def hydra_overrides() -> list[str]:
    """The task overrides of this run as typed (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def check_output_dir(folder: str | os.PathLike, *, create: bool = True) -> Path:
    """Make sure ``folder`` exists (created) and is writable, before any model is built.

    ``create=False`` creates nothing: the nearest existing folder on the way must be writable (the early
    check of the command line, before the inputs are read).

    Raises:
        OutputError: it is below a regular file, on a read-only file system, or not writable.
    """
    path = Path(folder).expanduser()
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(
            f"cannot write to {path}: {blocker} is a file, not a folder; choose another location"
        )
    probe = path if create else next(p for p in [path, *path.parents] if p.exists())
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".lposs-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write to {path}: {reason}; choose another location") from None
    return path


def cache_spec(cfg: DictConfig, dataset: str) -> FeatureCacheSpec | None:
    """The feature cache a run asks for (``cache.enabled``), or None."""
    from ..cache import FeatureCacheSpec

    section = cfg.get("cache")
    if not section or not section.get("enabled", False):
        return None
    return FeatureCacheSpec(
        root=str(section.get("dir")) if section.get("dir") else None,
        dataset=dataset,
        shard_size=int(section.get("shard_size", 8)),
        dtype=str(section.get("dtype", "float32")),
    )


def abstain_rule(cfg: DictConfig, background: int | None = None) -> Abstain | None:
    """The ``predict.*`` abstain rule of a run (None when ``predict.unknown_threshold`` is unset).

    ``background``: the class abstaining pixels get (benchmarks with a background class); None: unknown.
    """
    from lposs_lab.postprocess import Abstain

    section = plain(cfg.get("predict")) or {}
    threshold = section.get("unknown_threshold")
    if threshold is None:
        return None
    area = section.get("area_threshold")
    scale = section.get("logit_scale")  # left out: Abstain's own default
    return Abstain(
        threshold=float(threshold),
        **({} if scale is None else {"logit_scale": float(scale)}),
        background=background,
        area_threshold=None if area is None else float(area),
    )


def postprocess_step(cfg: DictConfig) -> PAMRStep | None:
    """The ``postprocess`` group: ``none`` (None) or ``pamr`` (a :class:`PAMRStep`)."""
    section = plain(cfg.get("postprocess")) or {}
    name = str(section.get("name", "none"))
    if name == "none":
        return None
    if name == "pamr":
        from lposs_lab.postprocess import PAMRStep

        return PAMRStep(int(section.get("iterations", 10)), tuple(section.get("dilations", (8, 16))))
    raise ConfigError(f"unknown postprocess {name!r}; valid: none, pamr (e.g. postprocess=pamr)")


def ci_config(cfg: Any) -> CIConfig:
    """The bootstrap intervals a run asks for (``metrics.ci``; a missing key takes :class:`CIConfig`'s).

    Raises:
        ConfigError: a value out of range (named with its valid range).
    """
    metrics = (cfg.get("metrics") if cfg is not None else None) or {}
    section = plain(metrics.get("ci")) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"metrics.ci={section!r} is not a section; set metrics.ci.resamples=N etc.")
    unknown = sorted(set(section) - {"level", "resamples", "seed"})
    if unknown:
        raise ConfigError(f"unknown key metrics.ci.{unknown[0]}; valid: level, resamples, seed")
    return CIConfig(**section)
