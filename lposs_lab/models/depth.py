"""Monocular depth for the pixel stage: Depth Anything V2 Small through Hugging Face ``transformers``.

Optional: install the ``[depth]`` extra (``transformers``); it is imported only when a depth model is built.
``tiny_random`` builds the same architecture, tiny and randomly initialised (tests; meaningless depth).

:class:`DepthEstimator` maps ``[B, 3, h, w]`` RGB in ``[0, 1]`` to ``[B, h, w]`` relative depth (the model's
disparity-like output) min-max normalised to ``[0, 1]`` per image; :func:`lposs_lab.pixels.pixel_features`
turns it, with or without Lab, into the ``[F, h, w]`` features :func:`lposs_lab.pixels.refine_pixels` takes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hub import hf_offline

__all__ = ["DEPTH_MODELS", "DepthEstimator", "create_depth", "normalise_depth"]

#: name -> Hugging Face repo id (None: tiny random architecture, no weights).
DEPTH_MODELS: dict[str, str | None] = {
    "depth_anything_v2_small": "depth-anything/Depth-Anything-V2-Small-hf",
    "tiny_random": None,
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_depth(depth: Tensor) -> Tensor:
    """Min-max normalise each map of ``[B, h, w]`` to ``[0, 1]`` (a constant map becomes 0)."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be [B, h, w], got {tuple(depth.shape)}")
    flat = depth.reshape(depth.shape[0], -1).float()
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    out = (flat - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return out.reshape(depth.shape)


class DepthEstimator(nn.Module):
    """A ``transformers`` depth-estimation model as a pure image-to-depth function.

    The image is normalised (ImageNet mean/std), resized bilinearly so both sides are multiples of the
    patch size (the short side at least ``min_side``), and the prediction resized back to ``(h, w)``.

    Args:
        model: a ``transformers`` ``*ForDepthEstimation`` model (output ``predicted_depth [B, h', w']``).
        weights_id: names the exact weights (for caches and reports).
        patch_size: the backbone's patch size (14 for Depth Anything V2).
        min_side: the short side the model sees at least (518: Depth Anything's training size).
    """

    def __init__(
        self, model: nn.Module, weights_id: str, *, patch_size: int = 14, min_side: int = 518
    ) -> None:
        super().__init__()
        self.model = model
        self.weights_id = str(weights_id)
        self.patch_size = int(patch_size)
        self.min_side = int(min_side)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h', w')`` the model sees: scaled up to ``min_side``, rounded up to the patch size."""
        s = max(1.0, self.min_side / min(h, w))
        p = self.patch_size
        return max(p, -(-round(h * s) // p) * p), max(p, -(-round(w * s) // p) * p)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, h, w]`` RGB in ``[0, 1]`` -> ``[B, h, w]`` float32 depth in ``[0, 1]`` per image."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, h, w], got {tuple(images.shape)}")
        _, _, h, w = images.shape
        x = (images.float() - self.mean) / self.std
        size = self.input_size(h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        param = next(self.model.parameters())
        pred = self.model(pixel_values=x.to(param.dtype)).predicted_depth.float()
        pred = F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return normalise_depth(pred)

    def extra_repr(self) -> str:
        return f"weights_id={self.weights_id!r}, patch_size={self.patch_size}, min_side={self.min_side}"


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "depth features need Hugging Face transformers: pip install 'lposs_lab[depth]'"
        ) from exc
    return transformers


def _tiny_config(transformers: Any) -> Any:
    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=56, out_indices=[1, 2], reshape_hidden_states=False, apply_layernorm=True,
    )
    return transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, reassemble_factors=[4, 2],
        neck_hidden_sizes=[8, 16], fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )


def create_depth(
    name: str = "depth_anything_v2_small",
    pretrained: bool | str | os.PathLike = True,
    *,
    device: torch.device | str | None = None,
    min_side: int | None = None,
) -> DepthEstimator:
    """Build a depth estimator by name, frozen, in eval mode.

    Args:
        name: ``depth_anything_v2_small`` (weights from the Hugging Face hub or its cache) or ``tiny_random``.
        pretrained: ``True`` for the hub weights, a local folder (``save_pretrained`` layout), or
            ``False`` for a seeded random init of the same architecture.
        device: where to put the model.
        min_side: short side the model sees (default 518; 56 for ``tiny_random``).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        lposs_lab.models.WeightsUnavailableError: weights not cached while offline, or the download failed.
    """
    if name not in DEPTH_MODELS:
        raise ValueError(f"unknown depth model {name!r}; valid names: {', '.join(DEPTH_MODELS)}")
    transformers = _import_transformers()
    from ..errors import WeightsUnavailableError
    from .tiny import TINY_SEED, seeded

    repo = DEPTH_MODELS[name]
    if repo is None or pretrained is False or pretrained is None:
        config = _tiny_config(transformers) if repo is None else transformers.AutoConfig.from_pretrained(repo)
        with seeded(TINY_SEED):
            model = transformers.DepthAnythingForDepthEstimation(config)
        weights_id = f"{name}:random:{TINY_SEED}"
    else:
        source = str(pretrained) if not isinstance(pretrained, bool) else repo
        offline = hf_offline()
        try:
            model = transformers.AutoModelForDepthEstimation.from_pretrained(source, local_files_only=offline)
        except OSError as exc:
            raise WeightsUnavailableError(
                f"cannot load depth model {name} from {source} ({' '.join(str(exc).split())[:160]}); "
                "go online once, set HF_HOME to a cache holding it, or pass a local folder"
            ) from exc
        weights_id = f"{name}:{source}"
    side = min_side if min_side is not None else (56 if repo is None else 518)
    est = DepthEstimator(model, weights_id, patch_size=14, min_side=side).eval()
    est.requires_grad_(False)
    return est.to(device) if device is not None else est
