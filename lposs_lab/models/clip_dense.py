"""Training-free CLIP dense features (docs/predictors.md §0-§3): shared trunk, SCLIP, ClearCLIP, NACLIP.

Everything is an explicit function over an open_clip ``CLIP`` vision tower's own weights (no hooks):

* :func:`clip_trunk`: ``[cls ; conv1(patches)] + pos``, ``ln_pre``, blocks 1..L-1 -> ``X`` (the input of
  the last block), optionally with intermediate block outputs; the positional embedding of a non-native
  grid follows the **(code)** scale-factor rule
  (:func:`~lposs_lab.models.posembed.resize_pos_embed_by_scale`), not MaskCLIP's size-based resize.
* :func:`split_qkv` / :func:`attend_out`: ``Q, K, V`` of the last block (biases included) per head,
  and ``O(A) = concat_h(A_h V_h) Wo + bo``.
* :func:`last_block`: the last block with a given attention matrix, residual and FFN on or off.
* :func:`clip_head`: ``L2n(LN_post(Z) Wproj)`` on the patch rows.
* :func:`sclip_attention`, :func:`clearclip_attention`, :func:`naclip_attention`, :func:`naclip_omega`.

:class:`DenseCLIP` wraps them with MaskCLIP's interface (``forward``, ``encode_text``, ``patch_size``,
``embed_dim``, ``weights_id``). ProxyCLIP and SC-CLIP live in ``proxyclip.py`` and ``scclip.py``.

Layer scale (``ls_1``/``ls_2``, identity in every ViT-B/16 CLIP) is applied to the attention and MLP
branch outputs wherever a block would apply it, residual or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino import check_images, pad_to_multiple
from .maskclip import MaskCLIP
from .posembed import resize_pos_embed_by_scale

__all__ = [
    "DenseCLIP",
    "DENSE_METHODS",
    "clip_trunk",
    "split_qkv",
    "attend_out",
    "last_block",
    "clip_head",
    "sclip_attention",
    "clearclip_attention",
    "naclip_attention",
    "naclip_omega",
]

DENSE_METHODS = ("sclip", "clearclip", "naclip")


def clip_trunk(
    visual: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    native_grid: tuple[int, int],
    keep: Sequence[int] = (),
) -> tuple[Tensor, tuple[int, int], dict[int, Tensor]]:
    """Run an open_clip ``VisionTransformer`` up to (not including) its last block.

    Args:
        visual: the vision tower (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
            ``transformer.resblocks``).
        images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``; zero-padded bottom/right to a multiple of the
            patch size (black, before normalisation), as MaskCLIP.
        mean, std: per-channel normalisation (OpenAI CLIP).
        native_grid: the grid the positional embedding was trained for (14x14 at 224).
        keep: 1-based indices ``i`` of block outputs ``B_i`` to return as well (``i < L``).

    Returns:
        ``(X, (gh, gw), {i: B_i})``: ``X = B_{L-1}`` ``[B, 1 + gh*gw, C]`` (CLS first, patches row-major)
        in the parameters' dtype, the patch grid, and the requested block outputs (same layout).
    """
    check_images(images)
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    bad = [i for i in keep if not 1 <= int(i) <= depth - 1]
    if bad:
        raise ValueError(f"block outputs {bad} out of range 1..{depth - 1} for a {depth}-block tower")
    patch = int(visual.conv1.kernel_size[0])
    x = pad_to_multiple(images.float(), patch)
    x = (x - x.new_tensor(tuple(mean)).view(1, 3, 1, 1)) / x.new_tensor(tuple(std)).view(1, 3, 1, 1)
    x = visual.conv1(x.to(visual.conv1.weight.dtype))  # [B, C, gh, gw]
    batch, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, C]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, width).expand(batch, -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = resize_pos_embed_by_scale(visual.positional_embedding, native_grid, (gh, gw), num_prefix=1)
    x = visual.ln_pre(x + pos.to(x.dtype))
    batch_first = getattr(visual.transformer, "batch_first", True)
    wanted = {int(i) for i in keep}
    out: dict[int, Tensor] = {}
    if not batch_first:
        x = x.transpose(0, 1)
    for index, block in enumerate(blocks[:-1], start=1):
        x = block(x)
        if index in wanted:
            out[index] = x if batch_first else x.transpose(0, 1)
    if not batch_first:
        x = x.transpose(0, 1)
    return x, (gh, gw), out


def split_qkv(block: nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Q = Y Wq + bq``, ``K = Y Wk + bk``, ``V = Y Wv + bv`` of a block's ``nn.MultiheadAttention``.

    Args:
        block: an open_clip ``ResidualAttentionBlock``.
        y: ``[B, T, C]`` (already ``ln_1``-normalised).

    Returns:
        ``Q, K, V`` each ``[B, H, T, d]`` (head ``h`` = channels ``d*h .. d*h + d - 1``).
    """
    attn = block.attn
    b, t, c = y.shape
    heads = int(attn.num_heads)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # [B, T, 3C]
    qkv = qkv.reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attend_out(block: nn.Module, attention: Tensor, v: Tensor) -> Tensor:
    """``O(A) = concat_h(A_h V_h) Wo + bo``.

    Args:
        block: the block whose ``attn.out_proj`` is used.
        attention: ``[B, H, T, S]`` or ``[B, 1, T, S]`` (shared by the heads), any float dtype.
        v: ``[B, H, S, d]``.

    Returns:
        ``[B, T, H*d]`` in ``v``'s dtype.
    """
    o = torch.matmul(attention.to(v.dtype), v)  # [B, H, T, d]
    b, h, t, d = o.shape
    return block.attn.out_proj(o.transpose(1, 2).reshape(b, t, h * d))


def _scale(q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _self_softmax(x: Tensor, bias: Tensor | None = None) -> Tensor:
    """``softmax(s * x x^T [+ bias])`` over the key axis, in float32: ``[B, H, T, d] -> [B, H, T, T]``."""
    xf = x.float()
    logits = torch.matmul(xf, xf.transpose(-1, -2)) * _scale(x)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def sclip_attention(q: Tensor, k: Tensor) -> Tensor:
    """SCLIP: ``softmax(s Q Q^T) + softmax(s K K^T)`` (rows sum to 2): ``[B, H, T, d] -> [B, H, T, T]``."""
    return _self_softmax(q) + _self_softmax(k)


def clearclip_attention(q: Tensor) -> Tensor:
    """ClearCLIP: ``softmax(s Q Q^T)``: ``[B, H, T, d] -> [B, H, T, T]`` float32."""
    return _self_softmax(q)


def naclip_omega(
    grid: tuple[int, int], sigma: float = 5.0, *, device: torch.device | None = None
) -> Tensor:
    """NACLIP's Gaussian neighbourhood ``Ω`` ``[1 + gh*gw, 1 + gh*gw]`` float32, CLS row/column 0.

    ``Ω_ij = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2))`` for patches at grid row/column
    ``(r, c)`` (row-major, rows first), unit patch diagonal.
    """
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1 or not sigma > 0:
        raise ValueError(f"need a positive grid and sigma, got grid={grid}, sigma={sigma}")
    idx = torch.arange(gh * gw, device=device)
    r, c = (idx // gw).float(), (idx % gw).float()
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    omega = torch.zeros(1 + gh * gw, 1 + gh * gw, device=device)
    omega[1:, 1:] = torch.exp(-d2 / (2.0 * sigma * sigma))
    return omega


def naclip_attention(k: Tensor, grid: tuple[int, int], sigma: float = 5.0) -> Tensor:
    """NACLIP: ``softmax(s K K^T + Ω)``, the same ``Ω`` for every head: ``[B, H, T, d] -> [B, H, T, T]``."""
    omega = naclip_omega(grid, sigma, device=k.device)
    if omega.shape[0] != k.shape[-2]:
        raise ValueError(f"K has {k.shape[-2]} tokens but the grid {grid} gives {omega.shape[0]}")
    return _self_softmax(k, omega)


def last_block(
    block: nn.Module, x: Tensor, attention: Tensor, v: Tensor, *, residual: bool, ffn: bool
) -> Tensor:
    """The last block with attention ``A``: ``Z = [X +] O(A)``, then ``[Z = Z + MLP(LN2(Z))]``.

    Args:
        block: the block (``attn.out_proj``, ``ls_1``, ``ls_2``, ``ln_2``, ``mlp``).
        x: ``[B, T, C]`` the block's input (residual stream).
        attention: ``[B, H or 1, T, T]``.
        v: ``[B, H, T, d]`` values of ``LN1(X)``.
        residual: add ``X`` back.
        ffn: apply the MLP branch (with its residual).

    Returns:
        ``Z`` ``[B, T, C]``.
    """
    z = block.ls_1(attend_out(block, attention, v))
    if residual:
        z = x + z
    if ffn:
        z = z + block.ls_2(block.mlp(block.ln_2(z)))
    return z


def clip_head(visual: nn.Module, z: Tensor, *, drop_cls: bool = True) -> Tensor:
    """``F = L2n(LN_post(Z) Wproj)``: ``[B, T, C] -> [B, T - 1 (or T), E]`` float32."""
    z = visual.ln_post(z)
    if drop_cls:
        z = z[:, 1:]
    return F.normalize((z @ visual.proj).float(), dim=-1)


class DenseCLIP(MaskCLIP):
    """SCLIP / ClearCLIP / NACLIP dense features and CLIP text embeddings from an open_clip ``CLIP``.

    Args:
        model: an open_clip ``CLIP`` (ViT vision tower, ``nn.MultiheadAttention`` blocks); the methods'
            published numbers use ``ViT-B-16-quickgelu`` / ``openai``.
        weights_id: names the exact weights.
        method: ``"sclip"`` (``softmax(sQQ^T) + softmax(sKK^T)``, residual and FFN kept), ``"clearclip"``
            (``softmax(sQQ^T)``, no residual, no FFN) or ``"naclip"`` (``softmax(sKK^T + Ω)``, σ = 5, no
            residual, no FFN).
        naclip_sigma: σ of NACLIP's Gaussian (patch units).
        **kwargs: as :class:`~lposs_lab.models.maskclip.MaskCLIP` (tokenizer name, text batch, mean/std).
    """

    def __init__(
        self, model: nn.Module, weights_id: str, *, method: str, naclip_sigma: float = 5.0, **kwargs: object
    ) -> None:
        super().__init__(model, weights_id, **kwargs)  # type: ignore[arg-type]
        if method not in DENSE_METHODS:
            raise ValueError(f"unknown dense CLIP method {method!r}; valid: {', '.join(DENSE_METHODS)}")
        if not naclip_sigma > 0:
            raise ValueError(f"naclip_sigma must be > 0, got {naclip_sigma}")
        self.method = method
        self.naclip_sigma = float(naclip_sigma)

    def forward(self, images: Tensor) -> Tensor:
        """Dense features of the method.

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.

        Returns:
            ``[B, gh, gw, E]`` float32, L2-normalised along E, ``gh = ceil(h / 16)``.
        """
        vis = self.model.visual
        x, (gh, gw), _ = clip_trunk(vis, images, self.mean, self.std, self.native_grid)
        last = vis.transformer.resblocks[-1]
        q, k, v = split_qkv(last, last.ln_1(x))
        if self.method == "sclip":
            z = last_block(last, x, sclip_attention(q, k), v, residual=True, ffn=True)
        elif self.method == "clearclip":
            z = last_block(last, x, clearclip_attention(q), v, residual=False, ffn=False)
        else:
            attention = naclip_attention(k, (gh, gw), self.naclip_sigma)
            z = last_block(last, x, attention, v, residual=False, ffn=False)
        return clip_head(vis, z).reshape(x.shape[0], gh, gw, -1)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, " + super().extra_repr()
