"""Value features of the last self-attention block of a timm Vision Transformer (DINO, DINOv2).

docs/method.md §2, VM: ImageNet mean/std normalisation, run the ViT, take the ``v`` third of the last block's
qkv projection (all heads concatenated, bias included) for the patch tokens, L2-normalise.

The whole path is written out over the model's own weights (patch embedding, position embedding,
prefix tokens, blocks), so that any input size works: the image is zero-padded at the bottom/right to
a multiple of the patch size (black, i.e. 0 **before** normalisation) and the position embedding is
resampled bicubically to the patch grid with timm's :func:`timm.layers.resample_abs_pos_embed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from .posembed import resize_pos_embed_by_scale

__all__ = ["ViTValueEncoder", "pad_to_multiple", "check_images"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating ``[B, 3, h, w]`` batch with ``h, w >= 1``."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [B, 3, h, w], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have shape [B, 3, h, w] with h, w >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad ``[B, C, h, w]`` at the bottom/right so that both sides are multiples of ``multiple``.

    Args:
        images: ``[B, C, h, w]`` float tensor.
        multiple: the patch size.

    Returns:
        ``[B, C, ceil(h/m)*m, ceil(w/m)*m]``; the input itself when no padding is needed.
    """
    pad_h = (-images.shape[-2]) % multiple
    pad_w = (-images.shape[-1]) % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="constant", value=0.0)


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


class ViTValueEncoder(nn.Module):
    """Last-block value features of a timm ``VisionTransformer`` on its patch grid.

    Args:
        model: a timm ``VisionTransformer`` (standard ``Attention`` blocks with a fused ``qkv`` linear).
        weights_id: a string naming the exact weights (used as a cache key by callers).
        mean: per-channel normalisation mean; default the model's ``pretrained_cfg`` (ImageNet).
        std: per-channel normalisation std; default the model's ``pretrained_cfg`` (ImageNet).
        pos_embed_antialias: passed to ``resample_abs_pos_embed`` (timm's dynamic-size default: True;
            only matters when the grid is smaller than the model's native one, e.g. DINOv2 at 224).
        pos_embed_mode: ``"timm"`` (default: timm's size-based resample) or ``"dino"`` (DINO's hub code:
            bicubic with scale factor ``(g + 0.1) / g0``, docs/predictors.md §4, used by ProxyCLIP's VFM).
            Both leave the native grid (224 windows for patch 16) untouched.

    Attributes:
        patch_size: the (square) patch size P.
        embed_dim: D, the width of the value features (all heads concatenated).
        weights_id: as given.
    """

    def __init__(
        self,
        model: nn.Module,
        weights_id: str,
        *,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pos_embed_antialias: bool = True,
        pos_embed_mode: str = "timm",
    ) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "pos_embed", "num_prefix_tokens"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"ViTValueEncoder needs a timm VisionTransformer; {type(model).__name__} has no {attr}"
                )
        last_attn = model.blocks[-1].attn
        if getattr(last_attn, "qkv", None) is None or not isinstance(last_attn.qkv, nn.Linear):
            raise TypeError(
                "ViTValueEncoder needs a fused qkv nn.Linear in the last block, "
                f"not {type(last_attn).__name__}"
            )
        ph, pw = _pair(model.patch_embed.patch_size)
        if ph != pw:
            raise ValueError(f"ViTValueEncoder needs square patches, got {ph}x{pw}")
        self.model = model
        self.weights_id = str(weights_id)
        self.patch_size: int = ph
        self.embed_dim: int = last_attn.qkv.out_features // 3
        self.native_grid: tuple[int, int] = _pair(model.patch_embed.grid_size)
        self.pos_embed_antialias = bool(pos_embed_antialias)
        if pos_embed_mode not in ("timm", "dino"):
            raise ValueError(f"pos_embed_mode must be 'timm' or 'dino', got {pos_embed_mode!r}")
        self.pos_embed_mode = pos_embed_mode
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = tuple(mean if mean is not None else cfg.get("mean", _IMAGENET_MEAN))
        std = tuple(std if std is not None else cfg.get("std", _IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got mean={mean}, std={std}")
        self.mean: tuple[float, ...] = tuple(float(m) for m in mean)  # python floats: immune to .to(dtype)
        self.std: tuple[float, ...] = tuple(float(s) for s in std)

    def _param_dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def _embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Patch tokens + prefix tokens + position embedding: ``[B, 3, H, W] -> [B, n_prefix + gh*gw, C]``."""
        m = self.model
        tokens = m.patch_embed.proj(x)  # [B, C, gh, gw]
        gh, gw = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, gh*gw, C]
        tokens = m.patch_embed.norm(tokens)
        batch = tokens.shape[0]
        prefix = []
        if getattr(m, "cls_token", None) is not None:
            prefix.append(m.cls_token.expand(batch, -1, -1))
        if getattr(m, "reg_token", None) is not None:
            prefix.append(m.reg_token.expand(batch, -1, -1))
        no_embed_class = bool(getattr(m, "no_embed_class", False))
        if m.pos_embed is None:
            return torch.cat([*prefix, tokens], dim=1), gh, gw
        pos = m.pos_embed
        if (gh, gw) != self.native_grid and self.pos_embed_mode == "dino":
            pos = resize_pos_embed_by_scale(
                pos, self.native_grid, (gh, gw), num_prefix=0 if no_embed_class else m.num_prefix_tokens
            )
        elif (gh, gw) != self.native_grid:
            pos = resample_abs_pos_embed(
                pos,
                new_size=[gh, gw],
                old_size=list(self.native_grid),
                num_prefix_tokens=0 if no_embed_class else m.num_prefix_tokens,
                interpolation="bicubic",
                antialias=self.pos_embed_antialias,
            )
        pos = pos.to(tokens.dtype)
        if no_embed_class:
            tokens = torch.cat([*prefix, tokens + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, tokens], dim=1) + pos
        return tokens, gh, gw

    def _to_last_block(self, images: Tensor) -> tuple[Tensor, int, int]:
        """Embed, run all but the last block: ``[B, 3, h, w] -> ([B, n_prefix + gh*gw, C], gh, gw)``."""
        check_images(images)
        m = self.model
        x = pad_to_multiple(images.float(), self.patch_size)
        x = (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        x = x.to(self._param_dtype())
        x, gh, gw = self._embed(x)
        x = m.patch_drop(x) if hasattr(m, "patch_drop") else x
        x = m.norm_pre(x) if hasattr(m, "norm_pre") else x
        for block in m.blocks[:-1]:
            x = block(x)
        return x, gh, gw

    def _values(self, x: Tensor, gh: int, gw: int) -> Tensor:
        """L2-normalised ``v`` third of the last block's qkv, patch tokens: ``[B, gh, gw, D]`` float32."""
        last = self.model.blocks[-1]
        y = last.norm1(x)
        qkv = last.attn.qkv
        dim = self.embed_dim
        bias = None if qkv.bias is None else qkv.bias[2 * dim : 3 * dim]
        v = F.linear(y, qkv.weight[2 * dim : 3 * dim], bias)  # [B, n_prefix + gh*gw, D]
        v = v[:, self.model.num_prefix_tokens :].float()
        v = v.reshape(v.shape[0], gh, gw, dim)
        return F.normalize(v, dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """Value features of the last block for every patch.

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.

        Returns:
            ``[B, gh, gw, D]`` float32, L2-normalised along D; ``gh = ceil(h / P)``, ``gw = ceil(w / P)``.
        """
        x, gh, gw = self._to_last_block(images)
        return self._values(x, gh, gw)

    def values_and_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The value features of :meth:`forward` and the final-normed output tokens, from one pass.

        The blocks run once; the last block's input gives the values (its ``v`` projection is applied
        once more beside the block itself, ~1% of the cost), the last block's output after the model's
        final norm (``model.norm``, DINO: LayerNorm eps 1e-6) gives the tokens (ProxyCLIP's proxy, §4).

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.

        Returns:
            ``(values, tokens)``: ``values`` ``[B, gh, gw, D]`` float32 L2-normalised (== ``forward``);
            ``tokens`` ``[B, gh, gw, D]`` float32, prefix tokens dropped, **not** L2-normalised.
        """
        x, gh, gw = self._to_last_block(images)
        values = self._values(x, gh, gw)
        m = self.model
        out = m.blocks[-1](x)
        out = m.norm(out) if hasattr(m, "norm") else out
        tokens = out[:, m.num_prefix_tokens :].float().reshape(out.shape[0], gh, gw, -1)
        return values, tokens

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, embed_dim={self.embed_dim}, weights_id={self.weights_id!r}"
