"""Tiny architectures of the same families as the real encoders (tests, smoke runs, CPU demos).

Models built from these with random weights produce **meaningless** features: they exercise the code
paths (shapes, padding, position-embedding resampling, graphs, caching) without any download.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

__all__ = ["TINY_VIT_ARCH", "TINY_CLIP_ARCH", "TINY_QUICKGELU_CLIP_ARCH", "TINY_SCCLIP_ARCH", "TINY_SEED"]
__all__ += ["seeded", "merge_arch"]

TINY_SEED = 0

#: timm ``VisionTransformer`` overrides (on top of ``vit_base_patch16_224.dino``): patch 16, 64-d, 2 blocks.
TINY_VIT_ARCH: dict[str, Any] = {"embed_dim": 64, "depth": 2, "num_heads": 4}

#: open_clip ``CLIP`` overrides (on top of ``ViT-B-16``): 32-d joint space, tiny vision and text towers.
#: The text vocabulary and context length stay those of the real tokenizer.
TINY_CLIP_ARCH: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 224},
    "text_cfg": {"layers": 2, "width": 32, "heads": 2, "context_length": 77, "vocab_size": 49408},
}

#: ``TINY_CLIP_ARCH`` with QuickGELU (the OpenAI CLIP activation of SCLIP, ClearCLIP, NACLIP, ProxyCLIP).
TINY_QUICKGELU_CLIP_ARCH: dict[str, Any] = {**copy.deepcopy(TINY_CLIP_ARCH), "quick_gelu": True}

#: The same with 12 vision blocks: SC-CLIP reads block outputs 4..11 of ViT-B/16.
TINY_SCCLIP_ARCH: dict[str, Any] = {
    **copy.deepcopy(TINY_QUICKGELU_CLIP_ARCH),
    "vision_cfg": {**TINY_CLIP_ARCH["vision_cfg"], "layers": 12},
}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``, restoring the global RNG state after."""
    import torch  # here: the registry's tables import this module without torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def merge_arch(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (nested dicts are merged, other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_arch(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
