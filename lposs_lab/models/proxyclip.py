"""ProxyCLIP dense features (docs/predictors.md §4): CLIP values mixed by a VFM's (DINO's) token similarities.

Per window: ``S = P̂ P̂^T`` over the VFM's final-normed output tokens ``P`` (CLS dropped, rows
L2-normalised); ``μ`` = mean of all ``M^2`` entries of ``S``; ``L = γ (S − β μ)`` (β = 1.2, γ = 3);
entries ``L < 0`` -> −∞; ``A = softmax(L)`` row-wise, shared by the heads. The CLIP values ``V`` of the
last block (bias included, CLS dropped) are resized bilinearly per head from the CLIP grid to the VFM grid;
``Z = concat_h(A Ṽ_h) Wo + bo`` (no CLS, no residual, no FFN); ``F = L2n(LN_post(Z) Wproj)`` on the VFM grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip_dense import attend_out, clip_head, clip_trunk, split_qkv
from .dino import ViTValueEncoder
from .maskclip import MaskCLIP

__all__ = ["ProxyCLIP", "proxy_attention", "shared_vfm_forward"]


def proxy_attention(tokens: Tensor, beta: float = 1.2, gamma: float = 3.0) -> Tensor:
    """ProxyCLIP's attention from VFM tokens, one matrix per window.

    Args:
        tokens: ``[B, M, D]`` VFM output tokens of each window (not necessarily normalised).
        beta, gamma: shift and scale, ``L = γ (S − β μ)``.

    Returns:
        ``[B, M, M]`` float32 row-stochastic attention. ``μ`` is the mean of the window's own ``S``.

    Degenerate rows: a row whose every ``L_ij < 0`` (all ``S_ij < β μ``; for the whole window once
    ``μ > 1/β ≈ 0.833``, e.g. near-uniform windows) would be entirely −∞; the official code has no guard
    and yields NaN there. Here such a row keeps only its diagonal entry, i.e. it becomes the identity row
    (the token keeps its own value), so no NaN ever leaves this function. Other rows are unaffected.
    """
    if tokens.ndim != 3 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B, M, D] with M >= 1, got {tuple(tokens.shape)}")
    p = F.normalize(tokens.float(), dim=-1)
    s = torch.matmul(p, p.transpose(-1, -2))  # [B, M, M]
    mu = s.mean(dim=(-2, -1), keepdim=True)  # per window
    logits = gamma * (s - beta * mu)
    keep = logits >= 0
    empty = ~keep.any(dim=-1, keepdim=True)  # [B, M, 1]
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    keep = keep | (empty & eye)
    return logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)


class ProxyCLIP(MaskCLIP):
    """ProxyCLIP dense features over an open_clip ``CLIP`` and a DINO-family VFM.

    Args:
        model: open_clip ``CLIP`` (``ViT-B-16-quickgelu`` / ``openai`` for the published numbers).
        weights_id: names the CLIP weights (the VFM's id is appended).
        vfm: the proxy model, a :class:`~lposs_lab.models.dino.ViTValueEncoder` (ImageNet normalisation,
            ``pos_embed_mode="dino"`` for DINO's own interpolation at non-native grids);
            :meth:`ViTValueEncoder.values_and_tokens` gives its final-normed tokens.
        beta, gamma: ``L = γ (S − β μ)``; 1.2 and 3.0 on every dataset.
        **kwargs: as :class:`~lposs_lab.models.maskclip.MaskCLIP`.

    Attributes:
        patch_size: the **VFM's** patch size (the output grid is the VFM grid).
    """

    def __init__(
        self,
        model: nn.Module,
        weights_id: str,
        *,
        vfm: ViTValueEncoder,
        beta: float = 1.2,
        gamma: float = 3.0,
        **kwargs: object,
    ) -> None:
        super().__init__(model, f"{weights_id}+vfm={vfm.weights_id}", **kwargs)  # type: ignore[arg-type]
        if not isinstance(vfm, ViTValueEncoder):
            raise TypeError(f"ProxyCLIP needs a ViTValueEncoder VFM, got {type(vfm).__name__}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.vfm = vfm
        self.clip_patch_size = self.patch_size
        self.patch_size = vfm.patch_size
        self.beta = float(beta)
        self.gamma = float(gamma)

    def forward(self, images: Tensor, vfm_tokens: Tensor | None = None) -> Tensor:
        """ProxyCLIP features on the VFM grid.

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.
            vfm_tokens: optional ``[B, mh, mw, D]`` VFM final-normed tokens of these windows (from
                :meth:`ViTValueEncoder.values_and_tokens`); computed with :attr:`vfm` when omitted.

        Returns:
            ``[B, mh, mw, E]`` float32, L2-normalised; ``mh = ceil(h / P_vfm)``.
        """
        vis = self.model.visual
        x, (gh, gw), _ = clip_trunk(vis, images, self.mean, self.std, self.native_grid)
        if vfm_tokens is None:
            _, vfm_tokens = self.vfm.values_and_tokens(images)
        if vfm_tokens.ndim != 4 or vfm_tokens.shape[0] != x.shape[0]:
            raise ValueError(
                f"vfm_tokens must be [B={x.shape[0]}, mh, mw, D], got {tuple(vfm_tokens.shape)}"
            )
        batch, mh, mw, _ = vfm_tokens.shape
        last = vis.transformer.resblocks[-1]
        _, _, v = split_qkv(last, last.ln_1(x))  # [B, H, T, d]
        heads, d = v.shape[1], v.shape[-1]
        v = v[:, :, 1:].transpose(-1, -2).reshape(batch, heads * d, gh, gw)
        if (mh, mw) != (gh, gw):
            v = F.interpolate(v.float(), size=(mh, mw), mode="bilinear", align_corners=False).to(x.dtype)
        v = v.reshape(batch, heads, d, mh * mw).transpose(-1, -2)  # [B, H, M, d]
        attention = proxy_attention(vfm_tokens.reshape(batch, mh * mw, -1), self.beta, self.gamma)
        z = last.ls_1(attend_out(last, attention[:, None], v))  # [B, M, C]
        return clip_head(vis, z, drop_cls=False).reshape(batch, mh, mw, -1)

    def shares_vfm_with(self, vm: nn.Module, grid: tuple[int, int] | None = None) -> bool:
        """Whether ``vm``'s own pass can stand in for the VFM's: same weights (``weights_id``), same model
        type, and the same positional-embedding rule at ``grid`` (any rule at the native grid)."""
        if not isinstance(vm, ViTValueEncoder) or vm.weights_id != self.vfm.weights_id:
            return False
        if vm.patch_size != self.vfm.patch_size:
            return False
        same_rule = vm.pos_embed_mode == self.vfm.pos_embed_mode
        return same_rule or (grid is not None and tuple(grid) == tuple(self.vfm.native_grid))

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, " + super().extra_repr()


def shared_vfm_forward(vlm: nn.Module, vm: nn.Module, images: Tensor) -> tuple[Tensor, Tensor] | None:
    """VM and ProxyCLIP features of a window batch with one DINO pass, when ``vm`` is ProxyCLIP's VFM.

    Args:
        vlm: any VLM; only a :class:`ProxyCLIP` whose VFM has ``vm``'s weights (see
            :meth:`ProxyCLIP.shares_vfm_with`) is handled.
        vm: the LPOSS graph encoder.
        images: ``[B, 3, h, w]`` windows in ``[0, 1]``.

    Returns:
        ``(vm_features [B, gh, gw, D], vlm_features [B, mh, mw, E])``, or ``None`` when the pass cannot
        be shared (the caller then runs both models as usual).
    """
    if not isinstance(vlm, ProxyCLIP) or not isinstance(vm, ViTValueEncoder):
        return None
    p = vm.patch_size
    grid = (-(-images.shape[-2] // p), -(-images.shape[-1] // p))
    if not vlm.shares_vfm_with(vm, grid):
        return None
    values, tokens = vm.values_and_tokens(images)
    return values, vlm(images, vfm_tokens=tokens)
