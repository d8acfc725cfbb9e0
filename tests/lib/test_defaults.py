"""Each default stated once: the keyword defaults of the public functions equal the config dataclasses'."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from lposs_lab import refine, refine_patches, refine_pixels
from lposs_lab.config import LPConfig, PixelConfig, WindowConfig
from lposs_lab.kernels.numba_solver import neighbourhood_from_features, numba_pixel_solver
from lposs_lab.pixels import pixel_features, pixel_graph
from lposs_lab.propagation import conjugate_gradient
from lposs_lab.windows import resize_image, resized_image_tensor, resized_shape, window_grid


def _defaults(fn) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _field_defaults(cls) -> dict[str, object]:
    return {f.name: getattr(cls(), f.name) for f in fields(cls)}


CASES = [
    # (function, dataclass, the dataclass fields the function must take as keywords)
    (refine_patches, LPConfig, {f.name for f in fields(LPConfig)} - {"graph_features"}),
    (refine_pixels, PixelConfig, set(PixelConfig.SOLVER_FIELDS)),
    (refine, PixelConfig, set(PixelConfig.SOLVER_FIELDS)),
    (pixel_graph, PixelConfig, {"r", "tau", "spatial", "sigma_s"}),
    (neighbourhood_from_features, PixelConfig, {"r", "tau", "spatial", "sigma_s"}),
    (numba_pixel_solver, PixelConfig, {"r", "tau", "alpha", "max_iter", "tol", "spatial", "sigma_s"}),
    (pixel_features, PixelConfig, {"depth_weight"}),
    (conjugate_gradient, LPConfig, {"max_iter", "tol"}),
    (conjugate_gradient, PixelConfig, {"max_iter", "tol"}),
    (refine, WindowConfig, {"short_side", "long_side"}),
    (resized_shape, WindowConfig, {"short_side", "long_side"}),
    (resize_image, WindowConfig, {"short_side", "long_side"}),
    (resized_image_tensor, WindowConfig, {"short_side", "long_side"}),
    (window_grid, WindowConfig, {"size", "stride"}),
]


@pytest.mark.parametrize(("fn", "cls", "expected"), CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_keyword_defaults_equal_the_dataclass_defaults(fn, cls, expected):
    got = _defaults(fn)
    want = _field_defaults(cls)
    assert expected <= set(got), f"{fn.__name__} lacks keywords {sorted(expected - set(got))}"
    for name in expected:
        where = f"{fn.__name__}({name}={got[name]!r}) but {cls.__name__}.{name}={want[name]!r}"
        assert got[name] == want[name], where


def test_refine_window_default_is_the_window_config():
    win = WindowConfig()
    assert _defaults(refine)["window"] == (win.size, win.stride)


def test_no_public_keyword_shadows_a_field_with_another_default():
    # every keyword of the propagation entry points that is named like a field of its dataclass agrees
    for fn, cls in ((refine_patches, LPConfig), (refine_pixels, PixelConfig), (pixel_graph, PixelConfig)):
        want = _field_defaults(cls)
        clash = {k: v for k, v in _defaults(fn).items() if k in want and v != want[k]}
        assert not clash, f"{fn.__name__}: {clash}"
