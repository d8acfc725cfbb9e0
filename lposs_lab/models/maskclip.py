"""MaskCLIP dense features and text embeddings on an open_clip ``CLIP`` model.

docs/method.md §2, VLM: OpenAI CLIP mean/std; positional embedding's patch part resized bicubically
(``align_corners=False``) to the patch grid (CLS position kept); all blocks but the last; then the last
block's value path only: ``y = ln_1(x)``, ``v = out_proj(V_proj(y))``, ``v = v + x``,
``v = v + mlp(ln_2(v))``; ``ln_post``, drop CLS, ``@ proj``, L2-normalise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino import check_images, pad_to_multiple

__all__ = ["MaskCLIP", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "resize_clip_pos_embed"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(name: str) -> object:
    if name not in _TOKENIZERS:
        import open_clip

        _TOKENIZERS[name] = open_clip.get_tokenizer(name)
    return _TOKENIZERS[name]


def resize_clip_pos_embed(pos: Tensor, native: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Resize a CLIP positional embedding ``[1 + gh0*gw0, C]`` to ``[1 + gh*gw, C]``.

    The CLS row is kept; the patch rows are resized bicubically with ``align_corners=False`` (computed
    in float32, returned in the input dtype).
    """
    if pos.ndim != 2 or pos.shape[0] != 1 + native[0] * native[1]:
        raise ValueError(
            f"positional embedding must be [1 + {native[0]}*{native[1]}, C], got {tuple(pos.shape)}"
        )
    if tuple(grid) == tuple(native):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.float().reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


class MaskCLIP(nn.Module):
    """Dense MaskCLIP patch features and CLIP text embeddings from an open_clip ``CLIP``.

    Args:
        model: an open_clip ``CLIP`` whose vision tower is a ``VisionTransformer`` with default
            (``nn.MultiheadAttention``) residual blocks.
        weights_id: a string naming the exact weights (cache key for text embeddings etc.).
        tokenizer_name: open_clip model name whose tokenizer is used (``ViT-B-16``: OpenAI BPE).
        text_batch_size: how many prompts ``encode_text`` runs at once (bounds memory).

    Attributes:
        patch_size: the vision tower's patch size (16).
        embed_dim: the joint embedding width (512 for ViT-B-16).
        weights_id: as given.
    """

    def __init__(
        self,
        model: nn.Module,
        weights_id: str,
        *,
        tokenizer_name: str = "ViT-B-16",
        text_batch_size: int = 256,
        mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        std: tuple[float, float, float] = OPENAI_CLIP_STD,
    ) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        for attr in (
            "conv1",
            "class_embedding",
            "positional_embedding",
            "ln_pre",
            "transformer",
            "ln_post",
            "proj",
        ):
            if visual is None or not hasattr(visual, attr):
                raise TypeError(
                    f"MaskCLIP needs an open_clip CLIP with a ViT vision tower; missing visual.{attr}"
                )
        if visual.proj is None:
            raise TypeError("MaskCLIP needs the vision tower's output projection (visual.proj is None)")
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise TypeError(
                f"MaskCLIP supports open_clip blocks with nn.MultiheadAttention, got {type(last).__name__}"
            )
        if text_batch_size < 1:
            raise ValueError(f"text_batch_size must be >= 1, got {text_batch_size}")
        ph, pw = (visual.conv1.kernel_size[0], visual.conv1.kernel_size[1])
        if ph != pw or tuple(visual.conv1.stride) != (ph, pw):
            raise ValueError(f"MaskCLIP needs square non-overlapping patches, got kernel {ph}x{pw}")
        self.model = model
        self.weights_id = str(weights_id)
        self.patch_size: int = int(ph)
        self.embed_dim: int = int(visual.proj.shape[1])
        self.native_grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.tokenizer_name = tokenizer_name
        self.text_batch_size = int(text_batch_size)
        self.mean: tuple[float, ...] = tuple(float(m) for m in mean)  # python floats: immune to .to(dtype)
        self.std: tuple[float, ...] = tuple(float(s) for s in std)

    def _param_dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def _device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    def forward(self, images: Tensor) -> Tensor:
        """Dense MaskCLIP features.

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.

        Returns:
            ``[B, gh, gw, E]`` float32, L2-normalised along E (E = ``embed_dim``), ``gh = ceil(h / P)``.
        """
        check_images(images)
        vis = self.model.visual
        x = pad_to_multiple(images.float(), self.patch_size)
        x = (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        x = vis.conv1(x.to(self._param_dtype()))  # [B, C, gh, gw]
        batch, width, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, C]
        cls = vis.class_embedding.to(x.dtype).view(1, 1, width).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = resize_clip_pos_embed(vis.positional_embedding, self.native_grid, (gh, gw))
        x = vis.ln_pre(x + pos.to(x.dtype))

        transformer = vis.transformer
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)  # NLD -> LND
        for block in transformer.resblocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)  # LND -> NLD

        last = transformer.resblocks[-1]
        attn = last.attn
        y = last.ln_1(x)
        dim = attn.embed_dim
        v_bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * dim : 3 * dim]
        v = F.linear(y, attn.in_proj_weight[2 * dim : 3 * dim], v_bias)
        v = attn.out_proj(v)
        v = x + last.ls_1(v)
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
        v = vis.ln_post(v)
        v = v[:, 1:] @ vis.proj
        v = v.float().reshape(batch, gh, gw, -1)
        return F.normalize(v, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """CLIP text embeddings of ``texts``.

        Args:
            texts: T strings (tokenised with open_clip's tokenizer, truncated to the context length).

        Returns:
            ``[T, E]`` float32, L2-normalised, on the model's device.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("encode_text needs a list of strings")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self._device())
        tokenizer = _tokenizer(self.tokenizer_name)
        context_length = int(getattr(self.model, "context_length", 77))
        out = []
        for start in range(0, len(texts), self.text_batch_size):
            chunk = texts[start : start + self.text_batch_size]
            tokens = tokenizer(chunk, context_length=context_length).to(self._device())
            feats = self.model.encode_text(tokens)
            out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out, dim=0)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, embed_dim={self.embed_dim}, weights_id={self.weights_id!r}"
