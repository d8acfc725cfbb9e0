"""Registry entries: how one named encoder is built (architecture, weights, wrapper), as configuration.

Every entry is a callable ``entry(pretrained=True, **arch_overrides) -> nn.Module`` with ``name``,
``has_weights`` (whether ``pretrained=True`` loads trained weights, like timm's ``has_weights``),
``description`` and, for VLMs, ``label`` (the row label of an initial predictor in report tables; ``None``
for MaskCLIP, the paper's own, whose rows are named by the method alone). Torch, timm and open_clip are
imported when an entry is built, not when the tables are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, WeightsUnavailableError
from .tiny import TINY_SEED, merge_arch, seeded
from .weights import (
    Pretrained,
    load_checkpoint_file,
    load_strict,
    resolve_pretrained,
    state_dict_mismatch,
    with_overrides,
)

if TYPE_CHECKING:
    from torch import nn

    from .dino import ViTValueEncoder
    from .maskclip import MaskCLIP

__all__ = ["TimmVM", "OpenClipVLM", "DenseClipVLM", "FunctionEntry", "PROXY_VFMS"]

#: The VMs a ProxyCLIP proxy model (``vfm=``) may be, besides registered DINO-family ones.
PROXY_VFMS = ("dino_b16", "dino_b8", "dinov2_b14")


@dataclass(frozen=True)
class TimmVM:
    """A DINO-family VM: timm architecture name, hub weights, base arch overrides (configuration as code)."""

    name: str
    timm_name: str
    hf_repo: str | None
    hf_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    base_arch: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def has_weights(self) -> bool:
        return self.hf_repo is not None

    def build(
        self, pretrained: Pretrained = True, *, kind: str = "vm", **arch_overrides: Any
    ) -> ViTValueEncoder:
        """The encoder; ``kind`` names it in messages (``vfm`` when it is ProxyCLIP's proxy model)."""
        import timm

        from .dino import ViTValueEncoder

        arch = merge_arch(self.base_arch, arch_overrides)
        path, weights_id = resolve_pretrained(self.name, kind, pretrained, self.hf_repo, self.hf_files)
        with seeded(TINY_SEED):
            model = timm.create_model(self.timm_name, pretrained=False, **arch)
        if path is not None:
            sd = load_checkpoint_file(path)
            own = model.state_dict()
            same_shapes = all(own[k].shape == v.shape for k, v in sd.items() if k in own)
            if state_dict_mismatch(model, sd) and same_shapes:  # other key names (original DINOv2...)
                from timm.models.vision_transformer import checkpoint_filter_fn

                sd = checkpoint_filter_fn(sd, model)
            load_strict(model, sd, str(path), self.name)
        return ViTValueEncoder(model, f"{self.name}:{with_overrides(weights_id, arch_overrides)}")

    def __call__(self, pretrained: Pretrained = True, **arch_overrides: Any) -> ViTValueEncoder:
        return self.build(pretrained, **arch_overrides)


@dataclass(frozen=True)
class OpenClipVLM:
    """A MaskCLIP VLM: open_clip model config name, pretrained tag (its hub repo), base arch overrides."""

    name: str
    model_name: str
    pretrained_tag: str | None
    base_arch: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    label: str | None = None

    @property
    def has_weights(self) -> bool:
        return self.pretrained_tag is not None

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
                "pass a local checkpoint (vlm_pretrained=PATH)"
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
        path, weights_id = resolve_pretrained(self.name, "vlm", pretrained, repo_id, files)
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
            load_strict(model, sd, str(path), self.name)
        return model, f"{self.name}:{with_overrides(weights_id, arch_overrides)}"

    def __call__(self, pretrained: Pretrained = True, **arch_overrides: Any) -> MaskCLIP:
        from .maskclip import MaskCLIP

        model, weights_id = self.build(pretrained, **arch_overrides)
        return MaskCLIP(model, weights_id, tokenizer_name=self.model_name)


@dataclass(frozen=True)
class DenseClipVLM(OpenClipVLM):
    """A training-free dense-CLIP VLM (docs/predictors.md): SCLIP, ClearCLIP, NACLIP, ProxyCLIP or SC-CLIP.

    ``vfm`` (ProxyCLIP only) names the VM registry entry of the default proxy model; ``vfm_arch`` its arch
    overrides; ``vms`` is the VM table the proxy model is looked up in (the registry's ``VM_MODELS``).
    """

    method: str = "sclip"
    vfm: str | None = None
    vfm_arch: dict[str, Any] = field(default_factory=dict)
    vms: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def check_vfm(self, vfm: str | None) -> str | None:
        """The proxy model's VM name: ``vfm`` or the entry's own; a ConfigError when this entry has none
        or ``vfm`` is not a registered VM (the message lists the valid ones)."""
        if self.method != "proxyclip":
            if vfm is not None:
                raise ConfigError(f"'{self.name}' has no proxy model (vfm={vfm}): vfm is for ProxyCLIP only")
            return None
        name = vfm if vfm is not None else self.vfm
        if name is None:
            raise ValueError(f"'{self.name}' has no VFM")
        if name not in self.vms:
            valid = [n for n in PROXY_VFMS if n in self.vms] + [n for n in self.vms if n not in PROXY_VFMS]
            raise ConfigError(
                f"unknown ProxyCLIP proxy model vfm={name!r}; valid choices: {', '.join(valid)} "
                "(the VM registry's names)"
            )
        return name

    def __call__(
        self,
        pretrained: Pretrained = True,
        *,
        vfm: str | None = None,
        vfm_pretrained: Pretrained | str = "same",
        vfm_arch: dict[str, Any] | None = None,
        **arch_overrides: Any,
    ) -> nn.Module:
        """Build the encoder. ProxyCLIP only: ``vfm`` names the proxy model (a VM registry name, default
        the entry's), ``vfm_pretrained`` its weights (``"same"``: trained unless ``pretrained`` is
        False/None; else as ``pretrained``), ``vfm_arch`` its timm arch overrides (merged over the entry's
        when ``vfm`` is the entry's own)."""
        from .clip_dense import DENSE_METHODS, DenseCLIP
        from .proxyclip import ProxyCLIP
        from .scclip import SCCLIP

        vfm_name = self.check_vfm(vfm)  # before any weights are read
        if vfm_name is None and (vfm_arch is not None or vfm_pretrained != "same"):
            raise ValueError(f"'{self.name}' has no VFM: vfm_pretrained/vfm_arch are for ProxyCLIP only")
        model, weights_id = self.build(pretrained, **arch_overrides)
        text = {"tokenizer_name": self.model_name}
        if self.method in DENSE_METHODS:
            return DenseCLIP(model, weights_id, method=self.method, **text)
        if self.method == "scclip":
            return SCCLIP(model, weights_id, **text)
        if self.method == "proxyclip":
            from .dino import ViTValueEncoder

            if isinstance(vfm_pretrained, str) and vfm_pretrained == "same":
                vfm_pretrained = pretrained is not None and pretrained is not False
            entry = self.vms[vfm_name]
            base = self.vfm_arch if vfm_name == self.vfm else {}
            arch = merge_arch(base, vfm_arch or {})
            build = getattr(entry, "build", None)
            proxy = build(vfm_pretrained, kind="vfm", **arch) if build else entry(vfm_pretrained, **arch)
            if not isinstance(proxy, ViTValueEncoder):
                raise TypeError(f"VFM '{vfm_name}' is not a ViTValueEncoder")
            proxy.pos_embed_mode = "dino"  # DINO's own (g + 0.1) / g0 interpolation, docs/predictors.md §4
            return ProxyCLIP(model, weights_id, vfm=proxy, **text)
        raise ValueError(f"unknown dense CLIP method {self.method!r}")


@dataclass(frozen=True)
class FunctionEntry:
    """A registered builder function (:func:`~lposs_lab.models.register_vlm` / ``register_vm``).

    ``fn(pretrained=..., **arch_overrides)`` returns the encoder: a VM maps ``[B, 3, h, w]`` images in
    ``[0, 1]`` to ``[B, gh, gw, D]`` L2-normalised features and has ``patch_size`` and ``weights_id``; a VLM
    has the same plus ``encode_text(list of str) -> [T, D]`` (see :class:`~lposs_lab.models.MaskCLIP`).
    """

    name: str
    fn: Callable[..., Any]
    has_weights: bool = True
    description: str = ""
    label: str | None = None

    def __call__(self, pretrained: Pretrained = True, **arch_overrides: Any) -> nn.Module:
        return self.fn(pretrained=pretrained, **arch_overrides)
