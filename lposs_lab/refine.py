"""Refine any segmenter's class scores with the LPOSS+ pixel stage (and optionally the patch stage).

:func:`refine` takes an image and class scores from any source (another open-vocabulary segmenter, a
closed-set network, LPOSS itself) and runs exactly the computation the :class:`lposs_lab.LPOSS`
predictor runs after its patch stage:

1. the image is decoded and resized as docs/method.md §1 (short side 448, long side <= 2048, OpenCV bilinear
   on uint8, then ``/ 255``);
2. the scores are resized bilinearly (``align_corners=False``) to that resized image, as the
   stitched patch scores are before the pixel stage (docs/method.md §3-4);
3. the pixel stage (docs/method.md §4) through :func:`lposs_lab.pixels.pixel_stage`, the call the predictor
   makes, so the two are the same computation;
4. bilinear resize to the input image's size and argmax (docs/method.md §5,
   :func:`lposs_lab.windows.resize_argmax`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from .pixels import pixel_stage
from .predictor import LPOSS, resolve_device
from .propagation import propagate_patches
from .score_files import PatchGrids, read_score_file
from .windows import (
    crop_windows,
    patch_positions,
    resize_argmax,
    resized_image_tensor,
    stitch_windows,
)

__all__ = ["Refinement", "refine", "resized_image_tensor"]

_PX = PixelConfig()
_WIN = WindowConfig()


@dataclass(frozen=True)
class Refinement:
    """Result of :func:`refine`.

    Attributes:
        labels: ``[H, W]`` int64 argmax labels at the input image's size.
        low_res_scores: ``[C, h, w]`` float32 refined scores at the resized image's size (docs/method.md §1).
        image_size: ``(H, W)`` of the input image.
    """

    labels: Tensor
    low_res_scores: Tensor
    image_size: tuple[int, int]

    @property
    def scores(self) -> Tensor:
        """``[C, H, W]`` refined scores at the input image's size (bilinear, ``align_corners=False``).

        Computed on access (``C x H x W`` floats); :attr:`labels` was computed from the same resize,
        class chunk by class chunk.
        """
        h, w = self.image_size
        if tuple(self.low_res_scores.shape[1:]) == (h, w):
            return self.low_res_scores
        return F.interpolate(self.low_res_scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def _as_float_tensor(value: Any, name: str, device: torch.device) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise ValueError(f"{name} must be a floating-point array, got numpy dtype {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    else:
        raise ValueError(f"{name} must be a torch.Tensor or a numpy array, got {type(value).__name__}")
    out = value.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _default_device(scores: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    if isinstance(scores, Tensor):
        return scores.device
    return torch.device("cpu")


def _lp_config(lp: LPConfig | Mapping[str, Any] | None) -> LPConfig:
    if lp is None:
        return LPConfig()
    if isinstance(lp, LPConfig):
        return lp
    valid = {f.name for f in fields(LPConfig)}
    unknown = sorted(set(lp) - valid)
    if unknown:
        raise ValueError(f"unknown patch-stage option(s) {unknown}; valid: {sorted(valid)}")
    return LPConfig(**dict(lp))


def _patch_stage(
    scores: Tensor,
    patch_features: Any,
    positions: Any,
    size: tuple[int, int],
    lp: LPConfig,
    device: torch.device,
) -> Tensor:
    """Patch scores (``[C, gh, gw]`` or ``[N, C]``) through docs/method.md §3 -> ``[C, gh, gw]`` grid."""
    feats = _as_float_tensor(patch_features, "patch_features", device)
    if feats.ndim == 3:
        gh, gw, _ = feats.shape
        feats = feats.reshape(gh * gw, -1)
    elif feats.ndim == 2:
        if scores.ndim != 3:
            raise ValueError(
                "patch_features [N, D] need scores as a grid [C, gh, gw] (row-major, N = gh * gw); "
                "for scores [N, C] pass patch_features as [gh, gw, D]"
            )
        gh, gw = scores.shape[1:]
    else:
        raise ValueError(f"patch_features must be [N, D] or [gh, gw, D], got {tuple(feats.shape)}")
    n = gh * gw
    if scores.ndim == 3:
        if tuple(scores.shape[1:]) != (gh, gw):
            raise ValueError(
                f"scores grid {tuple(scores.shape[1:])} does not match patch_features grid {(gh, gw)}"
            )
        y = scores.reshape(scores.shape[0], n).T
    else:
        if scores.shape[0] != n:
            raise ValueError(f"scores must be [N={n}, C] to match patch_features, got {tuple(scores.shape)}")
        y = scores
    if feats.shape[0] != n:
        raise ValueError(f"patch_features must have N = gh * gw = {n} rows, got {feats.shape[0]}")
    if positions is None:  # cell centres of a grid stretched over the resized image
        h, w = size
        rows = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * (h / gh)
        cols = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * (w / gw)
        yy, xx = torch.meshgrid(rows, cols, indexing="ij")
        pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)
    else:
        pos = _as_float_tensor(positions, "positions", device)
        if pos.shape != (n, 2):
            raise ValueError(f"positions must be [N={n}, 2] (y, x) in resized pixels, got {tuple(pos.shape)}")
    out = propagate_patches(feats, pos, y, lp)  # [N, C]
    return out.T.reshape(-1, gh, gw)


def _vm_patch_stage(
    image: Any,
    scores: Tensor,
    vm: str | nn.Module,
    window: WindowConfig,
    lp: LPConfig,
    device: torch.device,
) -> Tensor:
    """Resized-image scores ``[C, h, w]`` -> the same after the patch stage over ``vm``'s features.

    The VM features come from :meth:`lposs_lab.LPOSS.extract` (the predictor's windows, batching and
    padding). Each window's initial patch scores are the mean of ``scores`` over the patch's pixels
    (``adaptive_avg_pool2d`` of the window onto its patch grid, the inverse of the stretch the
    stitching does); one joint graph over all windows' patches; stitched back as the predictor does.
    """
    if isinstance(vm, str):
        from .models import create_vm

        vm = create_vm(vm, device=device)
    if not isinstance(vm, nn.Module) or not hasattr(vm, "patch_size"):
        raise ValueError("vm must be a VM name (e.g. 'dino_b16') or a module with a patch_size attribute")
    config = LPOSSConfig(window=window, device=str(device))
    model = LPOSS(vm, vm, config, method="lposs", device=device)  # vm is vlm: only the VM runs
    feats = model.extract(image, window)
    b, gh, gw, d = feats.vm.shape
    _, h, w = scores.shape
    crops = crop_windows(scores, feats.windows)  # [B, C, wh, ww]
    y = F.adaptive_avg_pool2d(crops, (gh, gw)).permute(0, 2, 3, 1).reshape(b * gh * gw, -1)
    pos = patch_positions(feats.windows, (gh, gw), feats.patch_size, device=device)
    out = propagate_patches(feats.vm.reshape(b * gh * gw, d), pos, y, lp)
    grids = out.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
    return stitch_windows(grids, feats.windows, h, w)


@torch.inference_mode()
def refine(
    image: Any,
    scores: Tensor | np.ndarray | PatchGrids | str | os.PathLike,
    *,
    r: int = _PX.r,
    tau: float = _PX.tau,
    alpha: float = _PX.alpha,
    max_iter: int = _PX.max_iter,
    tol: float = _PX.tol,
    spatial: str = _PX.spatial,
    sigma_s: float = _PX.sigma_s,
    features: Tensor | np.ndarray | None = None,
    backend: str = _PX.backend,
    max_bytes: int = _PX.max_bytes,
    patch_features: Tensor | np.ndarray | None = None,
    positions: Tensor | np.ndarray | None = None,
    lp: LPConfig | Mapping[str, Any] | None = None,
    vm: str | nn.Module | None = None,
    window: tuple[int, int] = (_WIN.size, _WIN.stride),
    short_side: int = _WIN.short_side,
    long_side: int = _WIN.long_side,
    device: str | torch.device | None = None,
) -> Refinement:
    r"""Refine class scores of any segmenter with LPOSS+'s pixel-level label propagation.

    The image is resized as docs/method.md §1, the scores are resized bilinearly (``align_corners=False``) to
    it, propagated over the pixel graph (docs/method.md §4) exactly as :class:`lposs_lab.LPOSS` does, then
    resized to the input image's size and argmaxed (docs/method.md §5). The pixel-stage defaults are those of
    :class:`lposs_lab.PixelConfig` (the paper's: ``r=13, tau=0.01, alpha=0.95, max_iter=10``).

    With ``patch_features`` the patch stage (docs/method.md §3, LPOSS) runs first, on a single patch grid
    covering the whole image (as the predictor's no-window variant): ``scores`` are then patch
    scores, ``[C, gh, gw]`` (or ``[N, C]`` with ``patch_features`` ``[gh, gw, D]``), and the
    propagated grid is resized bilinearly to the resized image before the pixel stage.

    With ``vm`` (a VM name such as ``"dino_b16"`` or a VM module) the patch stage runs on that VM's
    features over the predictor's sliding windows (``window = (size, stride)``, ``(0, 0)``: the whole
    image): ``scores`` are resized to the resized image, averaged over each window's patches
    (``adaptive_avg_pool2d``, ours), propagated over one joint graph (docs/method.md §3) and stitched back as
    the predictor does, then refined by the pixel stage.

    Args:
        image: the image the scores belong to: a path, PIL image, numpy array or tensor (anything
            :func:`lposs_lab.image_io.to_rgb_uint8` accepts), of size ``(H, W)``.
        scores: ``[C, h, w]`` class scores of the whole image at any resolution (and any aspect: the
            map is stretched over the image), float torch tensor or numpy array of any float dtype.
            They are used as given: logits, cosines or probabilities, no softmax is applied. Also a
            :class:`lposs_lab.score_files.PatchGrids` (window grids, stitched as the predictor does) or
            the path of a score file in either form (``save_scores``, see :mod:`lposs_lab.score_files`).
        r, tau, alpha, max_iter, tol, spatial, sigma_s, backend, max_bytes: pixel-stage
            hyperparameters, see :class:`lposs_lab.PixelConfig`.
        features: optional ``[F, h', w']`` pixel features replacing Lab, at the resized image's size
            (e.g. :func:`lposs_lab.models.depth.pixel_features`).
        patch_features: optional ``[N, D]`` (or ``[gh, gw, D]``) graph features (e.g. DINO) of the
            patches of ``scores``: run the patch stage first.
        positions: optional ``[N, 2]`` patch centres ``(y, x)`` in resized-image pixels (default: the
            centres of the ``gh x gw`` cells over the resized image).
        lp: patch-stage hyperparameters (:class:`lposs_lab.LPConfig` or a mapping of its fields;
            ``graph_features`` is ignored: the given ``patch_features`` or ``vm`` are the graph).
        vm: optional VM name (built by :func:`lposs_lab.create_vm`, weights fetched or cached) or
            module (``[B, 3, h, w] -> [B, gh, gw, D]`` with ``patch_size``; moved to ``device``):
            run the patch stage on its features first. Not with ``patch_features``.
        window: ``(size, stride)`` of the VM windows (with ``vm`` only); ``(0, 0)``: no windows.
        short_side, long_side: the resize of docs/method.md §1.
        device: where to compute (``"cpu"``, ``"cuda"``, ``"auto"``...). Default: the device of
            ``scores`` for a tensor, the CPU for a numpy array.

    Returns:
        A :class:`Refinement`: ``labels [H, W]`` int64, ``low_res_scores [C, h', w']`` float32 at the
        resized image's size, ``scores [C, H, W]`` (on access), all on ``device``.

    Raises:
        ValueError: scores not 3-D (2-D only as patch scores), no class, an empty map, a non-float
            dtype, NaN/inf values, or shapes that do not fit together.
        lposs_lab.ImageError: the image cannot be decoded.

    Example::

        >>> out = refine("photo.jpg", logits)          # logits [C, h, w] from any segmenter
        >>> out.labels.shape                           # the photo's (H, W)
    """
    if isinstance(scores, str | os.PathLike):
        scores, _ = read_score_file(scores)
    if isinstance(scores, PatchGrids):  # pixel scores at the saving run's resized image
        scores = scores.scores()
    dev = _default_device(scores, device)
    y = _as_float_tensor(scores, "scores", dev)
    if patch_features is None:  # pixel scores (also with vm=)
        if y.ndim != 3:
            raise ValueError(f"scores must be [C, h, w], got shape {tuple(y.shape)}")
    elif y.ndim not in (2, 3):
        raise ValueError(f"patch scores must be [C, gh, gw] or [N, C], got shape {tuple(y.shape)}")
    if y.ndim == 3 and y.shape[0] < 1:
        raise ValueError(f"scores must have at least one class (C >= 1), got shape {tuple(y.shape)}")
    if y.ndim == 2 and y.shape[1] < 1:
        raise ValueError(f"patch scores [N, C] must have at least one class, got shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError(f"scores must be non-empty, got shape {tuple(y.shape)}")
    if positions is not None and patch_features is None:
        raise ValueError("positions are only used with patch_features (the patch stage)")
    if vm is not None and patch_features is not None:
        raise ValueError("pass either patch_features or vm for the patch stage, not both")
    if len(window) != 2:
        raise ValueError(f"window must be (size, stride), got {window!r}")
    img, (height, width) = resized_image_tensor(image, short_side=short_side, long_side=long_side, device=dev)
    _, h, w = img.shape
    if patch_features is not None:
        y = _patch_stage(y, patch_features, positions, (h, w), _lp_config(lp), dev)
    elif vm is not None:
        win = WindowConfig(
            size=int(window[0]), stride=int(window[1]), short_side=short_side, long_side=long_side
        )
        y = _vm_patch_stage(image, resize_scores(y, h, w), vm, win, _lp_config(lp), dev)
    elif lp is not None:
        raise ValueError("lp is only used with patch_features or vm (the patch stage)")
    px = PixelConfig(
        r=r,
        tau=tau,
        alpha=alpha,
        max_iter=max_iter,
        tol=tol,
        spatial=spatial,
        sigma_s=sigma_s,
        backend=backend,
        max_bytes=max_bytes,
    )
    pix = None
    if features is not None:
        pix = _as_float_tensor(features, "features", dev)
        if pix.ndim != 3 or tuple(pix.shape[1:]) != (h, w):
            raise ValueError(
                f"features must be [F, {h}, {w}] (the resized image's size), got {tuple(pix.shape)}"
            )
    y = resize_scores(y, h, w)
    out = pixel_stage(img, y, px, features=pix)
    labels, _ = resize_argmax(out, height, width)
    return Refinement(labels, out, (height, width))


def resize_scores(scores: Tensor, height: int, width: int) -> Tensor:
    """``[C, h, w] -> [C, height, width]``: bilinear, ``align_corners=False`` (identity at equal size)."""
    if tuple(scores.shape[1:]) == (height, width):
        return scores
    return F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
