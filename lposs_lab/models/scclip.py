"""SC-CLIP dense features (docs/predictors.md §5), every statistic computed per window.

``B_i`` is the output of block ``i`` (1-based, residual stream, CLS first). Per window:

1. anomalous tokens of ``P = B_{L-1}`` patch rows by the **(code)** LOF rule (squared Euclidean
   distances, 30 nearest other tokens, reach = the point's own k-distance, so
   ``LOF_i = mean_{j in kNN(i)} κ_i / κ_j``), flagged where ``LOF > q_0.95(LOF)`` (linear, strict);
2. fill: each anomalous position takes the mean of its in-image non-anomalous 8-neighbours (read from
   the unmodified map; kept when it has none), applied to ``P`` and at the same positions to ``B_9``;
3. ``C9 = cos(P̃_9)``, ``C4 = cos(B_4)``; mixing ``M(C) = C ⊙ [C >= 0.4]``, rows / (sum + 1e-6);
4. prior ``A_mid = softmax(3 (C9 − mean C9))`` with entries ``< 0`` -> −∞ (the diagonal always kept);
5. main branch ``Z1 = M_post (O(½(A_mid + softmax(s K K^T))) + 0.3 c11)`` on ``M_pre P̃``;
6. multi-level branch ``Z2`` on ``R = B_4 + ... + B_10`` alike;
7. ``F = L2n(LN_post(Z1 + Z2) Wproj)``.

Positions come from the real 2-D grid (the official code assumes square grids there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip_dense import attend_out, clip_head, clip_trunk, split_qkv
from .maskclip import MaskCLIP

__all__ = ["SCCLIP", "lof_scores", "lof_anomalies", "fill_anomalies", "mixing_matrix", "attention_prior"]

_KAPPA_FLOOR = 1e-12  # k-distances below this (31+ coinciding tokens) are clamped: no division by zero


def lof_scores(tokens: Tensor, k: int = 30) -> Tensor:
    """The (code) LOF score of each token of each window.

    Args:
        tokens: ``[B, N, C]`` patch tokens per window.
        k: neighbours (30); clamped to ``N - 1``.

    Returns:
        ``[B, N]`` float32 ``LOF_i = κ_i · mean_{j in kNN(i)} 1/κ_j`` with ``d_ij = ||P_i − P_j||²`` and
        ``κ_i`` the k-th smallest ``d_ij`` over ``j != i`` (clamped at 1e-12); ones when ``N < 2``.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, N, C], got {tuple(tokens.shape)}")
    b, n, _ = tokens.shape
    if n < 2:
        return torch.ones(b, n, device=tokens.device)
    x = tokens.float()
    d2 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # [B, N, N]
    d2.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # other tokens only
    kk = min(int(k), n - 1)
    dist, index = d2.topk(kk, dim=-1, largest=False)  # ascending
    kappa = dist[..., -1].clamp_min(_KAPPA_FLOOR)  # [B, N]
    inv = (1.0 / kappa)[:, None, :].expand(b, n, n).gather(-1, index)  # 1/κ_j for j in kNN(i)
    return kappa * inv.mean(dim=-1)


def lof_anomalies(scores: Tensor, contamination: float = 0.05) -> Tensor:
    """``[B, N]`` bool: ``score > quantile_{1 - contamination}(score)`` per window (linear, strict)."""
    if scores.shape[-1] < 2:
        return torch.zeros_like(scores, dtype=torch.bool)
    q = torch.quantile(scores, 1.0 - contamination, dim=-1, keepdim=True)
    return scores > q


def fill_anomalies(grid: Tensor, anomalous: Tensor) -> Tensor:
    """Replace anomalous positions by the mean of their in-image, non-anomalous 8-neighbours.

    Args:
        grid: ``[B, gh, gw, C]`` token map (read unmodified).
        anomalous: ``[B, gh, gw]`` bool.

    Returns:
        ``[B, gh, gw, C]``; positions without such a neighbour and normal positions are unchanged.
    """
    if anomalous.shape != grid.shape[:3]:
        raise ValueError(f"anomalous {tuple(anomalous.shape)} does not match grid {tuple(grid.shape)}")
    b, gh, gw, c = grid.shape
    ok = (~anomalous).to(grid.dtype)[..., None]
    vals = F.pad((grid * ok).permute(0, 3, 1, 2), (1, 1, 1, 1))  # [B, C, gh+2, gw+2], zero outside
    cnt = F.pad(ok.permute(0, 3, 1, 2), (1, 1, 1, 1))
    total = torch.zeros_like(vals[:, :, 1:-1, 1:-1])
    count = torch.zeros_like(cnt[:, :, 1:-1, 1:-1])
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            total = total + vals[:, :, dy : dy + gh, dx : dx + gw]
            count = count + cnt[:, :, dy : dy + gh, dx : dx + gw]
    mean = (total / count.clamp_min(1)).permute(0, 2, 3, 1)
    replace = anomalous & (count[:, 0] > 0)
    return torch.where(replace[..., None], mean, grid)


def _cosine(x: Tensor) -> Tensor:
    """``[B, N, C] -> [B, N, N]`` float32 cosine similarities."""
    xn = F.normalize(x.float(), dim=-1)
    return torch.matmul(xn, xn.transpose(-1, -2))


def mixing_matrix(cos: Tensor, threshold: float = 0.4) -> Tensor:
    """``M(C) = C ⊙ [C >= threshold]``, each row divided by (its sum + 1e-6): ``[B, N, N]``."""
    m = cos * (cos >= threshold).to(cos.dtype)
    return m / (m.sum(dim=-1, keepdim=True) + 1e-6)


def attention_prior(cos: Tensor, temperature: float = 3.0) -> Tensor:
    """``softmax(L)``, ``L = t (C − mean C)`` per window, ``L < 0`` -> −∞, diagonal kept: ``[B, N, N]``."""
    logits = temperature * (cos - cos.mean(dim=(-2, -1), keepdim=True))
    eye = torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device)
    return logits.masked_fill((logits < 0) & ~eye, float("-inf")).softmax(dim=-1)


class SCCLIP(MaskCLIP):
    """SC-CLIP dense features over an open_clip ``CLIP`` (constants of ViT-B/16 by default).

    Args:
        model: open_clip ``CLIP`` with at least ``max(levels, pre_layer) + 2`` blocks (12 for B/16).
        weights_id: names the weights.
        pre_layer: block whose (filled) output gives ``C9`` and ``M_pre`` (9).
        post_layer: block whose output gives ``M_post`` (4).
        levels: blocks summed into the multi-level branch (4..10).
        cls_weight: weight of the CLS row added before ``M_post`` (0.3).
        mix_threshold: similarity threshold of the mixing matrices (0.4).
        prior_temperature: temperature of ``A_mid`` (3.0).
        lof_k: LOF neighbours (30).
        contamination: fraction flagged by the quantile rule (0.05).
        **kwargs: as :class:`~lposs_lab.models.maskclip.MaskCLIP`.
    """

    def __init__(
        self,
        model: nn.Module,
        weights_id: str,
        *,
        pre_layer: int = 9,
        post_layer: int = 4,
        levels: Sequence[int] = (4, 5, 6, 7, 8, 9, 10),
        cls_weight: float = 0.3,
        mix_threshold: float = 0.4,
        prior_temperature: float = 3.0,
        lof_k: int = 30,
        contamination: float = 0.05,
        **kwargs: object,
    ) -> None:
        super().__init__(model, weights_id, **kwargs)  # type: ignore[arg-type]
        depth = len(model.visual.transformer.resblocks)
        self.levels = tuple(int(i) for i in levels)
        used = (int(pre_layer), int(post_layer), *self.levels)
        if not self.levels or min(used) < 1 or max(used) > depth - 1:
            raise ValueError(f"SC-CLIP layers {used} must lie in 1..{depth - 1} for a {depth}-block tower")
        if lof_k < 1 or not 0 < contamination < 1:
            raise ValueError(f"need lof_k >= 1 and 0 < contamination < 1, got {lof_k}, {contamination}")
        self.pre_layer, self.post_layer = int(pre_layer), int(post_layer)
        self.cls_weight = float(cls_weight)
        self.mix_threshold = float(mix_threshold)
        self.prior_temperature = float(prior_temperature)
        self.lof_k = int(lof_k)
        self.contamination = float(contamination)

    def anomalies(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, N, C]`` patch tokens of ``B_{L-1}`` -> ``[B, gh, gw]`` bool anomalous positions."""
        flags = lof_anomalies(lof_scores(tokens, self.lof_k), self.contamination)
        return flags.reshape(tokens.shape[0], *grid)

    def _branch(self, block: nn.Module, rows: Tensor, prior: Tensor, cls: Tensor, m_post: Tensor) -> Tensor:
        """``M_post (O(½(A_mid + softmax(s K K^T))) + w cls)`` on ``rows`` ``[B, N, C]`` -> ``[B, N, C]``."""
        _, k, v = split_qkv(block, block.ln_1(rows))
        kf = k.float()
        self_attn = (torch.matmul(kf, kf.transpose(-1, -2)) * k.shape[-1] ** -0.5).softmax(dim=-1)
        attention = 0.5 * (prior[:, None] + self_attn)
        out = block.ls_1(attend_out(block, attention, v)) + self.cls_weight * cls[:, None, :]
        return torch.matmul(m_post.to(out.dtype), out)

    def forward(self, images: Tensor) -> Tensor:
        """SC-CLIP features.

        Args:
            images: ``[B, 3, h, w]`` float RGB in ``[0, 1]``.

        Returns:
            ``[B, gh, gw, E]`` float32, L2-normalised, ``gh = ceil(h / 16)``.
        """
        vis = self.model.visual
        keep = {self.pre_layer, self.post_layer, *self.levels}
        x, (gh, gw), outs = clip_trunk(vis, images, self.mean, self.std, self.native_grid, keep=sorted(keep))
        batch, _, width = x.shape
        p = x[:, 1:]
        anomalous = self.anomalies(p, (gh, gw))
        p_fill = fill_anomalies(p.reshape(batch, gh, gw, width), anomalous).reshape(batch, gh * gw, width)
        p9 = outs[self.pre_layer][:, 1:].reshape(batch, gh, gw, width)
        p9_fill = fill_anomalies(p9, anomalous).reshape(batch, gh * gw, width)
        c9 = _cosine(p9_fill)
        m_pre = mixing_matrix(c9, self.mix_threshold)
        m_post = mixing_matrix(_cosine(outs[self.post_layer][:, 1:]), self.mix_threshold)
        prior = attention_prior(c9, self.prior_temperature)
        last = vis.transformer.resblocks[-1]
        x_hat = torch.matmul(m_pre.to(p_fill.dtype), p_fill)
        z1 = self._branch(last, x_hat, prior, x[:, 0], m_post)
        multi = torch.stack([outs[i] for i in self.levels]).sum(dim=0)
        z2 = self._branch(last, multi[:, 1:], prior, multi[:, 0], m_post)
        return clip_head(vis, z1 + z2, drop_cls=False).reshape(batch, gh, gw, -1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, pre={self.pre_layer}, post={self.post_layer}, " + super().extra_repr()
