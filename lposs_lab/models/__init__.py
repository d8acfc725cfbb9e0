"""Encoders: DINO-family value features (VM), MaskCLIP dense features and text embeddings (VLM)."""

from .dino import ViTValueEncoder
from .maskclip import MaskCLIP
from .registry import (
    VLM_MODELS,
    VM_MODELS,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_vlm,
    create_vm,
)

__all__ = [
    "create_vm",
    "create_vlm",
    "VM_MODELS",
    "VLM_MODELS",
    "WeightsUnavailableError",
    "WeightsMismatchError",
    "ViTValueEncoder",
    "MaskCLIP",
]
