"""Helpers for model tests: tiny models of the real architectures and a fake Hugging Face cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lposs_lab.models.tiny import TINY_CLIP_ARCH, merge_arch, seeded

TINY_TIMM = {"depth": 2, "embed_dim": 64, "num_heads": 4}


def _jitter(model: nn.Module, scale: float = 0.05) -> None:
    """Perturb every parameter: zero-initialised biases (qkv, in_proj) and unit LayerNorms must matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def tiny_timm(timm_name: str = "vit_base_patch16_224.dino", seed: int = 123, **arch: Any) -> nn.Module:
    """A tiny timm ViT of ``timm_name``'s family, random weights from ``seed``, eval mode."""
    import timm

    with seeded(seed):
        model = timm.create_model(timm_name, pretrained=False, **{**TINY_TIMM, **arch})
        _jitter(model)
    return model.eval()


def tiny_clip(seed: int = 123, **overrides: Any) -> nn.Module:
    """A tiny open_clip ``CLIP`` (ViT-B-16 config with ``TINY_CLIP_ARCH`` and ``overrides``), eval mode."""
    import open_clip
    from open_clip.model import CLIP

    cfg = merge_arch(merge_arch(open_clip.get_model_config("ViT-B-16"), TINY_CLIP_ARCH), overrides)
    with seeded(seed):
        model = CLIP(**cfg)
        _jitter(model)
    return model.eval()


def use_fake_hf_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point HF_HOME / HF_HUB_CACHE at ``root`` and force offline mode; return the hub cache dir."""
    import huggingface_hub.constants as hf_constants

    hub = root / "hf_home" / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(root / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # belt and braces: never touch the network
    return hub


def put_in_hf_cache(hub: Path, repo_id: str, filename: str, source: Path) -> Path:
    """Store ``source`` as ``repo_id``/``filename`` at ``main`` in huggingface_hub's cache layout.

    Layout: ``models--org--name/{blobs/<sha256>, snapshots/<commit>/<filename>, refs/main}``.
    """
    data = Path(source).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    commit = hashlib.sha1(f"{repo_id}/{filename}/{digest}".encode()).hexdigest()
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    blob = repo_dir / "blobs" / digest
    shutil.copyfile(source, blob)
    snap = repo_dir / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(Path("../..") / "blobs" / digest)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def save_safetensors(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def save_torch(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
