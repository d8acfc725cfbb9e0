"""Label propagation over pixels (LPOSS+, docs/method.md §4).

The pixel graph is a fixed ``r x r`` stencil: for each of the ``(r*r - 1) / 2`` "forward" offsets
we keep one weight plane ``[H, W]`` (the edge to the pixel at that offset), the reverse edge being
the same weight read at the neighbour. The ``D^-1/2`` normalisation is folded into the planes, so
a product with ``S_hat`` needs no general sparse matrix and no per-class work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import PIXEL_FEATURE_NAMES, PixelConfig
from .kernels import resolve_backend, stencil_operator
from .kernels.geometry import pair_slices
from .propagation import conjugate_gradient

__all__ = [
    "PIXEL_FEATURES",
    "PixelFeature",
    "register_pixel_feature",
    "needs_depth",
    "rgb_to_lab",
    "stencil_offsets",
    "pixel_graph",
    "refine_pixels",
    "lab_features",
    "pixel_features",
    "pixel_stage",
]

_PX = PixelConfig()  # the keyword defaults of the functions below (the dataclass is their one source)

# sRGB (D65) -> CIE XYZ, and the D65 reference white (the constants of scikit-image's rgb2lab).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
LAB_SCALE = (100.0, 128.0, 128.0)


def rgb_to_lab(image: Tensor) -> Tensor:
    """CIE L*a*b* (sRGB, D65) of an RGB image.

    Args:
        image: ``[3, H, W]`` RGB in ``[0, 1]``.

    Returns:
        ``[3, H, W]`` with L in ``[0, 100]`` and a, b roughly in ``[-128, 127]``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    rgb = image.float()
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    # Python-scalar constants: no host-to-device copy (and no wait for the device) on accelerators.
    t = torch.stack(
        [
            (row[0] * lin[0] + row[1] * lin[1] + row[2] * lin[2]) / white
            for row, white in zip(_XYZ_FROM_RGB, _D65_WHITE, strict=True)
        ]
    )
    f = torch.where(t > 0.008856, t.clamp(min=0).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[0], f[1], f[2]
    lightness = 116.0 * fy - 16.0
    return torch.stack([lightness, 500.0 * (fx - fy), 200.0 * (fy - fz)])


def lab_features(image: Tensor) -> Tensor:
    """The pixel feature of docs/method.md §4: Lab over ``(100, 128, 128)``. ``[3, H, W] -> [3, H, W]``."""
    lab = rgb_to_lab(image)
    return torch.stack([lab[i] / LAB_SCALE[i] for i in range(3)])


@dataclass(frozen=True)
class PixelFeature:
    """A pixel-stage feature: ``build(image [3, h, w], depth [h, w] or None, depth_weight) -> [F, h, w]``;
    ``needs_depth``: whether a depth model must be built for it (``LPOSS.from_config``)."""

    build: Callable[[Tensor, Tensor | None, float], Tensor]
    needs_depth: bool = False
    description: str = ""


def _depth_channel(image: Tensor, depth: Tensor | None, weight: float) -> Tensor:
    return depth.to(image.device, torch.float32)[None] * float(weight)  # type: ignore[union-attr]


#: Pixel-stage features by ``PixelConfig.feature`` name (add one with :func:`register_pixel_feature`).
PIXEL_FEATURES: dict[str, PixelFeature] = {
    "lab": PixelFeature(lambda image, depth, w: lab_features(image), description="Lab / (100, 128, 128)"),
    "depth": PixelFeature(_depth_channel, needs_depth=True, description="depth in [0, 1] x depth_weight"),
    "lab+depth": PixelFeature(
        lambda image, depth, w: torch.cat([lab_features(image), _depth_channel(image, depth, w)]),
        needs_depth=True,
        description="both (F = 4)",
    ),
}


def register_pixel_feature(name: str, feature: PixelFeature) -> PixelFeature:
    """Add a pixel feature: ``pixel.feature=NAME`` (``PixelConfig(feature=NAME)``) then selects it."""
    if name in PIXEL_FEATURES and PIXEL_FEATURES[name] != feature:
        raise ValueError(f"pixel feature {name!r} is already registered; pick another name")
    PIXEL_FEATURES[name] = feature
    if name not in PIXEL_FEATURE_NAMES:
        PIXEL_FEATURE_NAMES.append(name)
    return feature


def needs_depth(feature: str) -> bool:
    """Whether pixel feature ``feature`` reads a depth map (only then is a depth model built)."""
    if feature not in PIXEL_FEATURES:
        raise ValueError(f"unknown pixel feature {feature!r}; valid choices: {', '.join(PIXEL_FEATURES)}")
    return PIXEL_FEATURES[feature].needs_depth


def stencil_offsets(r: int) -> list[tuple[int, int]]:
    """The forward half of an ``r x r`` neighbourhood: ``(dy, dx)`` with ``dy > 0`` or ``dy == 0, dx > 0``."""
    if r < 1 or r % 2 == 0:
        raise ValueError(f"r must be a positive odd integer, got {r}")
    h = r // 2
    return [(dy, dx) for dy in range(0, h + 1) for dx in range(-h, h + 1) if dy > 0 or dx > 0]


def _check_graph_args(r: int, tau: float, spatial: str) -> None:
    stencil_offsets(r)
    if spatial not in ("binary", "rbf"):
        raise ValueError(f"unknown pixel spatial kernel {spatial!r}; valid choices: binary, rbf")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def pixel_graph(
    features: Tensor,
    *,
    r: int = _PX.r,
    tau: float = _PX.tau,
    spatial: str = _PX.spatial,
    sigma_s: float = _PX.sigma_s,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Normalised stencil weights of the pixel graph.

    Edge weight ``exp(-||f_i - f_j||_2 / tau)`` (times ``exp(-d^2 / sigma_s^2)`` for
    ``spatial="rbf"``) between pixels at most ``r // 2`` apart on each axis, then
    ``S_hat = D^-1/2 W D^-1/2`` with zero degrees set to 1.

    Args:
        features: ``[F, H, W]`` pixel features (e.g. :func:`lab_features`).

    Returns:
        ``(weights [K, H, W], offsets)``: ``weights[n, y, x]`` is ``S_hat`` between pixel ``(y, x)``
        and ``(y + dy_n, x + dx_n)`` (0 where that neighbour is outside the image).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [F, H, W], got {tuple(features.shape)}")
    _check_graph_args(r, tau, spatial)
    feats = features.float()
    _, h, w = feats.shape
    offsets = stencil_offsets(r)
    weights = torch.zeros((len(offsets), h, w), dtype=torch.float32, device=feats.device)
    deg = torch.zeros((h, w), dtype=torch.float32, device=feats.device)
    for n, (dy, dx) in enumerate(offsets):
        if dy >= h or abs(dx) >= w:
            continue
        src, dst = pair_slices(h, w, dy, dx)
        diff = feats[:, src[0], src[1]] - feats[:, dst[0], dst[1]]
        wgt = torch.exp(-diff.pow(2).sum(0).sqrt() / tau)
        if spatial == "rbf":
            wgt = wgt * math.exp(-(dy * dy + dx * dx) / sigma_s**2)
        weights[n][src] = wgt
        deg[src] += wgt
        deg[dst] += wgt
    deg = torch.where(deg == 0, torch.ones_like(deg), deg)
    inv_sqrt = deg.rsqrt()
    for n, (dy, dx) in enumerate(offsets):
        if dy >= h or abs(dx) >= w:
            continue
        src, dst = pair_slices(h, w, dy, dx)
        weights[n][src] *= inv_sqrt[src] * inv_sqrt[dst]
    return weights, offsets


def refine_pixels(
    image: Tensor,
    scores: Tensor,
    *,
    r: int = _PX.r,
    tau: float = _PX.tau,
    alpha: float = _PX.alpha,
    max_iter: int = _PX.max_iter,
    tol: float = _PX.tol,
    spatial: str = _PX.spatial,
    sigma_s: float = _PX.sigma_s,
    features: Tensor | None = None,
    backend: str = _PX.backend,
    max_bytes: int = _PX.max_bytes,
) -> Tensor:
    """LPOSS+: propagate per-pixel class scores over the pixel graph (docs/method.md §4).

    Solves ``(I - alpha S_hat) X = Y`` for all classes by ``max_iter`` steps of batched conjugate
    gradient from zero, classes in chunks when ``C x H x W`` would exceed ``max_bytes``.

    Args:
        image: ``[3, H, W]`` RGB float in ``[0, 1]``.
        scores: ``[C, H, W]`` initial scores.
        features: optional ``[F, H, W]`` pixel features replacing Lab (e.g. Lab and depth).
        backend: stencil implementation: ``"auto"``, ``"torch"``, ``"numba"`` or ``"triton"``.

    Returns:
        ``[C, H, W]`` float32 refined scores on the device of ``scores``.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[1:]:
        raise ValueError(
            f"scores must be [C, H, W] with H, W = {tuple(image.shape[1:])}, got {tuple(scores.shape)}"
        )
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    device = scores.device
    feats = lab_features(image.to(device)) if features is None else features.to(device)
    if feats.shape[1:] != scores.shape[1:]:
        raise ValueError(f"features must be [F, H, W] with H, W = {tuple(scores.shape[1:])}")
    c, h, w = scores.shape
    name = resolve_backend(backend, device.type)
    if name == "numba":
        from .kernels.numba_solver import numba_pixel_solver

        _check_graph_args(r, tau, spatial)
        solve = numba_pixel_solver(
            feats, r=r, tau=tau, alpha=alpha, max_iter=max_iter, tol=tol, spatial=spatial, sigma_s=sigma_s
        )
    else:
        weights, offsets = pixel_graph(feats, r=r, tau=tau, spatial=spatial, sigma_s=sigma_s)
        op = stencil_operator(weights, offsets, alpha, backend=name)

        def solve(y: Tensor) -> Tensor:
            n = y.shape[0]
            x = conjugate_gradient(
                op, y.permute(1, 2, 0).reshape(h * w, n).contiguous(), max_iter=max_iter, tol=tol
            )
            return x.reshape(h, w, n).permute(2, 0, 1)

    # Each CG column holds about 10 float32 planes (x, r, p, q, b, temporaries, the chunk copies).
    per_class = 10 * 4 * h * w
    chunk = max(1, min(c, max_bytes // max(per_class, 1)))
    if 8 <= chunk < c:
        chunk -= chunk % 8  # whole SIMD widths: the numba kernels pad each chunk to a multiple of 8
    out = torch.empty((c, h, w), dtype=torch.float32, device=device)
    for start in range(0, c, chunk):
        out[start : start + chunk] = solve(scores[start : start + chunk].float())
    return out


def pixel_features(image: Tensor, depth: Tensor | None, feature: str, *, depth_weight: float = 1.0) -> Tensor:
    """Pixel-stage features ``[F, h, w]`` of :data:`PIXEL_FEATURES` ``feature``: Lab (F=3), depth (F=1), both
    (F=4) or a registered one.

    Args:
        image: ``[3, h, w]`` RGB in ``[0, 1]``.
        depth: ``[h, w]`` depth in ``[0, 1]`` (read only by features that need depth).
        feature: ``"lab"``, ``"depth"``, ``"lab+depth"`` or a registered name.
        depth_weight: scale of the depth channel (Lab channels are Lab / (100, 128, 128)).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, h, w], got {tuple(image.shape)}")
    if needs_depth(feature) and (depth is None or depth.shape != image.shape[1:]):
        got = None if depth is None else tuple(depth.shape)
        want = tuple(image.shape[1:])
        raise ValueError(f"depth must be [h, w] = {want} for feature {feature!r}, got {got}")
    out = PIXEL_FEATURES[feature].build(image, depth, float(depth_weight))
    if out.ndim != 3 or out.shape[1:] != image.shape[1:]:
        raise ValueError(f"pixel feature {feature!r} gave {tuple(out.shape)}, expected [F, {image.shape[1]}, "
                         f"{image.shape[2]}]")  # fmt: skip
    return out


def pixel_stage(
    image: Tensor, scores: Tensor, config: PixelConfig, *, features: Tensor | None = None
) -> Tensor:
    """The LPOSS+ pixel stage with the hyperparameters of ``config`` (docs/method.md §4).

    The one call shared by :meth:`lposs_lab.LPOSS.propagate` and :func:`lposs_lab.refine`, so both
    run exactly the same computation. ``config.enabled``, ``feature``, ``depth_model`` and
    ``depth_weight`` are not read here (the caller builds ``features`` when it is not Lab).

    Args:
        image: ``[3, h, w]`` resized RGB float in ``[0, 1]``.
        scores: ``[C, h, w]`` initial scores at the same size.
        config: ``r``, ``tau``, ``alpha``, ``max_iter``, ``tol``, ``spatial``, ``sigma_s``, ``backend``
            and ``max_bytes`` of the solve.
        features: optional ``[F, h, w]`` pixel features replacing Lab.

    Returns:
        ``[C, h, w]`` float32 refined scores on the device of ``scores``.
    """
    return refine_pixels(image, scores, features=features, **config.solver_kwargs())
