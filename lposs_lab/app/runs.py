"""Finished runs for the Runs tab, without Gradio: every ``results.json`` below a folder (evaluate runs,
multiruns, refine runs), their table, per-class and per-image numbers, and the files behind one image."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lposs_lab.image_io import load_image
from lposs_lab.lab.data.benchmarks import find_samples, get_benchmark, load_label
from lposs_lab.lab.records import class_display_names
from lposs_lab.lab.tables import method_label, run_info

__all__ = ["Run", "scan_runs", "runs_table", "TABLE_COLUMNS", "per_image_rows", "compare_rows", "ImageFiles"]

TABLE_COLUMNS = [
    "run", "experiment/table", "dataset", "vm", "vlm", "method", "differs", "mIoU", "Boundary IoU",
    "images", "date",
]  # fmt: skip
#: Config sections whose values may tell runs apart (the "differs" column).
HPARAM_SECTIONS = ("lp", "pixel", "window", "predict", "postprocess", "metrics")


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def pct1(x: Any) -> str:
    """A percentage with one decimal, ``-`` for none."""
    v = _num(x)
    return "-" if v is None else f"{v:.1f}"


@dataclass
class Run:
    """One ``results.json``: its place below the runs folder and the numbers the tab shows."""

    key: str
    source: Path
    data: dict[str, Any]
    per_image: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config") or {}

    @property
    def is_refine(self) -> bool:
        return self.data.get("task") == "refine"

    @property
    def dataset(self) -> str:
        return str(self.data.get("dataset") or "?")

    @property
    def method(self) -> str:
        if self.is_refine:
            return f"refine: {self.data.get('refiner')}"
        return method_label(str(self.data.get("method") or "?"))

    def _part(self) -> Mapping[str, Any]:
        return self.data.get("after") or {} if self.is_refine else self.data

    @property
    def miou(self) -> float | None:
        return _num(self._part().get("mIoU"))

    @property
    def boundary_iou(self) -> float | None:
        return _num(self._part().get("boundary_iou"))

    @property
    def per_class(self) -> dict[str, float | None]:
        return {k: _num(v) for k, v in (self._part().get("per_class_iou") or {}).items()}

    def encoder(self, kind: str) -> str:
        node = self.config.get(kind)
        return str(node.get("name")) if isinstance(node, Mapping) else str(node or "-")

    @property
    def date(self) -> str:
        stamp = _dt.datetime.fromtimestamp(self.source.stat().st_mtime, tz=_dt.timezone.utc)
        return stamp.strftime("%Y-%m-%d %H:%M")

    @property
    def data_root(self) -> Path | None:
        root = self.config.get("data_root") or (self.config.get("paths") or {}).get("data_dir")
        return Path(str(root)).expanduser() if root else None

    @property
    def predictions_dir(self) -> Path | None:
        folder = self.config.get("save_predictions")
        return Path(str(folder)).expanduser() if folder else None

    def label(self) -> str:
        return f"{self.key}  ({self.dataset}, {self.method}, mIoU {pct1(self.miou)})"


def _per_image(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = "mIoU_after" if data.get("task") == "refine" else "mIoU"
    return [{"id": str(r["id"]), "mIoU": _num(r.get(key)), "seconds": r.get("seconds")}
            for r in data.get("per_image") or [] if "id" in r]  # fmt: skip


def scan_runs(root: str | Path) -> tuple[list[Run], list[str]]:
    """Every readable ``results.json`` below ``root`` (sorted by path) and one line per unreadable one."""
    root = Path(root).expanduser()
    runs, problems = [], []
    if not root.is_dir():
        return [], [f"runs folder {root} does not exist"]
    for path in sorted(root.rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path.relative_to(root)}: unreadable ({type(exc).__name__})")
            continue
        if not isinstance(data, dict) or "dataset" not in data:
            problems.append(f"{path.relative_to(root)}: not a results.json of a run")
            continue
        key = path.parent.relative_to(root).as_posix() or "."
        runs.append(Run(key, path, data, _per_image(data)))
    return runs, problems


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True, default=str)}


def differing(runs: Sequence[Run]) -> dict[str, dict[str, str]]:
    """Run key -> ``{hyperparameter: value}`` of the hyperparameters whose values differ between runs."""
    flats = {r.key: _flat({s: r.config.get(s) for s in HPARAM_SECTIONS}) for r in runs}
    keys = sorted({k for f in flats.values() for k in f})
    varying = [k for k in keys if len({f.get(k) for f in flats.values()}) > 1]
    return {key: {k: f.get(k, "-") for k in varying} for key, f in flats.items()}


def runs_table(runs: Sequence[Run]) -> list[list[Any]]:
    """One row per run, columns :data:`TABLE_COLUMNS` (mIoU and Boundary IoU in percent, one decimal)."""
    diff = differing(runs)
    rows = []
    for r in runs:
        info = run_info(r.data)
        table = info.get("experiment") or info["table"]
        rows.append([
            r.key, str(table), r.dataset, r.encoder("vm"), r.encoder("vlm"), r.method,
            ", ".join(f"{k}={v}" for k, v in diff[r.key].items()), pct1(r.miou), pct1(r.boundary_iou),
            len(r.per_image) or r.data.get("num_images") or 0, r.date,
        ])  # fmt: skip
    return rows


def per_image_rows(run: Run) -> list[dict[str, Any]]:
    """The run's per-image records, worst mIoU first (images without a score last, then by id)."""
    return sorted(run.per_image, key=lambda r: (r["mIoU"] is None, r["mIoU"] or 0.0, r["id"]))


def compare_rows(a: Run, b: Run) -> list[dict[str, Any]]:
    """Per-image ``mIoU_b - mIoU_a`` on the images both runs scored, most negative first.

    Raises:
        ValueError: the runs are on different datasets.
    """
    if a.dataset != b.dataset:
        raise ValueError(f"runs {a.key} ({a.dataset}) and {b.key} ({b.dataset}) are on different datasets")
    ma = {r["id"]: r["mIoU"] for r in a.per_image}
    rows = [
        {"id": r["id"], "a": ma[r["id"]], "b": r["mIoU"], "delta": r["mIoU"] - ma[r["id"]]}
        for r in b.per_image
        if r["id"] in ma and r["mIoU"] is not None and ma[r["id"]] is not None
    ]
    return sorted(rows, key=lambda r: (r["delta"], r["id"]))


@lru_cache(maxsize=16)
def _samples(dataset: str, root: str) -> dict[str, tuple[str, str]]:
    return {k: (str(i), str(lb)) for k, i, lb in find_samples(get_benchmark(dataset), root)}


@dataclass
class ImageFiles:
    """One image of a run: the decoded image, ground truth and prediction (None when not kept)."""

    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray | None
    class_names: list[str]
    note: str = ""


def image_files(run: Run, image_id: str) -> ImageFiles:
    """Read image ``image_id`` of ``run`` from the data folder the run names and its saved prediction.

    Raises:
        lposs_lab.errors.UserError: the data folder, the image or its label cannot be read.
    """
    info = get_benchmark(run.dataset)
    root = run.data_root
    if root is None:
        raise FileNotFoundError(f"run {run.key} names no data folder (config data_root)")
    samples = _samples(info.name, str(root))
    if image_id not in samples:
        raise FileNotFoundError(f"image {image_id!r} is not in {info.name} under {root}")
    img_path, lbl_path = samples[image_id]
    image = load_image(img_path)
    truth = load_label(lbl_path, info.reduce_zero_label)
    pred, note = None, ""
    folder = run.predictions_dir
    if folder is not None and (folder / f"{image_id}.png").is_file():
        pred = load_label(folder / f"{image_id}.png")
    elif folder is not None:
        note = f"no saved prediction {folder / (image_id + '.png')}"
    else:
        note = (
            "this run did not keep its predictions: rerun it with save_predictions=DIR "
            "(e.g. python run.py ... save_predictions=outputs/preds) to see them here"
        )
    return ImageFiles(image, truth, pred, class_display_names(info.classes), note)


def allowed_folders(runs: Sequence[Run]) -> list[Path]:
    """The data and prediction folders the runs name (the server may read files below them)."""
    out = []
    for r in runs:
        for p in (r.data_root, r.predictions_dir):
            if p is not None and p.is_dir() and p.resolve() not in out:
                out.append(p.resolve())
    return out
