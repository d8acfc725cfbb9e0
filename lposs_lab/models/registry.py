"""Named encoders and their weights: ``create_vm`` (DINO family) and ``create_vlm`` (MaskCLIP & co).

``pretrained`` everywhere means:

* ``True``: the registry's weights, fetched and cached by ``huggingface_hub`` under the real repo ids
  (timm: ``timm/<name>`` / ``model.safetensors``; open_clip ``laion2b_s34b_b88k``: the repo its
  pretrained table names, ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
  ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are read at call time.
* a ``str`` / path: a local checkpoint (``.safetensors``, ``.bin``, ``.pth``, ``.pt``), or
  ``hf-hub:org/repo[/file][@revision]``.
* ``False`` / ``None``: random init from a fixed seed (meaningless features).

Architectures are built with ``pretrained=False`` and the state dict is loaded here, strictly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, WeightsMismatchError, WeightsUnavailableError
from .dino import ViTValueEncoder
from .hub import hf_offline as _hf_offline
from .hub import hub_reachable
from .maskclip import MaskCLIP
from .tiny import (
    TINY_CLIP_ARCH,
    TINY_QUICKGELU_CLIP_ARCH,
    TINY_SCCLIP_ARCH,
    TINY_SEED,
    TINY_VIT_ARCH,
    merge_arch,
    seeded,
)

__all__ = ["WeightsUnavailableError", "WeightsMismatchError", "create_vm", "create_vlm", "VM_MODELS"]
__all__ += ["VLM_MODELS", "parse_hf_hub", "load_checkpoint_file"]

Pretrained = bool | str | os.PathLike | None
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")



def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_hf_hub(spec: str) -> tuple[str, str | None, str | None]:
    """Split ``hf-hub:org/repo[/file][@revision]`` into ``(repo_id, filename or None, revision or None)``."""
    if not spec.startswith("hf-hub:"):
        raise ValueError(f"not an hf-hub spec: {spec!r}; expected 'hf-hub:org/repo[/file][@revision]'")
    body = spec[len("hf-hub:") :].strip().strip("/")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        revision = revision or None
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"bad hf-hub spec {spec!r}; expected 'hf-hub:org/repo[/file][@revision]'")
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{parts[1]}", filename, revision


def _hf_cache_dir() -> str | None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None  # huggingface_hub's default


def _fetch_hub(
    repo_id: str, filenames: tuple[str, ...], revision: str | None, who: str, kind: str
) -> tuple[Path, str]:
    """Return ``(local path, weights id)`` of the first of ``filenames`` that huggingface_hub can provide.

    The local cache is tried first for every candidate (no network); then, unless offline, downloads in
    order, moving to the next candidate only when the hub says the file does not exist.
    """
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError as _Missing
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError as _Missing

    offline = _hf_offline()
    cache_dir = _hf_cache_dir()
    last_error: Exception | None = None
    passes = (True,) if offline else (True, False)
    for local_only in passes:
        if not local_only and not hub_reachable():
            break
        for filename in filenames:
            try:
                path = Path(
                    hf_hub_download(
                        repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_only
                    )
                )
            except _Missing as exc:
                last_error = exc
                continue
            except OSError as exc:  # not cached, offline, no network, unknown repo: give up on this pass
                last_error = exc
                if local_only:
                    continue
                break
            commit = path.parent.name if path.parent.parent.name == "snapshots" else (revision or "main")
            return path, f"hf:{repo_id}/{filename}@{commit}"
    where = cache_dir or "the Hugging Face cache"
    if offline:
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = "the hub is unreachable"
    else:
        reason = _one_line(f"{type(last_error).__name__}: {last_error}", 100)
    raise WeightsUnavailableError(
        f"weights for {kind} '{who}' unavailable: {repo_id} ({' or '.join(filenames)}) is not in {where} and "
        "cannot be downloaded "
        f"({reason}); cache it once with network access (HF_HOME), or pass a local file with "
        f"{kind}.pretrained=PATH ({kind}_pretrained= in LPOSSConfig)",
        kind=kind, name=who, repo_id=repo_id, reason=reason, where=str(where),
    )


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``weights_only``), on CPU.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsMismatchError(f"checkpoint {p} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and v.shape != sd[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model, e.g. {'; '.join(shapes[:2])})")
    return ", ".join(parts)


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, who: str) -> None:
    problem = _mismatch(model, sd)
    if problem:
        raise WeightsMismatchError(
            f"checkpoint {source} does not fit '{who}': {problem}; check the model name and arch overrides"
        )
    model.load_state_dict(sd, strict=True)


def _resolve(
    who: str, kind: str, pretrained: Pretrained, repo_id: str | None, filenames: tuple[str, ...]
) -> tuple[Path | None, str]:
    """Map ``pretrained`` to ``(checkpoint path or None for random init, weights id)``."""
    if pretrained is None or pretrained is False:
        return None, f"random:{TINY_SEED}"
    if pretrained is True:
        if repo_id is None:
            return None, f"random:{TINY_SEED}"
        return _fetch_hub(repo_id, filenames, None, who, kind)
    if not isinstance(pretrained, str | os.PathLike):
        raise ConfigError(
            f"pretrained must be True, False, None, a path or 'hf-hub:org/repo', got {pretrained!r}"
        )
    spec = os.fspath(pretrained)
    if spec.startswith("hf-hub:"):
        hub_repo, hub_file, revision = parse_hf_hub(spec)
        return _fetch_hub(hub_repo, (hub_file,) if hub_file else filenames, revision, who, kind)
    path = Path(spec).expanduser()
    if path.is_dir():
        found = [path / f for f in filenames if (path / f).is_file()]
        if not found:
            raise WeightsUnavailableError(
                f"no checkpoint ({' or '.join(filenames)}) in directory {path} for {kind} '{who}'"
            )
        path = found[0]
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint file not found for {kind} '{who}': {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(
            f"unsupported checkpoint type {path.name!r}; valid suffixes: {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    stat = path.resolve().stat()
    return path, f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _with_overrides(weights_id: str, overrides: dict[str, Any]) -> str:
    return (
        weights_id
        if not overrides
        else f"{weights_id}#arch={json.dumps(overrides, sort_keys=True, default=str)}"
    )


@dataclass(frozen=True)
class TimmVM:
    """A DINO-family VM: timm architecture name, hub weights, base arch overrides (configuration as code)."""

    name: str
    timm_name: str
    hf_repo: str | None
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    base_arch: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __call__(self, pretrained: Pretrained = True, **arch_overrides: Any) -> ViTValueEncoder:
        import timm

        arch = merge_arch(self.base_arch, arch_overrides)
        path, weights_id = _resolve(self.name, "vm", pretrained, self.hf_repo, self.hf_files)
        with seeded(TINY_SEED):
            model = timm.create_model(self.timm_name, pretrained=False, **arch)
        if path is not None:
            sd = load_checkpoint_file(path)
            own = model.state_dict()
            same_shapes = all(own[k].shape == v.shape for k, v in sd.items() if k in own)
            if _mismatch(model, sd) and same_shapes:  # other key names (original DINOv2...): timm converts
                from timm.models.vision_transformer import checkpoint_filter_fn

                sd = checkpoint_filter_fn(sd, model)
            _load_strict(model, sd, str(path), self.name)
        return ViTValueEncoder(model, f"{self.name}:{_with_overrides(weights_id, arch_overrides)}")


@dataclass(frozen=True)
class OpenClipVLM:
    """A MaskCLIP VLM: open_clip model config name, pretrained tag (its hub repo), base arch overrides."""

    name: str
    model_name: str
    pretrained_tag: str | None
    base_arch: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def hub_location(self) -> tuple[str | None, tuple[str, ...]]:
        """``(repo_id, candidate files)`` from the installed open_clip's pretrained table."""
        default_files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        if self.pretrained_tag is None:
            return None, default_files
        import open_clip

        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained_tag) or {}
        hub = cfg.get("hf_hub", "")
        if not hub:
            raise WeightsUnavailableError(
                f"open_clip has no hf_hub entry for {self.model_name}/{self.pretrained_tag}; "
                "pass vlm_pretrained=PATH"
            )
        repo_id, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        if not filename or filename == "open_clip_pytorch_model.bin":
            return repo_id, default_files
        safe = (filename.rsplit(".", 1)[0] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ()
        return repo_id, (*safe, filename)

    def build(self, pretrained: Pretrained = True, **arch_overrides: Any) -> tuple[nn.Module, str]:
        """The open_clip ``CLIP`` (weights loaded strictly) and its weights id ``name:source[#arch=...]``."""
        import open_clip
        from open_clip.model import CLIP

        base = open_clip.get_model_config(self.model_name)
        if base is None:
            raise ValueError(f"open_clip has no model config {self.model_name!r}")
        cfg = merge_arch(merge_arch(base, self.base_arch), arch_overrides)
        unsupported = sorted(set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"})
        if unsupported:
            raise ValueError(
                f"unsupported open_clip config keys {unsupported}; "
                "valid: embed_dim, vision_cfg, text_cfg, quick_gelu"
            )
        repo_id, files = self.hub_location() if pretrained is True else (None, self.hub_location()[1])
        path, weights_id = _resolve(self.name, "vlm", pretrained, repo_id, files)
        with seeded(TINY_SEED):
            model = CLIP(**cfg)
        if path is not None:
            sd = load_checkpoint_file(path)
            sd = {
                k: v
                for k, v in sd.items()
                if k not in ("attn_mask", "text.transformer.embeddings.position_ids")
            }
            if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
                sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
            _load_strict(model, sd, str(path), self.name)
        return model, f"{self.name}:{_with_overrides(weights_id, arch_overrides)}"

    def __call__(self, pretrained: Pretrained = True, **arch_overrides: Any) -> MaskCLIP:
        model, weights_id = self.build(pretrained, **arch_overrides)
        return MaskCLIP(model, weights_id, tokenizer_name=self.model_name)


@dataclass(frozen=True)
class DenseClipVLM(OpenClipVLM):
    """A training-free dense-CLIP VLM (docs/predictors.md): SCLIP, ClearCLIP, NACLIP, ProxyCLIP or SC-CLIP.

    ``vfm`` (ProxyCLIP only) names the VM registry entry of the proxy model; ``vfm_arch`` its arch overrides.
    """

    method: str = "sclip"
    vfm: str | None = None
    vfm_arch: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self,
        pretrained: Pretrained = True,
        *,
        vfm_pretrained: Pretrained | str = "same",
        vfm_arch: dict[str, Any] | None = None,
        **arch_overrides: Any,
    ) -> nn.Module:
        """Build the encoder. ProxyCLIP only: ``vfm_pretrained`` gives the VFM's weights (``"same"``: the
        registry's when ``pretrained`` is not False/None, random init otherwise), ``vfm_arch`` its timm
        arch overrides (merged over ``self.vfm_arch``)."""
        from .clip_dense import DENSE_METHODS, DenseCLIP
        from .proxyclip import ProxyCLIP
        from .scclip import SCCLIP

        model, weights_id = self.build(pretrained, **arch_overrides)
        text = {"tokenizer_name": self.model_name}
        if self.method != "proxyclip" and (vfm_arch is not None or vfm_pretrained != "same"):
            raise ValueError(f"'{self.name}' has no VFM: vfm_pretrained/vfm_arch are for ProxyCLIP only")
        if self.method in DENSE_METHODS:
            return DenseCLIP(model, weights_id, method=self.method, **text)
        if self.method == "scclip":
            return SCCLIP(model, weights_id, **text)
        if self.method == "proxyclip":
            if self.vfm is None:
                raise ValueError(f"'{self.name}' has no VFM")
            if isinstance(vfm_pretrained, str) and vfm_pretrained == "same":
                vfm_pretrained = pretrained is not None and pretrained is not False
            vfm = VM_MODELS[self.vfm](vfm_pretrained, **merge_arch(self.vfm_arch, vfm_arch or {}))
            if not isinstance(vfm, ViTValueEncoder):
                raise TypeError(f"VFM '{self.vfm}' is not a ViTValueEncoder")
            vfm.pos_embed_mode = "dino"  # DINO's own (g + 0.1) / g0 interpolation, docs/predictors.md §4
            return ProxyCLIP(model, weights_id, vfm=vfm, **text)
        raise ValueError(f"unknown dense CLIP method {self.method!r}")


VM_MODELS: dict[str, Callable[..., ViTValueEncoder]] = {
    "dino_b16": TimmVM("dino_b16", "vit_base_patch16_224.dino", "timm/vit_base_patch16_224.dino",
                       description="DINO ViT-B/16 (default)"),
    "dino_b8": TimmVM("dino_b8", "vit_base_patch8_224.dino", "timm/vit_base_patch8_224.dino",
                      description="DINO ViT-B/8"),
    "dinov2_b14": TimmVM("dinov2_b14", "vit_base_patch14_dinov2.lvd142m",
                         "timm/vit_base_patch14_dinov2.lvd142m", description="DINOv2 ViT-B/14 (native 518)"),
    "tiny_random": TimmVM("tiny_random", "vit_base_patch16_224.dino", None, base_arch=TINY_VIT_ARCH,
                          description="tiny random ViT, patch 16, 64-d: meaningless features, tests only"),
}  # fmt: skip

VLM_MODELS: dict[str, Callable[..., nn.Module]] = {
    "maskclip_b16": OpenClipVLM("maskclip_b16", "ViT-B-16", "laion2b_s34b_b88k",
                                description="MaskCLIP on OpenCLIP ViT-B-16 laion2b_s34b_b88k"),
    "tiny_random": OpenClipVLM("tiny_random", "ViT-B-16", None, base_arch=TINY_CLIP_ARCH,
                               description="tiny random CLIP, 32-d: meaningless features, tests only"),
}  # fmt: skip

_DENSE_DESCRIPTIONS = {
    "sclip": "SCLIP (softmax(qq)+softmax(kk), residual and FFN kept)",
    "clearclip": "ClearCLIP (softmax(qq), no residual, no FFN)",
    "naclip": "NACLIP (softmax(kk + Gaussian), no residual, no FFN)",
    "proxyclip": "ProxyCLIP (DINO ViT-B/16 proxy attention)",
    "scclip": "SC-CLIP (LOF fill, mixing, multi-level)",
}
for _method, _text in _DENSE_DESCRIPTIONS.items():
    _vfm = "dino_b16" if _method == "proxyclip" else None
    VLM_MODELS[f"{_method}_b16"] = DenseClipVLM(
        f"{_method}_b16", "ViT-B-16-quickgelu", "openai", method=_method, vfm=_vfm,
        description=f"{_text} on OpenAI CLIP ViT-B/16 (ViT-B-16-quickgelu / openai)",
    )
for _method, _text in _DENSE_DESCRIPTIONS.items():
    _vfm = "tiny_random" if _method == "proxyclip" else None
    VLM_MODELS[f"{_method}_tiny_random"] = DenseClipVLM(
        f"{_method}_tiny_random", "ViT-B-16-quickgelu", None, method=_method, vfm=_vfm,
        base_arch=TINY_SCCLIP_ARCH if _method == "scclip" else TINY_QUICKGELU_CLIP_ARCH,
        description=f"tiny random quick-GELU CLIP for {_method}: meaningless features, tests only",
    )
del _method, _text, _vfm


def _finish(encoder: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    encoder.eval()
    encoder.requires_grad_(False)
    if device is not None or dtype is not None:
        encoder.to(device=device, dtype=dtype)
    return encoder


def _lookup(table: dict[str, Callable[..., Any]], name: str, kind: str) -> Callable[..., Any]:
    if name not in table:
        raise ConfigError(
            f"unknown {kind} model {name!r}; valid names: {', '.join(table)} "
            f"(e.g. {kind}={next(iter(table))})"
        )
    return table[name]


def has_trained_weights(kind: str, name: str, pretrained: Pretrained) -> bool:
    """Whether ``create_vm`` / ``create_vlm(name, pretrained)`` loads trained weights (not a random init).

    ``pretrained`` False or None means random init; so does a registry entry without weights
    (``tiny_random`` and the ``*_tiny_random`` twins). Unknown names raise as :func:`create_vm` does.
    """
    entry = _lookup(VM_MODELS if kind == "vm" else VLM_MODELS, name, kind)
    if pretrained is None or pretrained is False:
        return False
    if pretrained is True:
        return (entry.hf_repo if kind == "vm" else entry.pretrained_tag) is not None
    return True  # a checkpoint file or hf-hub spec


def create_vm(
    name: str = "dino_b16",
    pretrained: Pretrained = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **arch_overrides: Any,
) -> ViTValueEncoder:
    """Build a VM (value-feature ViT) by registry name, frozen, in eval mode, on ``device``.

    Args:
        name: one of ``VM_MODELS`` (``dino_b16``, ``dino_b8``, ``dinov2_b14``, ``tiny_random``).
        pretrained: see the module docstring.
        device: where to put the model (default: stays on CPU).
        dtype: optional parameter dtype (e.g. ``torch.float16`` on CUDA); outputs stay float32.
        **arch_overrides: timm ``create_model`` overrides (e.g. ``depth=2, embed_dim=64, num_heads=4``).

    Raises:
        WeightsUnavailableError: weights not cached while offline, download failure, missing file.
        WeightsMismatchError: the checkpoint does not fit the architecture.
        ValueError: unknown name (the message lists the valid ones).
    """
    return _finish(_lookup(VM_MODELS, name, "vm")(pretrained, **arch_overrides), device, dtype)


def create_vlm(
    name: str = "maskclip_b16",
    pretrained: Pretrained = True,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **arch_overrides: Any,
) -> MaskCLIP:
    """Build a VLM by registry name, frozen, in eval mode, on ``device``.

    Args:
        name: one of ``VLM_MODELS``: ``maskclip_b16``, ``tiny_random`` (MaskCLIP); ``sclip_b16``,
            ``clearclip_b16``, ``naclip_b16``, ``proxyclip_b16``, ``scclip_b16`` (docs/predictors.md, OpenAI
            ``ViT-B-16-quickgelu``; ProxyCLIP adds a DINO ViT-B/16 VFM, ``vfm_pretrained=`` for its
            weights) and their ``*_tiny_random`` twins. All share MaskCLIP's interface.
        pretrained: see the module docstring.
        device: where to put the model.
        dtype: optional parameter dtype; outputs stay float32.
        **arch_overrides: open_clip config overrides merged into ``ViT-B-16``'s: ``embed_dim``,
            ``vision_cfg={...}``, ``text_cfg={...}``, ``quick_gelu``.

    Raises:
        WeightsUnavailableError, WeightsMismatchError, ValueError: as :func:`create_vm`.
    """
    return _finish(_lookup(VLM_MODELS, name, "vlm")(pretrained, **arch_overrides), device, dtype)
