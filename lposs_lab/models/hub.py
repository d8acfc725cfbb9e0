"""Hugging Face hub settings read at call time (one parser for the offline switch)."""

from __future__ import annotations

import os

__all__ = ["hf_offline"]


def hf_offline() -> bool:
    """Whether hub downloads are off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: 1, on, yes, true)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)
