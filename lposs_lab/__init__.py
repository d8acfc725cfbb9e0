"""lposs_lab: LPOSS / LPOSS+ training-free open-vocabulary segmentation, as a library and an evaluation lab.

The core is plain Python and torch (no Hydra, no Lightning)::

    from lposs_lab import LPOSS
    model = LPOSS.from_config(vm="dino_b16", vlm="maskclip_b16")
    pred = model.predict("photo.jpg", classes=["cat", "dog;puppy", "sky"])
"""

from .config import LPConfig, LPOSSConfig, PixelConfig, WindowConfig
from .image_io import ImageError, load_image, to_rgb_uint8
from .models.registry import register_vlm, register_vm  # noqa: F401 (encoders added from outside the package)
from .pixels import lab_features, pixel_graph, pixel_stage, refine_pixels, rgb_to_lab
from .postprocess import UNKNOWN, Abstain, abstain, pamr
from .predictor import LPOSS, ImageFeatures, Prediction
from .propagation import conjugate_gradient, knn_inner_product, patch_graph, patch_operator, refine_patches
from .refine import Refinement, refine

__version__ = "0.1.0"

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
    "__version__",
]


def __getattr__(name: str):
    # The encoders pull in timm and open_clip: import them only when asked for.
    if name in ("create_vm", "create_vlm"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'lposs_lab' has no attribute {name!r}")
