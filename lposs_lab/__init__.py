"""lposs_lab: LPOSS / LPOSS+ training-free open-vocabulary segmentation, as a library and an evaluation lab.

The core is plain Python and torch (no Hydra, no Lightning)::

    from lposs_lab import LPOSS
    model = LPOSS.from_config(vm="dino_b16", vlm="maskclip_b16")
    pred = model.predict("photo.jpg", classes=["cat", "dog;puppy", "sky"])
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__version__ = "0.1.0"

# public name -> the submodule defining it. Imported on first use (PEP 562), so that ``import lposs_lab``
# (and ``lposs_lab.config`` / ``lposs_lab.errors``, which the command line checks input with before
# anything heavy) does not pull in torch, timm or open_clip.
_EXPORTS = {
    "LPOSS": "predictor",
    "ImageFeatures": "predictor",
    "Prediction": "predictor",
    "LPOSSConfig": "config",
    "LPConfig": "config",
    "PixelConfig": "config",
    "WindowConfig": "config",
    "refine": "refine",
    "Refinement": "refine",
    "pamr": "postprocess",
    "abstain": "postprocess",
    "Abstain": "postprocess",
    "UNKNOWN": "postprocess",
    "refine_patches": "propagation",
    "patch_graph": "propagation",
    "patch_operator": "propagation",
    "conjugate_gradient": "propagation",
    "knn_inner_product": "propagation",
    "refine_pixels": "pixels",
    "pixel_stage": "pixels",
    "pixel_graph": "pixels",
    "rgb_to_lab": "pixels",
    "lab_features": "pixels",
    "load_image": "image_io",
    "to_rgb_uint8": "image_io",
    "ImageError": "errors",
    "create_vm": "models",
    "create_vlm": "models",
    "register_vm": "models",
    "register_vlm": "models",
}

__all__ = [
    "LPOSS",
    "LPOSSConfig",
    "LPConfig",
    "PixelConfig",
    "WindowConfig",
    "Prediction",
    "ImageFeatures",
    "refine",
    "Refinement",
    "pamr",
    "abstain",
    "Abstain",
    "UNKNOWN",
    "refine_patches",
    "refine_pixels",
    "pixel_stage",
    "patch_graph",
    "patch_operator",
    "pixel_graph",
    "conjugate_gradient",
    "knn_inner_product",
    "rgb_to_lab",
    "lab_features",
    "load_image",
    "to_rgb_uint8",
    "ImageError",
    "create_vm",
    "create_vlm",
    "register_vm",
    "register_vlm",
    "__version__",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lposs_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """``lposs_lab.refine`` is both a submodule and the function it defines: importing the submodule must
    not replace the function (the import system sets the submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
