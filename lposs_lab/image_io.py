"""Decoding any image input to 8-bit RGB.

Everything a user may hand in (a path, a PIL image in any mode, a numpy array, a tensor) becomes an
``[H, W, 3]`` uint8 numpy array, or raises :class:`ImageError` with a one-line message.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .inputs import check_image_path

__all__ = ["ImageError", "check_image_path", "load_image", "to_rgb_uint8"]


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype.kind == "i" and arr.dtype.itemsize == 4 and arr.max(initial=0) <= 255 and mode == "I":
            # 8-bit data stored as 32-bit integers
            arr8 = arr.clip(0, 255).astype(np.uint8)
        else:
            # 16-bit samples: keep the high byte, as OpenCV's imread does
            arr8 = (arr.astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr8 = (np.nan_to_num(arr).clip(0, 1) * 255 + 0.5).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # alpha dropped, as OpenCV's imread does
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageError(f"image array must be [H, W], [H, W, C] or [C, H, W], got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"image array must have 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr >> 8).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError("image array contains NaN or infinite values")
        out = (arr.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif arr.dtype.kind in "iu":
        out = arr.clip(0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported image array dtype {arr.dtype}")
    return np.ascontiguousarray(out)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Decode ``image`` to an ``[H, W, 3]`` uint8 RGB array.

    Args:
        image: a path (str or ``os.PathLike``), a PIL image (any mode: RGB, RGBA, P, L, I;16, CMYK...),
            a numpy array or a torch tensor (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``; floats are
            taken as ``[0, 1]``, uint16 as 16-bit).

    Raises:
        ImageError: the input is missing, unreadable, truncated, empty or of an unsupported kind.
    """
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        try:
            arr = _pil_to_rgb(image)
        except OSError as exc:
            raise ImageError(f"cannot decode image: {exc}") from None
    elif _is_tensor(image):
        arr = _array_to_rgb(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        arr = _array_to_rgb(image)
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}; pass a path, PIL image, numpy array or tensor"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image is empty (shape {arr.shape[:2]})")
    return arr


def _is_tensor(value: Any) -> bool:
    # torch is imported only by callers that have tensors: without it loaded, nothing is a tensor
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file to ``[H, W, 3]`` uint8 RGB, or raise :class:`ImageError` in one line."""
    p = check_image_path(path)
    try:
        with Image.open(p) as img:
            img.load()
            arr = _pil_to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"not a readable image file: {p}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot decode image {p}: {msg}") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - huge inputs
        raise ImageError(f"image too large: {p}: {exc}") from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image is empty: {p}")
    return arr
