"""``task=refine``: refine any method's saved score maps with LPOSS+'s pixel stage (or PAMR) and score
the labels before and after in one table.

    python run.py task=refine dataset=voc20 scores=DIR                      # DIR/<id>.npz or <id>.npy
    python run.py task=refine dataset=voc20 scores=DIR refiner=pamr metrics.boundary=true
    python run.py task=refine dataset=voc20 scores=DIR pixel.r=9 save_predictions=refined/

A score file holds ``[C, h, w]`` class scores at any resolution (``.npy``, or ``.npz`` with a ``scores``
array and optionally ``classes``), e.g. written by ``task=evaluate save_scores=DIR``. "Before" labels are
the scores resized bilinearly to the image and argmaxed (docs/method.md §5); "after" labels are those of the
refiner.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lposs_lab import __version__
from lposs_lab.errors import ConfigError, UserError
from lposs_lab.files import atomic_write
from lposs_lab.postprocess import PAMRStep
from lposs_lab.predictor import resolve_device
from lposs_lab.refine import refine
from lposs_lab.viz import label_image, save_png
from lposs_lab.windows import resize_argmax

from ..data.dataset import SegmentationDataset
from ..metrics import BoundaryIoU, SegmentationIoU, per_image_miou
from ..tables import DATASET_COLUMNS, Table
from .config import check_output_dir, lposs_config, plain, run_dir_of
from .evaluate import dataset_of

__all__ = ["REFINERS", "refine_task", "score_file", "load_scores"]

REFINERS = ("lposs_plus", "pamr", "none")


def score_file(folder: Path, image_id: str) -> Path | None:
    """``<folder>/<id>.npz`` or ``<id>.npy`` (the first that exists), None when neither does."""
    for suffix in (".npz", ".npy"):
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def load_scores(path: Path, num_classes: int) -> torch.Tensor:
    """``[C, h, w]`` float32 scores of ``path``, checked against the benchmark's class count.

    Raises:
        UserError: unreadable file, no ``scores`` array in an ``.npz``, not 3-D, wrong class count.
    """
    try:
        data = np.load(path, allow_pickle=False)
        arr = data["scores"] if isinstance(data, np.lib.npyio.NpzFile) else data
        arr = np.asarray(arr)
    except KeyError:
        raise UserError(f"score file {path} has no 'scores' array (keys: {', '.join(data.files)})") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read score file {path}: {' '.join(str(exc).split())[:120]}") from None
    if arr.ndim != 3 or arr.dtype.kind not in "fiu":
        raise UserError(
            f"score file {path} holds a {arr.dtype} array of shape {arr.shape}; expected [C, h, w]"
        )
    if arr.shape[0] != num_classes:
        raise UserError(
            f"score file {path} has {arr.shape[0]} classes, the benchmark {num_classes}; "
            "save scores in the benchmark's class order"
        )
    return torch.from_numpy(arr.astype(np.float32))


def _refiner(cfg: DictConfig) -> str:
    name = str(cfg.get("refiner") or "lposs_plus")
    if name not in REFINERS:
        raise ConfigError(f"unknown refiner {name!r}; valid: {', '.join(REFINERS)} (e.g. refiner=pamr)")
    return name


def _metrics(num_classes: int, boundary: bool, dilation: float) -> dict[str, Any]:
    out: dict[str, Any] = {"iou": SegmentationIoU(num_classes, sync_on_compute=False)}
    if boundary:
        out["boundary"] = BoundaryIoU(num_classes, dilation_ratio=dilation, sync_on_compute=False)
    return out


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    res = metrics["iou"].compute()
    out = {"mIoU": 100.0 * float(res["mIoU"]), "pixel_accuracy": 100.0 * float(res["pixel_accuracy"])}
    if "boundary" in metrics:
        out["boundary_iou"] = 100.0 * float(metrics["boundary"].compute()["mBIoU"])
    return out


def refine_task(cfg: DictConfig) -> dict[str, Any]:
    """Run ``task=refine``; returns the results dict after writing ``results_json``."""
    info, dataset = dataset_of(cfg)
    refiner = _refiner(cfg)
    config = lposs_config(cfg)  # validates the pixel.* and window.* overrides
    if not cfg.get("scores"):
        raise UserError("task=refine needs scores=DIR, the folder of <id>.npz / <id>.npy score maps")
    folder = Path(str(cfg.scores)).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"scores folder {folder} not found; pass scores=DIR holding <id>.npz or <id>.npy files"
        )
    files = {k: score_file(folder, k) for k in dataset.ids}
    missing = [k for k, p in files.items() if p is None]
    if missing:
        raise UserError(
            f"score file {folder / (missing[0] + '.npz')} (or .npy) not found "
            f"({len(missing)} of {len(dataset)} images lack one)"
        )
    mcfg = cfg.get("metrics") or {}
    boundary, dilation = bool(mcfg.get("boundary", False)), float(mcfg.get("dilation_ratio", 0.02))
    run_dir = run_dir_of(cfg)
    results_path = Path(str(cfg.get("results_json") or run_dir / "results.json")).expanduser()
    check_output_dir(results_path.parent)
    save_dir = Path(str(cfg.save_predictions)).expanduser() if cfg.get("save_predictions") else None
    if save_dir is not None:
        check_output_dir(save_dir)
    device = resolve_device(str(cfg.get("device", "auto")))
    before = _metrics(info.num_classes, boundary, dilation)
    after = _metrics(info.num_classes, boundary, dilation)
    per_image, errors = [], []
    t0 = time.perf_counter()
    for sample in _samples(dataset):
        key = str(sample["id"])
        if sample.get("error"):
            errors.append({"id": key, "error": " ".join(str(sample["error"]).split())})
            continue
        scores = load_scores(files[key], info.num_classes).to(device)
        target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64)).to(device)
        h, w = target.shape
        labels_before, _ = resize_argmax(scores, h, w)
        t1 = time.perf_counter()
        labels_after = _refine(refiner, sample["image"], scores, config, device)
        seconds = time.perf_counter() - t1
        for metrics, labels in ((before, labels_before), (after, labels_after)):
            for metric in metrics.values():
                metric.update(labels.to(device), target)
        if save_dir is not None:
            save_png(label_image(labels_after.cpu().numpy()), save_dir / f"{key}.png")
        per_image.append(
            {
                "id": key,
                "mIoU_before": 100.0 * float(per_image_miou(labels_before, target, info.num_classes)),
                "mIoU_after": 100.0
                * float(per_image_miou(labels_after.to(device), target, info.num_classes)),
                "seconds": round(seconds, 6),
            }
        )
    wall = time.perf_counter() - t0
    if not per_image:
        raise UserError(
            f"no image of {info.name} could be scored ({len(errors)} error(s)); first: {errors[0]['error']}"
        )
    results = {
        "dataset": info.name,
        "task": "refine",
        "refiner": refiner,
        "scores": str(folder.resolve()),
        "before": _summary(before),
        "after": _summary(after),
        "num_images": len(per_image),
        "errors": errors,
        "wall_seconds": round(wall, 3),
        "version": __version__,
        "config": plain(cfg),
        "per_image": per_image,
    }
    with atomic_write(results_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print()
    print(refine_table(results).to_text())
    print(f"\n{info.name}: {len(per_image)} image(s) refined in {wall:.1f}s; results: {results_path}")
    for e in errors:
        print(f"  could not evaluate {e['id']}: {e['error']}")
    return results


def _samples(dataset: SegmentationDataset):
    for i in range(len(dataset)):
        yield dataset[i]


@torch.inference_mode()
def _refine(
    refiner: str, image: np.ndarray, scores: torch.Tensor, config: Any, device: torch.device
) -> torch.Tensor:
    h, w = image.shape[:2]
    if refiner == "lposs_plus":  # pixel stage at the window.*_side resize (docs/method.md §1)
        win = config.window
        return refine(
            image,
            scores,
            device=device,
            short_side=win.short_side,
            long_side=win.long_side,
            **config.pixel.solver_kwargs(),
        ).labels
    if refiner == "pamr":
        full = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        rgb = torch.from_numpy(image).to(device).permute(2, 0, 1).float() / 255.0
        return PAMRStep()(rgb, full).argmax(dim=0)
    labels, _ = resize_argmax(scores, h, w)
    return labels


def refine_table(results: dict[str, Any]) -> Table:
    """Before/after rows of a refine run: mIoU (and Boundary IoU) on its dataset."""
    dataset = DATASET_COLUMNS.get(results["dataset"], results["dataset"])
    metrics = [("mIoU", "mIoU")] + (
        [("boundary_iou", "Boundary IoU")] if "boundary_iou" in results["before"] else []
    )
    header = ("scores", *[f"{dataset} {title}" for _, title in metrics])
    rows = []
    for label, part in (("before (argmax)", "before"), (f"after ({results['refiner']})", "after")):
        rows.append((label, tuple(f"{results[part][key]:.1f}" for key, _ in metrics)))
    return Table("refine (%)", header, tuple(rows))
