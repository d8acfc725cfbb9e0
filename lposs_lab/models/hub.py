"""Hugging Face hub settings read at call time (one parser for the offline switch)."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["hf_offline", "hub_reachable"]


def hf_offline() -> bool:
    """Whether hub downloads are off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: 1, on, yes, true)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (``$HF_ENDPOINT``) accepts a TCP connection, probed once per process.

    Without it, every download retries with back-off for tens of seconds before failing; this lets a
    missing checkpoint be reported at once.
    """
    from huggingface_hub import constants

    endpoint = str(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    if endpoint not in _REACHABLE:
        parsed = urlparse(endpoint)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname or "huggingface.co", port), timeout=timeout):
                _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]
