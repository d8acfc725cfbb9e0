"""``task=refine``: refine any method's saved score maps with LPOSS+'s pixel stage (or PAMR) and score
the labels before and after in one table.

    python run.py task=refine dataset=voc20 scores=DIR                      # DIR/<id>.npz or <id>.npy
    python run.py task=refine dataset=voc20 scores=DIR refiner=pamr metrics.boundary=true
    python run.py task=refine dataset=voc20 scores=DIR pixel.r=9 save_predictions=refined/

A score file holds ``[C, h, w]`` class scores at any resolution (``.npy``, or ``.npz`` with a ``scores``
array and optionally ``classes``), or the window grids ``task=evaluate save_scores=DIR`` writes for
MaskCLIP / LPOSS (stitched here as the predictor does, :mod:`lposs_lab.score_files`). "Before" labels are
the scores resized bilinearly to the image and argmaxed (docs/method.md §5); "after" labels are those of
the refiner.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lposs_lab import __version__
from lposs_lab.config import LPOSSConfig
from lposs_lab.errors import ConfigError, UserError
from lposs_lab.files import atomic_write
from lposs_lab.postprocess import PAMRStep
from lposs_lab.predictor import resolve_device
from lposs_lab.refine import refine
from lposs_lab.score_files import PatchGrids, ScoreFileError, read_score_file
from lposs_lab.viz import label_image, save_png
from lposs_lab.windows import resize_argmax

from ..data.benchmarks import BenchmarkInfo
from ..data.dataset import SegmentationDataset
from ..metrics import DILATION_RATIO, BoundaryIoU, SegmentationIoU, per_image_miou
from ..tables import DATASET_COLUMNS, Table
from .config import check_output_dir, lposs_config, plain, run_dir_of
from .evaluate import dataset_of

__all__ = [
    "REFINERS",
    "RefinePlan",
    "plan_refine",
    "run_refine",
    "write_refine_results",
    "refine_task",
    "score_file",
    "load_scores",
]

REFINERS = ("lposs_plus", "pamr", "none")


def score_file(folder: Path, image_id: str) -> Path | None:
    """``<folder>/<id>.npz`` or ``<id>.npy`` (the first that exists), None when neither does."""
    for suffix in (".npz", ".npy"):
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def load_scores(path: Path, num_classes: int) -> torch.Tensor:
    """``[C, h, w]`` float32 scores of ``path`` (either form of :mod:`lposs_lab.score_files`: the full map,
    or window grids stitched as the predictor does), checked against the benchmark's class count.

    Raises:
        UserError: unreadable file, no ``scores``/``grids`` array in an ``.npz``, not 3-D, wrong class count.
    """
    try:
        scores, _ = read_score_file(path)
    except ScoreFileError as exc:
        raise UserError(str(exc)) from None
    count = scores.num_classes if isinstance(scores, PatchGrids) else scores.shape[0]
    if count != num_classes:
        raise UserError(
            f"score file {path} has {count} classes, the benchmark {num_classes}; "
            "save scores in the benchmark's class order"
        )
    return scores.scores() if isinstance(scores, PatchGrids) else scores


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


@dataclass
class RefinePlan:
    """Everything one ``task=refine`` run needs, checked, before anything is computed or written."""

    info: BenchmarkInfo
    dataset: SegmentationDataset
    refiner: str
    config: LPOSSConfig
    folder: Path
    files: dict[str, Path]
    boundary: bool
    dilation_ratio: float
    results_path: Path
    save_dir: Path | None
    device: torch.device
    progress_bar: bool
    resolved: dict[str, Any]


@dataclass
class RefineRun:
    """What :func:`run_refine` measured: the before/after metrics, per-image rows, errors, seconds."""

    before: dict[str, Any]
    after: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    wall: float = 0.0


def plan_refine(cfg: DictConfig) -> RefinePlan:
    """Check the dataset, the refiner, the pixel/window options, the score files and the outputs."""
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
    results_path = Path(str(cfg.get("results_json") or run_dir_of(cfg) / "results.json")).expanduser()
    check_output_dir(results_path.parent)
    save_dir = Path(str(cfg.save_predictions)).expanduser() if cfg.get("save_predictions") else None
    if save_dir is not None:
        check_output_dir(save_dir)
    return RefinePlan(
        info=info,
        dataset=dataset,
        refiner=refiner,
        config=config,
        folder=folder,
        files={k: p for k, p in files.items() if p is not None},
        boundary=bool(mcfg.get("boundary", False)),
        dilation_ratio=float(mcfg.get("dilation_ratio", DILATION_RATIO)),
        results_path=results_path,
        save_dir=save_dir,
        device=resolve_device(str(cfg.get("device", "auto"))),
        progress_bar=bool((cfg.get("trainer") or {}).get("enable_progress_bar", True)),
        resolved=plain(cfg),
    )


def run_refine(plan: RefinePlan) -> RefineRun:
    """Refine every image's saved scores; score the labels before and after (a bar counts the images)."""
    from tqdm.auto import tqdm

    info = plan.info
    run = RefineRun(
        _metrics(info.num_classes, plan.boundary, plan.dilation_ratio),
        _metrics(info.num_classes, plan.boundary, plan.dilation_ratio),
    )
    t0 = time.perf_counter()
    # on a terminal only (tqdm's disable=None): logs and captured stderr keep just our own lines
    disable = None if plan.progress_bar else True
    bar = tqdm(total=len(plan.dataset), desc=f"Refining {info.name}", unit="img", disable=disable)
    try:
        for sample in _samples(plan.dataset):
            key = str(sample["id"])
            bar.update(1)
            if sample.get("error"):
                run.errors.append({"id": key, "error": " ".join(str(sample["error"]).split())})
                continue
            run.per_image.append(_refine_one(plan, run, sample))
    except BaseException:
        bar.leave = False  # a failing run clears its bar: the error is the last thing on the terminal
        raise
    finally:
        bar.close()
    run.wall = time.perf_counter() - t0
    if not run.per_image:
        raise UserError(
            f"no image of {info.name} could be scored ({len(run.errors)} error(s)); "
            f"first: {run.errors[0]['error']}"
        )
    return run


def _refine_one(plan: RefinePlan, run: RefineRun, sample: dict[str, Any]) -> dict[str, Any]:
    """Refine one sample, add its labels to the metrics, save them; its per-image row."""
    key, device, n = str(sample["id"]), plan.device, plan.info.num_classes
    scores = load_scores(plan.files[key], n).to(device)
    target = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64)).to(device)
    labels_before, _ = resize_argmax(scores, *target.shape)
    t1 = time.perf_counter()
    labels_after = _refine(plan.refiner, sample["image"], scores, plan.config, device).to(device)
    seconds = time.perf_counter() - t1
    for metrics, labels in ((run.before, labels_before), (run.after, labels_after)):
        for metric in metrics.values():
            metric.update(labels, target)
    if plan.save_dir is not None:
        save_png(label_image(labels_after.cpu().numpy()), plan.save_dir / f"{key}.png")
    return {
        "id": key,
        "mIoU_before": 100.0 * float(per_image_miou(labels_before, target, n)),
        "mIoU_after": 100.0 * float(per_image_miou(labels_after, target, n)),
        "seconds": round(seconds, 6),
    }


def write_refine_results(plan: RefinePlan, run: RefineRun) -> dict[str, Any]:
    """``results.json`` (atomically) and the before/after table."""
    results = {
        "dataset": plan.info.name,
        "task": "refine",
        "refiner": plan.refiner,
        "scores": str(plan.folder.resolve()),
        "before": _summary(run.before),
        "after": _summary(run.after),
        "num_images": len(run.per_image),
        "errors": run.errors,
        "wall_seconds": round(run.wall, 3),
        "version": __version__,
        "config": plan.resolved,
        "per_image": run.per_image,
    }
    with atomic_write(plan.results_path, "w") as fh:
        json.dump(results, fh, indent=1)
    print()
    print(refine_table(results).to_text())
    print(
        f"\n{plan.info.name}: {len(run.per_image)} image(s) refined in {run.wall:.1f}s; "
        f"results: {plan.results_path}"
    )
    for e in run.errors:
        print(f"  could not evaluate {e['id']}: {e['error']}")
    return results


def refine_task(cfg: DictConfig) -> dict[str, Any]:
    """Run ``task=refine``: :func:`plan_refine` -> :func:`run_refine` -> :func:`write_refine_results`."""
    plan = plan_refine(cfg)
    return write_refine_results(plan, run_refine(plan))


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
