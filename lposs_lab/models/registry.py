"""Named encoders: the VM and VLM tables, ``register_vm`` / ``register_vlm``, ``create_vm`` / ``create_vlm``.

A name is one of the tables' keys, or the import path of a builder outside the package
(``my_pkg.encoders.my_vlm`` or ``my_pkg.encoders:my_vlm``): the module is imported (its ``@register_vlm``
decorators run) and the builder is used. ``pretrained`` is described in :mod:`lposs_lab.models.weights`;
the entry types in :mod:`lposs_lab.models.entries`. Reading the tables imports neither torch nor timm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError
from .entries import DenseClipVLM, FunctionEntry, OpenClipVLM, TimmVM
from .tiny import TINY_CLIP_ARCH, TINY_QUICKGELU_CLIP_ARCH, TINY_SCCLIP_ARCH, TINY_VIT_ARCH
from .weights import Pretrained

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["VM_MODELS", "VLM_MODELS", "register_vm", "register_vlm", "create_vm", "create_vlm"]
__all__ += ["has_trained_weights", "vfm_options", "vlm_label", "lookup"]
__all__ += ["TimmVM", "OpenClipVLM", "DenseClipVLM"]

VM_MODELS: dict[str, Callable[..., Any]] = {
    "dino_b16": TimmVM("dino_b16", "vit_base_patch16_224.dino", "timm/vit_base_patch16_224.dino",
                       description="DINO ViT-B/16 (default)"),
    "dino_b8": TimmVM("dino_b8", "vit_base_patch8_224.dino", "timm/vit_base_patch8_224.dino",
                      description="DINO ViT-B/8"),
    "dinov2_b14": TimmVM("dinov2_b14", "vit_base_patch14_dinov2.lvd142m",
                         "timm/vit_base_patch14_dinov2.lvd142m", description="DINOv2 ViT-B/14 (native 518)"),
    "tiny_random": TimmVM("tiny_random", "vit_base_patch16_224.dino", None, base_arch=TINY_VIT_ARCH,
                          description="tiny random ViT, patch 16, 64-d: meaningless features, tests only"),
}  # fmt: skip

VLM_MODELS: dict[str, Callable[..., Any]] = {
    "maskclip_b16": OpenClipVLM("maskclip_b16", "ViT-B-16", "laion2b_s34b_b88k",
                                description="MaskCLIP on OpenCLIP ViT-B-16 laion2b_s34b_b88k"),
    "tiny_random": OpenClipVLM("tiny_random", "ViT-B-16", None, base_arch=TINY_CLIP_ARCH,
                               description="tiny random CLIP, 32-d: meaningless features, tests only"),
}  # fmt: skip

#: The training-free dense-CLIP predictors (docs/predictors.md): method -> (row label, description).
_DENSE = {
    "sclip": ("SCLIP", "SCLIP (softmax(qq)+softmax(kk), residual and FFN kept)"),
    "clearclip": ("ClearCLIP", "ClearCLIP (softmax(qq), no residual, no FFN)"),
    "naclip": ("NACLIP", "NACLIP (softmax(kk + Gaussian), no residual, no FFN)"),
    "proxyclip": ("ProxyCLIP", "ProxyCLIP (proxy attention from a DINO VFM, default ViT-B/16)"),
    "scclip": ("SC-CLIP", "SC-CLIP (LOF fill, mixing, multi-level)"),
}
for _method, (_label, _text) in _DENSE.items():
    VLM_MODELS[f"{_method}_b16"] = DenseClipVLM(
        f"{_method}_b16", "ViT-B-16-quickgelu", "openai", method=_method, label=_label, vms=VM_MODELS,
        vfm="dino_b16" if _method == "proxyclip" else None,
        description=f"{_text} on OpenAI CLIP ViT-B/16 (ViT-B-16-quickgelu / openai)",
    )  # fmt: skip
    VLM_MODELS[f"{_method}_tiny_random"] = DenseClipVLM(
        f"{_method}_tiny_random", "ViT-B-16-quickgelu", None, method=_method, label=_label, vms=VM_MODELS,
        vfm="tiny_random" if _method == "proxyclip" else None,
        base_arch=TINY_SCCLIP_ARCH if _method == "scclip" else TINY_QUICKGELU_CLIP_ARCH,
        description=f"tiny random quick-GELU CLIP for {_method}: meaningless features, tests only",
    )  # fmt: skip
del _method, _label, _text

_TABLES = {"vm": VM_MODELS, "vlm": VLM_MODELS}
F = TypeVar("F", bound=Callable[..., Any])


def _register(kind: str, obj: Any, name: str | None, **info: Any) -> Any:
    table = _TABLES[kind]
    entry = obj if hasattr(obj, "has_weights") else None
    if entry is None:
        if not callable(obj):
            raise TypeError(f"register_{kind} needs a builder function or a registry entry, got {obj!r}")
        entry = FunctionEntry(name or obj.__name__, obj, **info)
    key = name or entry.name
    old = table.get(key)
    origin = _origin(entry)
    same = old == entry or (origin is not None and _origin(old) == origin)  # the same builder, imported again
    if old is not None and not same:
        raise ConfigError(f"{kind} model {key!r} is already registered; pick another name")
    table[key] = entry
    return obj


def _origin(entry: Any) -> tuple[str, str] | None:
    fn = getattr(entry, "fn", None)
    return None if fn is None else (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""))


def register_vm(
    fn: F | None = None, *, name: str | None = None, has_weights: bool = True, description: str = ""
) -> Any:
    """Add a VM to :data:`VM_MODELS`, in the spirit of timm's ``register_model``.

    Use as ``@register_vm`` or ``@register_vm(name=..., has_weights=False)`` on a builder
    ``fn(pretrained=True, **arch_overrides) -> nn.Module`` (``[B, 3, h, w]`` in ``[0, 1]`` ->
    ``[B, gh, gw, D]`` L2-normalised, with ``patch_size`` and ``weights_id``), or call it with an entry
    (:class:`TimmVM`). ``has_weights``: whether ``pretrained=True`` loads trained weights (runs with
    random-init encoders are marked as such). Returns ``fn`` unchanged.
    """
    if fn is None:
        return lambda f: _register("vm", f, name, has_weights=has_weights, description=description)
    return _register("vm", fn, name, has_weights=has_weights, description=description)


def register_vlm(
    fn: F | None = None,
    *,
    name: str | None = None,
    has_weights: bool = True,
    label: str | None = None,
    description: str = "",
) -> Any:
    """Add a VLM (an initial predictor) to :data:`VLM_MODELS`; as :func:`register_vm`.

    The builder's encoder also has ``encode_text(list of str) -> [T, D]``. ``label`` names it in report
    tables (default: its name). Example (a MaskCLIP on another open_clip model)::

        @register_vlm(label="MaskCLIP-L")
        def maskclip_l14(pretrained=True, **arch):
            return OpenClipVLM("maskclip_l14", "ViT-L-14", "openai")(pretrained, **arch)
    """
    def add(f: Any) -> Any:
        info = {"has_weights": has_weights, "description": description}
        return _register("vlm", f, name, label=label or name or getattr(f, "__name__", None), **info)

    return add if fn is None else add(fn)


def _from_import_path(table: dict[str, Any], name: str, kind: str) -> Any:
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{kind}={name}: cannot import {module_name} ({reason})") from None
    for entry in table.values():  # registered by the module's own decorator
        if _origin(entry) == (module.__name__, attr):
            return entry
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise ConfigError(f"{kind}={name}: module {module_name} has no builder {attr!r}")
    register = register_vm if kind == "vm" else register_vlm
    register(obj, name=name)
    return table[name]


def lookup(kind: str, name: str) -> Any:
    """The registry entry of ``name`` (``vm`` or ``vlm``), importing it when ``name`` is an import path.

    Raises:
        ConfigError: unknown name (the message lists the valid ones and how to add one).
    """
    table = _TABLES[kind]
    if name in table:
        return table[name]
    if "." in name or ":" in name:
        return _from_import_path(table, name, kind)
    raise ConfigError(
        f"unknown {kind} model {name!r}; valid names: {', '.join(table)} "
        f"(e.g. {kind}={next(iter(table))}), or register one with @register_{kind} / name its builder "
        f"by import path ({kind}.name=my_pkg.module.builder)"
    )


def has_trained_weights(kind: str, name: str, pretrained: Pretrained) -> bool:
    """Whether ``create_vm`` / ``create_vlm(name, pretrained)`` loads trained weights (not a random init).

    ``pretrained`` False or None means random init; ``True`` the entry's weights, if it has any
    (``has_weights``: not ``tiny_random`` and the ``*_tiny_random`` twins); a checkpoint file or hf-hub
    spec counts as trained. Unknown names raise as :func:`create_vm` does.
    """
    entry = lookup(kind, name)
    if pretrained is None or pretrained is False:
        return False
    if pretrained is True:
        return bool(getattr(entry, "has_weights", True))
    return True


def vfm_options(
    vlm: str, *, vfm: str | None, vfm_pretrained: Pretrained, vm: str, vm_pretrained: Pretrained
) -> dict[str, Any]:
    """``create_vlm`` keyword arguments for the proxy model of ``vlm`` (``{}`` when it has none).

    ``vfm``: a VM name, ``None`` for the entry's own. ``vfm_pretrained``: as ``pretrained``; ``None``
    means ``vm_pretrained`` when the proxy model is the VM ``vm`` (one set of weights: the VM's pass then
    serves both, see :func:`lposs_lab.models.proxyclip.shared_vfm_forward`), else the registry's weights
    (random init when the VLM is).

    Raises:
        ConfigError: ``vfm`` / ``vfm_pretrained`` given for a VLM without a proxy model, or an unknown
            ``vfm`` (the message lists the valid ones).
    """
    entry = lookup("vlm", vlm)
    if not (isinstance(entry, DenseClipVLM) and entry.method == "proxyclip"):
        if vfm is not None or vfm_pretrained is not None:
            given = "vfm" if vfm is not None else "vfm_pretrained"
            raise ConfigError(f"{given} is for ProxyCLIP only: vlm={vlm} has no proxy model")
        return {}
    name = entry.check_vfm(vfm)
    if vfm_pretrained is None:
        vfm_pretrained = (True if vm_pretrained is None else vm_pretrained) if name == vm else "same"
    return {"vfm": name, "vfm_pretrained": vfm_pretrained}


def vlm_label(name: str | None) -> str | None:
    """The report label of initial predictor ``name`` (``sclip_b16`` -> ``SCLIP``); ``None`` for MaskCLIP
    entries (rows named by the method alone); an unregistered name (a builder registered in another
    process) is its own label. Never imports anything."""
    if not name:
        return None
    entry = VLM_MODELS.get(str(name))
    return str(name) if entry is None else getattr(entry, "label", str(name))


def _finish(encoder: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    encoder.eval()
    encoder.requires_grad_(False)
    if device is not None or dtype is not None:
        encoder.to(device=device, dtype=dtype)
    return encoder


def create_vm(
    name: str = "dino_b16",
    pretrained: Pretrained = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **arch_overrides: Any,
) -> Any:
    """Build a VM (value-feature ViT) by registry name, frozen, in eval mode, on ``device``.

    Args:
        name: one of ``VM_MODELS`` (``dino_b16``, ``dino_b8``, ``dinov2_b14``, ``tiny_random``, registered
            ones), or a builder's import path.
        pretrained: see :mod:`lposs_lab.models.weights`.
        device: where to put the model (default: stays on CPU).
        dtype: optional parameter dtype (e.g. ``torch.float16`` on CUDA); outputs stay float32.
        **arch_overrides: timm ``create_model`` overrides (e.g. ``depth=2, embed_dim=64, num_heads=4``).

    Raises:
        WeightsUnavailableError: weights not cached while offline, download failure, missing file.
        WeightsMismatchError: the checkpoint does not fit the architecture.
        ConfigError: unknown name (the message lists the valid ones).
    """
    return _finish(lookup("vm", name)(pretrained, **arch_overrides), device, dtype)


def create_vlm(
    name: str = "maskclip_b16",
    pretrained: Pretrained = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **arch_overrides: Any,
) -> Any:
    """Build a VLM by registry name, frozen, in eval mode, on ``device``.

    Args:
        name: one of ``VLM_MODELS``: ``maskclip_b16``, ``tiny_random`` (MaskCLIP); ``sclip_b16``,
            ``clearclip_b16``, ``naclip_b16``, ``proxyclip_b16``, ``scclip_b16`` (docs/predictors.md, OpenAI
            ``ViT-B-16-quickgelu``; ProxyCLIP adds a DINO VFM: ``vfm=`` names it, ``vfm_pretrained=`` gives
            its weights) and their ``*_tiny_random`` twins; registered ones; or a builder's import path.
            All share MaskCLIP's interface.
        pretrained: see :mod:`lposs_lab.models.weights`.
        device: where to put the model.
        dtype: optional parameter dtype; outputs stay float32.
        **arch_overrides: open_clip config overrides merged into ``ViT-B-16``'s: ``embed_dim``,
            ``vision_cfg={...}``, ``text_cfg={...}``, ``quick_gelu``.

    Raises:
        WeightsUnavailableError, WeightsMismatchError, ConfigError: as :func:`create_vm`.
    """
    return _finish(lookup("vlm", name)(pretrained, **arch_overrides), device, dtype)
