"""Encoders: DINO-family value features (VM); MaskCLIP, SCLIP, ClearCLIP, NACLIP, ProxyCLIP, SC-CLIP dense
features and text embeddings (VLM)."""

from .clip_dense import DenseCLIP
from .dino import ViTValueEncoder
from .maskclip import MaskCLIP
from .proxyclip import ProxyCLIP
from .registry import (
    VLM_MODELS,
    VM_MODELS,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_vlm,
    create_vm,
)
from .scclip import SCCLIP

__all__ = [
    "create_vm",
    "create_vlm",
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
