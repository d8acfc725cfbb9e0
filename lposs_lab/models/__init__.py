"""Encoders: DINO-family value features (VM); MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP, SC-CLIP dense
features and text embeddings (VLM).

The registry (names, ``create_*``, ``register_*``) is imported here; the encoder classes, which need torch
and timm, when first asked for.
"""

from ..errors import WeightsMismatchError, WeightsUnavailableError
from .registry import VLM_MODELS, VM_MODELS, create_vlm, create_vm, register_vlm, register_vm

__all__ = [
    "create_vm",
    "create_vlm",
    "register_vm",
    "register_vlm",
    "VM_MODELS",
    "VLM_MODELS",
    "WeightsUnavailableError",
    "WeightsMismatchError",
    "ViTValueEncoder",
    "MaskCLIP",
    "DenseCLIP",
    "ProxyCLIP",
    "SCCLIP",
]

_LAZY = {
    "ViTValueEncoder": "dino",
    "MaskCLIP": "maskclip",
    "DenseCLIP": "clip_dense",
    "ProxyCLIP": "proxyclip",
    "SCCLIP": "scclip",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lposs_lab.models' has no attribute {name!r}")
