"""Class names -> synonyms -> prompt-ensembled CLIP text embeddings (docs/method.md §0 and §2, Text).

For each synonym: format the 80 ImageNet templates, encode, L2-normalise each, average, L2-normalise.
Embeddings are cached per synonym in memory (key: the VLM's ``weights_id``, the templates, the synonym)
and optionally on disk, one file per vocabulary, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .files import atomic_write
from .inputs import parse_classes, split_synonyms

__all__ = [
    "IMAGENET_TEMPLATES",
    "parse_classes",
    "split_synonyms",
    "TextEmbedder",
    "text_embeddings",
    "TextEncoder",
    "default_text_cache_dir",
]


def default_text_cache_dir() -> Path:
    """``$LPOSS_TEXT_CACHE_DIR`` or ``~/.cache/lposs_lab/text``: where predictors keep text embeddings."""
    env = os.environ.get("LPOSS_TEXT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lposs_lab" / "text"


def _openai_templates() -> tuple[str, ...]:
    # open_clip ships the 80 templates as callables; docs/method.md §2's list is the same, in the same order.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


#: The 80 ImageNet prompt templates of docs/method.md §2 (each holds one ``{}`` for the class name).
IMAGENET_TEMPLATES: tuple[str, ...] = _openai_templates()


class TextEncoder(Protocol):
    """What :class:`TextEmbedder` needs from a VLM (e.g. :class:`lposs_lab.models.MaskCLIP`)."""

    weights_id: str

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates must be a non-empty sequence of strings holding '{}'")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' placeholder; bad: {bad[:3]}")
    return tuple(templates)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


class TextEmbedder:
    """Prompt-ensembled text embeddings with an in-memory and optional on-disk cache.

    Args:
        cache_dir: directory for ``text_<sha256>.pt`` files (one per weights, templates and vocabulary);
            ``None`` keeps the cache in memory only.

    Attributes:
        encoded: how many synonyms were actually encoded (cache misses), for inspection.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[tuple[str, str, str], Tensor] = {}
        self.encoded = 0

    def clear(self) -> None:
        """Forget the in-memory cache (files on disk stay)."""
        self._memory.clear()

    def _disk_path(self, weights_id: str, templates_key: str, synonyms: Sequence[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"text_{_digest(weights_id, templates_key, list(synonyms))[:32]}.pt"

    def _read_disk(
        self, path: Path, weights_id: str, templates_key: str, synonyms: list[str]
    ) -> Tensor | None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable, truncated or foreign file: recompute and overwrite
            return None
        ok = (
            isinstance(blob, dict)
            and blob.get("weights_id") == weights_id
            and blob.get("templates") == templates_key
            and blob.get("synonyms") == synonyms
            and isinstance(blob.get("embeddings"), Tensor)
            and blob["embeddings"].shape[0] == len(synonyms)
        )
        return blob["embeddings"] if ok else None

    def __call__(
        self, vlm: TextEncoder, synonyms: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES
    ) -> Tensor:
        """Embeddings of ``synonyms`` (see :func:`text_embeddings`)."""
        if isinstance(synonyms, str) or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise ValueError("synonyms must be a sequence of non-empty strings (use split_synonyms first)")
        synonyms = list(synonyms)
        templates = _check_templates(templates)
        weights_id = str(vlm.weights_id)
        templates_key = _digest(list(templates))
        if not synonyms:
            raise ValueError("synonyms is empty; pass at least one class name")
        disk = self._disk_path(weights_id, templates_key, synonyms)
        missing = [s for s in dict.fromkeys(synonyms) if (weights_id, templates_key, s) not in self._memory]
        if missing and disk is not None and disk.is_file():
            stored = self._read_disk(disk, weights_id, templates_key, synonyms)
            if stored is not None:
                for s, row in zip(synonyms, stored, strict=True):
                    self._memory[(weights_id, templates_key, s)] = row.float()
                missing = []
        if missing:
            rows = _encode_synonyms(vlm, missing, templates)
            self.encoded += len(missing)
            for s, row in zip(missing, rows, strict=True):
                self._memory[(weights_id, templates_key, s)] = row
        device = _vlm_device(vlm)
        out = torch.stack([self._memory[(weights_id, templates_key, s)].to(device) for s in synonyms])
        if disk is not None and (missing or not disk.is_file()):
            with atomic_write(disk, "wb") as fh:
                blob = {"weights_id": weights_id, "templates": templates_key, "synonyms": synonyms}
                torch.save({**blob, "embeddings": out.detach().cpu()}, fh)
        return out


def _encode_synonyms(vlm: TextEncoder, synonyms: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``[S, E]``: per synonym, mean of the L2-normalised template embeddings, L2-normalised."""
    prompts = [t.format(s) for s in synonyms for t in templates]
    with torch.no_grad():
        emb = vlm.encode_text(prompts)
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ValueError(
            f"encode_text returned shape {tuple(emb.shape)} for {len(prompts)} prompts; expected [T, E]"
        )
    emb = F.normalize(emb.float(), dim=-1).reshape(len(synonyms), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def _vlm_device(vlm: object) -> torch.device:
    params = getattr(vlm, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


_DEFAULT_EMBEDDERS: dict[str | None, TextEmbedder] = {}


def text_embeddings(
    vlm: TextEncoder,
    synonyms: Sequence[str],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    cache_dir: str | Path | None = None,
) -> Tensor:
    """Prompt-ensembled text embeddings, cached (a process-wide :class:`TextEmbedder` per ``cache_dir``).

    Args:
        vlm: has ``weights_id`` and ``encode_text(list[str]) -> [N, E]``.
        synonyms: T non-empty strings (see :func:`split_synonyms`).
        templates: prompt templates with one ``{}`` each (default: the 80 ImageNet templates).
        cache_dir: optional directory for an on-disk cache.

    Returns:
        ``[T, E]`` float32, L2-normalised rows, on the device ``encode_text`` returns.
    """
    key = None if cache_dir is None else str(Path(cache_dir).resolve())
    if key not in _DEFAULT_EMBEDDERS:
        _DEFAULT_EMBEDDERS[key] = TextEmbedder(cache_dir)
    return _DEFAULT_EMBEDDERS[key](vlm, synonyms, templates)
