"""Positional-embedding resampling by scale factor, as the official CLIP-dense and DINO hub code does it.

docs/predictors.md §0 **(code)**: for a patch grid ``g_h x g_w`` other than the native ``g0_h x g0_w``, the
prefix rows are kept and the patch rows are resampled bicubically (``a = -0.75``,
``align_corners=False``) with scale factors ``((g_h + 0.1) / g0_h, (g_w + 0.1) / g0_w)`` used as the
sampling ratio: source coordinate ``(i + 0.5) * g0 / (g + 0.1) - 0.5``. This differs slightly from a
size-based resize (ratio ``g0 / g``, docs/method.md §2 / MaskCLIP) whenever ``g != g0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize_pos_embed_by_scale"]


def resize_pos_embed_by_scale(
    pos: Tensor, native: tuple[int, int], grid: tuple[int, int], num_prefix: int = 1
) -> Tensor:
    """Resample the patch rows of a positional embedding with the ``(g + 0.1) / g0`` scale-factor rule.

    Args:
        pos: ``[num_prefix + g0h*g0w, C]`` or ``[1, num_prefix + g0h*g0w, C]`` (prefix rows first).
        native: ``(g0h, g0w)``, the grid the embedding was trained for.
        grid: ``(gh, gw)``, the target patch grid (rows first).
        num_prefix: leading rows kept as they are (CLS, registers).

    Returns:
        The same layout with ``num_prefix + gh*gw`` rows, in the input dtype (computed in float32); the
        input itself when ``grid == native``.
    """
    batched = pos.ndim == 3
    flat = pos[0] if batched else pos
    if flat.ndim != 2 or flat.shape[0] != num_prefix + native[0] * native[1]:
        raise ValueError(
            f"positional embedding must have {num_prefix} + {native[0]}*{native[1]} rows, "
            f"got {tuple(pos.shape)}"
        )
    gh, gw = int(grid[0]), int(grid[1])
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if (gh, gw) == tuple(native):
        return pos
    prefix, patch = flat[:num_prefix], flat[num_prefix:]
    patch = patch.float().reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
    scale = ((gh + 0.1) / native[0], (gw + 0.1) / native[1])
    out = F.interpolate(patch, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != (gh, gw):  # floor(g0 * (g + 0.1) / g0) is g; guard against rounding
        raise RuntimeError(f"scale-factor resample gave grid {tuple(out.shape[-2:])}, expected {(gh, gw)}")
    out = out.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(flat.dtype)
    full = torch.cat([prefix, out], dim=0)
    return full[None] if batched else full
