"""Triton stencil product ``(I - alpha S_hat) X`` of the pixel graph for CUDA tensors.

At construction the ``K`` forward planes are completed with the ``K`` reverse planes (the forward
weight read at the neighbour), giving ``2K`` planes ``[2K, H*W]`` so that consecutive pixels read
consecutive weights. One program handles a tile of ``BLOCK_P`` pixels times ``BLOCK_C`` classes and
loops over the ``2K`` offsets, passed as two small int32 tensors. Triton is imported on first use,
so importing this module needs no Triton. With ``TRITON_INTERPRET=1`` set before Triton is first
imported, the same kernel runs on CPU tensors through Triton's interpreter (slow; for tests).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from .geometry import pair_slices

__all__ = ["triton_stencil_operator", "full_planes"]


def full_planes(weights: Tensor, offsets: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Forward and reverse stencil planes.

    Args:
        weights: ``[K, H, W]`` forward-edge planes (entries whose neighbour is outside are ignored).
        offsets: the ``K`` forward offsets ``(dy, dx)``.

    Returns:
        ``(planes [2K, H*W] float32, dy [2K] int32, dx [2K] int32)`` on the weights' device:
        ``planes[m, y*W + x]`` is ``S_hat`` between ``(y, x)`` and ``(y + dy[m], x + dx[m])``, 0 outside.
    """
    if weights.ndim != 3 or weights.shape[0] != len(offsets):
        raise ValueError(
            f"weights must be [K, H, W] with K = {len(offsets)} offsets, got {tuple(weights.shape)}"
        )
    k, h, w = weights.shape
    planes = torch.zeros((2 * k, h, w), dtype=torch.float32, device=weights.device)
    for n, (dy, dx) in enumerate(offsets):
        if not (dy > 0 or (dy == 0 and dx > 0)):
            raise ValueError(f"offset {(dy, dx)} is not in the forward half (dy > 0, or dy == 0 and dx > 0)")
        if dy >= h or abs(dx) >= w:
            continue
        src, dst = pair_slices(h, w, dy, dx)
        planes[n][src] = weights[n][src].float()
        planes[k + n][dst] = weights[n][src].float()
    dys = [o[0] for o in offsets] + [-o[0] for o in offsets]
    dxs = [o[1] for o in offsets] + [-o[1] for o in offsets]
    # non_blocking: the offsets are staged without waiting for the work already queued on the device
    steps = torch.tensor([dys, dxs], dtype=torch.int32).to(weights.device, non_blocking=True)
    return planes.reshape(2 * k, h * w), steps[0], steps[1]


@lru_cache(maxsize=1)
def _kernel():
    """Compile-on-first-use: the Triton JIT function (imports Triton lazily)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stencil_kernel(
        x_ptr,
        out_ptr,
        planes_ptr,
        dy_ptr,
        dx_ptr,
        alpha,
        h,
        w,
        c,
        m_count,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        hw = h * w
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask = pix < hw
        cmask = cls < c
        y = pix // w
        x = pix % w
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for m in range(0, m_count):
            dy = tl.load(dy_ptr + m)
            dx = tl.load(dx_ptr + m)
            yy = y + dy
            xx = x + dx
            valid = pmask & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            wv = tl.load(planes_ptr + m * hw + pix, mask=valid, other=0.0)
            q = yy * w + xx
            xmask = valid[:, None] & cmask[None, :]
            xv = tl.load(x_ptr + q[:, None] * c + cls[None, :], mask=xmask, other=0.0)
            acc += wv[:, None] * xv
        mask2 = pmask[:, None] & cmask[None, :]
        idx = pix[:, None] * c + cls[None, :]
        xs = tl.load(x_ptr + idx, mask=mask2, other=0.0)
        tl.store(out_ptr + idx, xs - alpha * acc, mask=mask2)

    return triton, stencil_kernel


def triton_stencil_operator(
    weights: Tensor, offsets: list[tuple[int, int]], alpha: float, *, block_p: int = 64
) -> Callable[[Tensor], Tensor]:
    """``X [H*W, C] -> (I - alpha S_hat) X`` with a Triton kernel.

    Args:
        weights: ``[K, H, W]`` normalised half-stencil planes on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``).
        offsets: the ``K`` forward offsets ``(dy, dx)``.
        alpha: propagation strength.
        block_p: pixels per program (a power of two).

    Returns:
        A function of a ``[H*W, C]`` tensor on the weights' device returning a new float32 tensor.
    """
    _, h, w = weights.shape
    planes, dys, dxs = full_planes(weights, offsets)
    triton, kernel = _kernel()

    def apply(x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[0] != h * w:
            raise ValueError(f"X must be [H*W, C] with H*W = {h * w}, got {tuple(x.shape)}")
        if x.device != planes.device:
            raise ValueError(f"X is on {x.device} but the stencil weights are on {planes.device}")
        c = x.shape[1]
        xf = x.to(torch.float32).contiguous()
        out = torch.empty_like(xf)
        if c == 0 or h * w == 0:
            return out
        block_c = min(64, max(8, triton.next_power_of_2(c)))
        grid = (triton.cdiv(h * w, block_p), triton.cdiv(c, block_c))
        kernel[grid](
            xf,
            out,
            planes,
            dys,
            dxs,
            float(alpha),
            h,
            w,
            c,
            planes.shape[0],
            BLOCK_P=block_p,
            BLOCK_C=block_c,
        )
        return out

    return apply
