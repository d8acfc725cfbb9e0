"""Score maps on disk at the lowest resolution that loses nothing (``.npz``, compressed, written atomically).

Two forms, both readable by :func:`read_score_file` and :func:`lposs_lab.refine`:

* **full**: ``scores [C, h, w]`` float16, the class scores at the resized image (LPOSS+: the pixel stage's
  output has full resolution, nothing smaller reproduces it).
* **window grids** (MaskCLIP and LPOSS with sliding windows): their pixel scores are a bilinear upsampling
  of the patch grids, so the file holds those grids, ``grids [B, Q, gh, gw]`` float16 (one per window and
  class name), with the rule that rebuilds the pixel scores exactly as the predictor does
  (:meth:`PatchGrids.scores`): each window's grid is resized to the window's pixels (``mode``
  ``"bilinear"``, ``align_corners`` false), the windows are averaged where they overlap on a canvas of
  ``size`` (the resized image), then each class takes the max over its names (``owner``). The max comes
  after the stitching because it does not commute with it: that is why the grids are per name.

Every file also holds ``classes`` (the class names) and ``form`` (``"full"`` or ``"window_grids"``).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import atomic_write
from .windows import Window, stitch_windows

__all__ = ["PatchGrids", "write_score_file", "read_score_file", "ScoreFileError", "STITCH_MODE"]

#: The resize of each window's grid onto its pixels (:func:`lposs_lab.windows.stitch_windows`).
STITCH_MODE = {"mode": "bilinear", "align_corners": False}


class ScoreFileError(ValueError):
    """A score file that cannot be read or does not hold a score map (the message names the file)."""


@dataclass(frozen=True)
class PatchGrids:
    """Per-window patch-score grids and the rule that turns them into pixel scores.

    Attributes:
        grids: ``[B, Q, gh, gw]`` scores of each window's patches, one row per class name.
        windows: the ``B`` windows over the resized image (``Window(y1, y2, x1, x2)``).
        size: ``(h, w)`` of the resized image (the canvas).
        owner: ``[Q]`` int64, the class of each name (names of one class: its synonyms).
        num_classes: ``C``.
    """

    grids: Tensor
    windows: tuple[Window, ...]
    size: tuple[int, int]
    owner: Tensor
    num_classes: int

    def __post_init__(self) -> None:
        b, q = self.grids.shape[:2] if self.grids.ndim == 4 else (-1, -1)
        if self.grids.ndim != 4 or b != len(self.windows):
            shape = tuple(self.grids.shape)
            raise ValueError(f"grids must be [B={len(self.windows)}, Q, gh, gw], got {shape}")
        if self.owner.shape != (q,) or (q and int(self.owner.max()) >= self.num_classes):
            raise ValueError(f"owner must be [Q={q}] class indices < {self.num_classes}")

    def scores(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[C, h, w]`` pixel scores: stitched per name (:data:`STITCH_MODE`), then the max per class."""
        h, w = self.size
        names = stitch_windows(self.grids.to(dtype), list(self.windows), h, w)
        if names.shape[0] == self.num_classes:
            return names
        out = names.new_full((self.num_classes, h, w), float("-inf"))
        index = self.owner.to(names.device).view(-1, 1, 1).expand_as(names)
        return out.scatter_reduce_(0, index, names, "amax", include_self=True)


def write_score_file(path: str | os.PathLike, scores: Tensor | PatchGrids, classes: Sequence[str]) -> int:
    """Write ``scores`` (``[C, h, w]``, or :class:`PatchGrids`) as float16 to ``path`` (``.npz``, compressed,
    atomically). Returns the file's size in bytes."""
    buf = io.BytesIO()
    names = np.array([str(c) for c in classes])
    if isinstance(scores, PatchGrids):
        np.savez_compressed(
            buf,
            form=np.array("window_grids"),
            grids=_half(scores.grids),
            windows=np.array([[w.y1, w.y2, w.x1, w.x2] for w in scores.windows], dtype=np.int64),
            size=np.array(scores.size, dtype=np.int64),
            owner=scores.owner.cpu().numpy().astype(np.int64),
            mode=np.array(STITCH_MODE["mode"]),
            align_corners=np.array(STITCH_MODE["align_corners"]),
            classes=names,
        )
    else:
        if scores.ndim != 3:
            raise ValueError(f"scores must be [C, h, w], got {tuple(scores.shape)}")
        np.savez_compressed(buf, form=np.array("full"), scores=_half(scores), classes=names)
    data = buf.getvalue()
    with atomic_write(path) as fh:
        fh.write(data)
    return len(data)


def read_score_file(path: str | os.PathLike) -> tuple[Tensor | PatchGrids, list[str] | None]:
    """``(scores, class names or None)`` of a score file.

    ``scores`` is a float32 ``[C, h, w]`` tensor for ``.npy`` files and the full form (``.npz`` with a
    ``scores`` array), a :class:`PatchGrids` for the window-grid form (:meth:`PatchGrids.scores` gives the
    pixel scores).

    Raises:
        ScoreFileError: unreadable file, no ``scores``/``grids`` array, wrong shapes, an unknown resize rule.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {k: data[k] for k in data.files}
        else:
            arrays = {"scores": np.asarray(data)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ScoreFileError(f"cannot read score file {path}: {' '.join(str(exc).split())[:120]}") from None
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if "grids" in arrays:
        return _grids(arrays, path), classes
    if "scores" not in arrays:
        raise ScoreFileError(
            f"score file {path} has no 'scores' or 'grids' array (keys: {', '.join(sorted(arrays))})"
        )
    return _scores_array(arrays["scores"], path), classes


def _half(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float16)


def _scores_array(arr: np.ndarray, path: Path) -> Tensor:
    if arr.ndim != 3 or arr.dtype.kind not in "fiu":
        raise ScoreFileError(
            f"score file {path} holds a {arr.dtype} array of shape {arr.shape}; expected [C, h, w]"
        )
    return torch.from_numpy(arr.astype(np.float32))


def _grids(arrays: dict[str, np.ndarray], path: Path) -> PatchGrids:
    mode = str(arrays.get("mode", STITCH_MODE["mode"]))
    corners = bool(arrays.get("align_corners", STITCH_MODE["align_corners"]))
    if (mode, corners) != (STITCH_MODE["mode"], STITCH_MODE["align_corners"]):
        raise ScoreFileError(
            f"score file {path} asks for the resize mode={mode}, align_corners={corners}; "
            "this version stitches with mode=bilinear, align_corners=False"
        )
    try:
        grids = torch.from_numpy(arrays["grids"].astype(np.float32))
        windows = tuple(Window(*map(int, w)) for w in arrays["windows"])
        h, w = (int(v) for v in arrays["size"])
        owner = torch.from_numpy(arrays["owner"].astype(np.int64))
        num_classes = len(arrays["classes"]) if "classes" in arrays else int(owner.max()) + 1
        return PatchGrids(grids, windows, (h, w), owner, num_classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ScoreFileError(f"score file {path} holds malformed window grids: {exc}") from None

