"""The Hydra edge: resolved configs become the core's frozen dataclasses and predictors."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from ..predictor import LPOSS

__all__ = ["lposs_config", "method_name", "build_predictor", "parse_classes", "text_cache_dir"]


def _section(cfg: DictConfig, key: str, kind: type) -> Any:
    node = cfg.get(key)
    if node is None:
        return kind()
    data = OmegaConf.to_container(node, resolve=True)
    allowed = set(kind.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown {key} option(s) {unknown}; valid: {sorted(allowed)}")
    return kind(**data)


def lposs_config(cfg: DictConfig) -> LPOSSConfig:
    """Map the ``vm``, ``vlm``, ``lp``, ``pixel`` and ``window`` groups onto :class:`LPOSSConfig`."""
    vm = cfg.get("vm") or {}
    vlm = cfg.get("vlm") or {}
    return LPOSSConfig(
        vm=str(vm.get("name", "dino_b16")),
        vlm=str(vlm.get("name", "maskclip_b16")),
        vm_pretrained=vm.get("pretrained"),
        vlm_pretrained=vlm.get("pretrained"),
        lp=_section(cfg, "lp", LPConfig),
        pixel=_section(cfg, "pixel", PixelConfig),
        window=_section(cfg, "window", WindowConfig),
        device=str(cfg.get("device", "auto")),
        encoder_dtype=str(cfg.get("encoder_dtype", "float32")),
    )


def method_name(cfg: DictConfig, config: LPOSSConfig) -> str:
    """``method.name``, with ``pixel.enabled=false`` turning LPOSS+ into LPOSS."""
    method = cfg.get("method") or {}
    name = str(method.get("name", "lposs_plus")) if isinstance(method, DictConfig | dict) else str(method)
    if name == "lposs_plus" and not config.pixel.enabled:
        name = "lposs"
    return name


def build_predictor(cfg: DictConfig) -> LPOSS:
    """The predictor a resolved run config describes (encoders built, weights fetched or cached)."""
    config = lposs_config(cfg)
    return LPOSS.from_config(config, method=method_name(cfg, config), text_cache_dir=text_cache_dir(cfg))


def text_cache_dir(cfg: Any) -> str | None:
    """``text_cache_dir`` of a run config: ``"auto"`` (default), a folder, or ``None`` (memory only)."""
    value = cfg.get("text_cache_dir", "auto") if cfg is not None else "auto"
    return None if value in (None, "", "none", "null") else str(value)


def parse_classes(value: Any) -> list[str]:
    """``"cat,dog;puppy,sky"`` or a list -> ``["cat", "dog;puppy", "sky"]``; blank lists are an error."""
    from . import UserError

    if value is None:
        raise UserError(
            "no classes given: pass classes=\"cat,dog;puppy,sky\" (',' between classes, ';' synonyms)"
        )
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, ListConfig | list | tuple):
        items = [str(v) for v in value if v is not None]
    else:
        raise UserError(f'classes must be a string like "cat,dog;puppy" or a list, got {value!r}')
    classes = [str(c).strip() for c in items]
    if not classes or all(not c.replace(";", "").strip() for c in classes):
        raise UserError('the class list is empty: pass classes="cat,dog;puppy,sky"')
    blank = [i for i, c in enumerate(classes) if not c.replace(";", "").strip()]
    if blank:
        raise UserError(f"class {blank[0] + 1} of {len(classes)} is blank in {value!r}")
    return classes
