"""Evaluation records: per-image records, the resumable state store and split totals.

A run keeps one small JSON file per evaluated image in its *state directory* (``state_dir``)::

    <state_dir>/meta.json                       what produced the states (checked on resume)
    <state_dir>/<quoted id>.state.json          {"id", "mIoU", "seconds", "iou": {...}, "boundary": {...}}
    <state_dir>/<quoted id>.state.json          {"id", "error"} for an image that could not be read

Each record holds that image's metric states (per-class intersection and union, correct and labelled
pixel counts; the Boundary IoU band counts too), written atomically and fsynced. The split's numbers are
the sums of these states, so a run killed mid-way and resumed gives exactly the numbers of an
uninterrupted run, on any number of processes.

Tables of finished runs: :mod:`lposs_lab.lab.tables`; the report CLI: ``python -m lposs_lab.lab.report``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import torch

from lposs_lab.errors import UserError
from lposs_lab.files import atomic_write

from .metrics import DILATION_RATIO, BoundaryIoU, SegmentationIoU

__all__ = [
    "StateStore",
    "StateStoreError",
    "class_display_names",
    "image_record",
    "sum_states",
    "summarize",
]

class StateStoreError(UserError, ValueError):
    """A state directory that cannot be used as asked (one line naming the folder and the fix)."""


def class_display_names(classes: Sequence[str]) -> list[str]:
    """One name per class for reports: the first synonym; a synonym list at index 0 is ``background``.

    VOC's and COCO-Object's background class is given to the text encoder as a list of stuff names
    (``"sky;wall;tree;..."``); reporting it as ``sky`` would mislead.
    """
    names = [c.split(";")[0].strip() for c in classes]
    if classes and ";" in classes[0]:
        names[0] = "background"
    return names


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def image_record(
    image_id: str,
    *,
    iou: Mapping[str, torch.Tensor] | None = None,
    boundary: Mapping[str, torch.Tensor] | None = None,
    miou: float | None = None,
    seconds: float | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The JSON record of one image: its own metric states (counts of that image only) or its error.

    Args:
        image_id: the dataset id.
        iou: this image's :class:`SegmentationIoU` states ``{name: tensor}`` (its ``counts()``).
        boundary: optionally its :class:`BoundaryIoU` states.
        miou: this image's own mIoU in [0, 1] (NaN/None when it has no scored pixel).
        seconds: time spent predicting this image.
        error: why the image could not be evaluated (then the metrics are omitted).
    """
    rec: dict[str, Any] = {"id": image_id}
    if error is not None:
        rec["error"] = str(error)
        return rec
    if iou is None:
        raise ValueError("image_record needs iou= (or error=)")
    rec["mIoU"] = _finite(miou) if miou is not None else None
    rec["seconds"] = None if seconds is None else round(float(seconds), 6)
    rec["iou"] = {k: torch.as_tensor(v).tolist() for k, v in iou.items()}
    if boundary is not None:
        rec["boundary"] = {k: torch.as_tensor(v).tolist() for k, v in boundary.items()}
    return rec


class StateStore:
    """One atomically written JSON record per evaluated image under ``root`` (see the module docstring)."""

    SUFFIX = ".state.json"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, image_id: str) -> Path:
        """Where the record of ``image_id`` lives (ids are URL-quoted: ``a/b`` -> ``a%2Fb``)."""
        return self.root / f"{quote(image_id, safe='')}{self.SUFFIX}"

    def write(self, record: Mapping[str, Any]) -> Path:
        """Write one record atomically (temporary file, fsync, rename)."""
        path = self.path(str(record["id"]))
        with atomic_write(path, "w") as fh:
            json.dump(record, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        return path

    def done_ids(self) -> set[str]:
        """Ids that already have a record."""
        if not self.root.is_dir():
            return set()
        n = len(self.SUFFIX)
        return {unquote(p.name[:-n]) for p in self.root.glob(f"*{self.SUFFIX}") if not p.name.startswith(".")}

    def load(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The records of ``ids`` in that order.

        Raises:
            StateStoreError: a record is missing or unreadable.
        """
        out = []
        for key in ids:
            path = self.path(key)
            try:
                out.append(json.loads(path.read_text()))
            except FileNotFoundError:
                raise StateStoreError(
                    f"no state for image {key!r} in {self.root}; run again with resume=true"
                ) from None
            except (OSError, json.JSONDecodeError) as exc:
                raise StateStoreError(f"unreadable state file {path}: {exc}; delete it and resume") from None
        return out

    def check(self, meta: Mapping[str, Any], resume: bool) -> None:
        """Check that a run described by ``meta`` may use this store (nothing is written).

        Raises:
            StateStoreError: resuming with another config, or not resuming into a store that holds states.
        """
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            return
        meta = json.loads(json.dumps(meta))  # normalise (tuples -> lists) for comparison
        old = json.loads(meta_path.read_text())
        n = len(self.done_ids())
        if not resume and n:
            raise StateStoreError(
                f"state_dir {self.root} already holds {n} image state(s); pass resume=true to continue "
                "that run, or another hydra.run.dir / state_dir to start afresh"
            )
        if resume and old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise StateStoreError(
                f"cannot resume from {self.root}: it was written with another config (differs in "
                f"{', '.join(diff)}); use the same overrides or a new state_dir"
            )

    def prepare(self, meta: Mapping[str, Any]) -> None:
        """Write ``meta.json`` (after :meth:`check`): what produced the records of this store."""
        with atomic_write(self.root / "meta.json", "w") as fh:
            json.dump(json.loads(json.dumps(meta)), fh, indent=1, sort_keys=True)


def sum_states(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, torch.Tensor] | None:
    """Sum the ``key`` (``"iou"`` or ``"boundary"``) states of ``records``: ``{name: int64 tensor}``/None."""
    parts = [r[key] for r in records if key in r]
    if not parts:
        return None
    return {name: torch.tensor([p[name] for p in parts], dtype=torch.int64).sum(0) for name in parts[0]}


def _pct(x: torch.Tensor | float) -> float | None:
    v = float(x)
    return None if math.isnan(v) else 100.0 * v


def summarize(
    records: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    *,
    boundary: bool = False,
    dilation_ratio: float = DILATION_RATIO,
) -> dict[str, Any]:
    """Split-level numbers from per-image records (sums of their states), in percent.

    Args:
        records: :func:`image_record` dicts; error records are listed, not scored.
        classes: the benchmark's class names (for ``per_class_iou`` keys).
        boundary: also report Boundary IoU (the records must hold ``boundary`` states).

    Returns:
        ``{"mIoU", "pixel_accuracy", "per_class_iou", ["boundary_iou", "per_class_boundary_iou"],
        "num_images", "errors", "seconds_per_image", "per_image"}``.
    """
    names = class_display_names(classes)
    scored = [r for r in records if "error" not in r]
    # The records already hold every process's images: no cross-process sync (rank 0 alone gets here).
    iou = SegmentationIoU(len(classes), sync_on_compute=False)
    totals = sum_states(scored, "iou")
    if totals is not None:
        iou.add_counts(totals)
    res = iou.compute() if totals is not None else None
    out: dict[str, Any] = {
        "mIoU": _pct(res["mIoU"]) if res else None,
        "pixel_accuracy": _pct(res["pixel_accuracy"]) if res else None,
        "per_class_iou": {
            n: (_pct(v) if res else None)
            for n, v in zip(names, res["per_class_iou"] if res else [math.nan] * len(names), strict=True)
        },
    }
    if boundary:
        b = BoundaryIoU(len(classes), dilation_ratio=dilation_ratio, sync_on_compute=False)
        btot = sum_states(scored, "boundary")
        if scored and (btot is None or len([r for r in scored if "boundary" in r]) != len(scored)):
            raise StateStoreError(
                "some image states lack Boundary IoU counts; rerun with metrics.boundary=true"
            )
        if btot is not None:
            b.add_counts(btot)
            bres = b.compute()
            out["boundary_iou"] = _pct(bres["mBIoU"])
            out["per_class_boundary_iou"] = {
                n: _pct(v) for n, v in zip(names, bres["per_class_biou"], strict=True)
            }
        else:
            out["boundary_iou"] = None
            out["per_class_boundary_iou"] = {n: None for n in names}
    secs = [r["seconds"] for r in scored if r.get("seconds") is not None]
    out["num_images"] = len(scored)
    out["errors"] = [{"id": r["id"], "error": r["error"]} for r in records if "error" in r]
    out["seconds_per_image"] = sum(secs) / len(secs) if secs else None
    out["per_image"] = [
        {
            "id": r["id"],
            "mIoU": _pct(r["mIoU"]) if r.get("mIoU") is not None else None,
            "seconds": r.get("seconds"),
        }
        for r in scored
    ]
    return out
