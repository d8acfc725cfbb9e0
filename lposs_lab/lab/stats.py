"""Confidence intervals and paired comparisons by an image-level bootstrap of the per-image counts.

A split's scores are functions of count totals (per-class intersection and union, correct and labelled
pixels, the Boundary IoU band counts). One bootstrap resample draws ``N`` of the split's ``N`` images with
replacement, sums their counts and recomputes the scores exactly as :mod:`lposs_lab.lab.metrics` does: a class
whose union is 0 in a resample is left out of that resample's mean, as the metric leaves it out of the
split's. The interval is the percentile interval of the resampled scores.

Resample ``r`` draws its images as ``rng.integers(0, N, size=N)``, ``rng = numpy.random.default_rng(seed)``,
resample after resample (drawing a ``[R, N]`` block at once gives the same indices). The sums are a weight
matrix ``W [R, N]`` (how often each image was drawn) times the counts ``[N, K]`` in float64, chunked over
``R``; counts up to 2**53 are summed exactly.

:func:`paired_bootstrap` applies the same resamples to two runs scored on the same images (the images are
resampled jointly), so the interval of ``A - B`` reflects only how the two methods differ on the images,
not how hard the images are. Its two-sided p-value is ``min(1, 2 * min(P(D* <= 0), P(D* >= 0)))`` with each
probability estimated as ``(1 + #resamples on that side) / (1 + R)``; a difference is *significant* when its
interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lposs_lab.errors import ConfigError

__all__ = [
    "CIConfig",
    "bootstrap",
    "bootstrap_metrics",
    "paired_bootstrap",
    "record_counts",
    "resample_weights",
    "results_intervals",
    "score_rows",
]

#: the count families of the records and the states each holds (``SegmentationIoU``, ``BoundaryIoU``)
FAMILIES: dict[str, tuple[str, ...]] = {
    "iou": ("intersection", "union", "correct", "labeled"),
    "boundary": ("intersection", "union"),
}

#: bytes of the float64 weight block of one chunk of resamples
_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class CIConfig:
    """How intervals are computed (``metrics.ci``): level, number of resamples (0: none), seed."""

    level: float = 0.95
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int | float) or not 0 < self.level < 1:
            raise ConfigError(f"metrics.ci.level={self.level!r} is out of range; valid: a number in (0, 1)")
        for key, low in (("resamples", 0), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"metrics.ci.{key}={value!r} is out of range; valid: an integer >= {low}"
                    + (" (0 turns intervals off)" if key == "resamples" else "")
                )

    @property
    def enabled(self) -> bool:
        return self.resamples > 0

    def as_dict(self) -> dict[str, Any]:
        return {"level": float(self.level), "resamples": int(self.resamples), "seed": int(self.seed)}


def resample_weights(
    num_images: int, resamples: int, seed: int, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """The bootstrap weights, chunk by chunk: ``[r, N]`` float64, how often each image is in each resample.

    Resample ``i`` is ``rng.integers(0, N, size=N)`` of ``rng = default_rng(seed)``, in order; each row sums
    to ``N``. ``chunk``: resamples per block (default: a block of about 32 MiB).
    """
    if num_images < 1:
        raise ValueError(f"need at least one image to resample, got {num_images}")
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, _CHUNK_BYTES // (8 * num_images))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        idx = rng.integers(0, num_images, size=(r, num_images))
        flat = (idx + num_images * np.arange(r)[:, None]).ravel()
        yield np.bincount(flat, minlength=r * num_images).reshape(r, num_images).astype(np.float64)


def bootstrap(
    columns: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    seed: int,
    chunk: int | None = None,
) -> np.ndarray:
    """Resampled statistics of per-image columns.

    Args:
        columns: ``[N, K]`` per-image counts (any numeric dtype; summed in float64).
        statistic: maps summed counts ``[r, K]`` to statistics ``[r, M]`` (NaN where undefined).
        resamples: ``R``.
        seed: see :func:`resample_weights`.

    Returns:
        ``[R, M]`` float64.
    """
    cols = np.asarray(columns, dtype=np.float64)
    if cols.ndim != 2:
        raise ValueError(f"columns must be [N, K], got shape {cols.shape}")
    parts = [statistic(w @ cols) for w in resample_weights(cols.shape[0], resamples, seed, chunk)]
    if not parts:
        return np.zeros((0, statistic(cols.sum(0, keepdims=True)).shape[1]))
    return np.concatenate(parts)


def _iou(inter: np.ndarray, union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mIoU [r], IoU [r, C])`` of summed counts ``[r, C]``: NaN where the union is 0 (not in the mean)."""
    valid = union > 0
    iou = np.where(valid, inter / np.where(valid, union, 1.0), np.nan)
    n = valid.sum(1)
    miou = np.where(n > 0, np.where(valid, iou, 0.0).sum(1) / np.maximum(n, 1), np.nan)
    return miou, iou


class _Layout:
    """Where each count of a run sits in the ``[N, K]`` column block, and the scores computed from them.

    Scores (one column each, in this order): ``mIoU``, ``pixel_accuracy``, ``per_class_iou`` x C, then with
    boundary counts ``boundary_iou``, ``per_class_boundary_iou`` x C.
    """

    def __init__(self, counts: Mapping[str, Mapping[str, Any]]) -> None:
        if "iou" not in counts:
            raise ValueError(f"counts need an 'iou' family, got {sorted(counts)}")
        blocks, self.slices, n, width = [], {}, None, 0
        for fam in [f for f in FAMILIES if f in counts]:
            for name in FAMILIES[fam]:
                if name not in counts[fam]:
                    raise ValueError(f"counts[{fam!r}] lacks {name!r} (needs {list(FAMILIES[fam])})")
                a = np.asarray(counts[fam][name], dtype=np.float64)
                a = a[:, None] if a.ndim == 1 else a
                if a.ndim != 2 or (n is not None and a.shape[0] != n):
                    raise ValueError(f"counts[{fam!r}][{name!r}] has shape {a.shape}; expected [N] or [N, C]")
                n = a.shape[0]
                self.slices[(fam, name)] = slice(width, width + a.shape[1])
                width += a.shape[1]
                blocks.append(a)
        self.columns = np.concatenate(blocks, axis=1)
        self.num_classes = (
            self.slices[("iou", "intersection")].stop - self.slices[("iou", "intersection")].start
        )
        self.boundary = "boundary" in counts
        self.width = width

    def scores(self, sums: np.ndarray) -> np.ndarray:
        """``[r, K]`` summed counts -> ``[r, 2 + C (+ 1 + C)]`` scores in [0, 1]."""
        s = self.slices
        miou, iou = _iou(sums[:, s[("iou", "intersection")]], sums[:, s[("iou", "union")]])
        labeled = sums[:, s[("iou", "labeled")]][:, 0]
        acc = np.where(labeled > 0, sums[:, s[("iou", "correct")]][:, 0] / np.maximum(labeled, 1), np.nan)
        out = [miou[:, None], acc[:, None], iou]
        if self.boundary:
            bmiou, biou = _iou(sums[:, s[("boundary", "intersection")]], sums[:, s[("boundary", "union")]])
            out += [bmiou[:, None], biou]
        return np.concatenate(out, axis=1)

    def named(self, values: Sequence[Any]) -> dict[str, Any]:
        """Split a row of score columns into ``{"mIoU", "pixel_accuracy", "per_class_iou", ...}``."""
        c = self.num_classes
        out = {"mIoU": values[0], "pixel_accuracy": values[1], "per_class_iou": list(values[2 : 2 + c])}
        if self.boundary:
            out["boundary_iou"] = values[2 + c]
            out["per_class_boundary_iou"] = list(values[3 + c : 3 + 2 * c])
        return out


def _percentile(stats: np.ndarray, level: float) -> list[list[float] | None]:
    """Percentile interval per column of ``[R, M]`` over its finite values; None for a column with none."""
    out: list[list[float] | None] = []
    q = [(1 - level) / 2, (1 + level) / 2]
    for col in stats.T:
        col = col[np.isfinite(col)]
        out.append(None if col.size == 0 else [float(v) for v in np.quantile(col, q)])
    return out


def _scaled(x: Any, scale: float) -> Any:
    if x is None:
        return None
    if isinstance(x, list):
        return [_scaled(v, scale) for v in x]
    v = float(x)
    return None if math.isnan(v) else scale * v


def bootstrap_metrics(
    counts: Mapping[str, Mapping[str, Any]],
    *,
    level: float = CIConfig.level,
    resamples: int = CIConfig.resamples,
    seed: int = CIConfig.seed,
    scale: float = 100.0,
) -> dict[str, Any]:
    """Percentile intervals of a split's scores from its per-image counts.

    Args:
        counts: ``{"iou": {"intersection": [N, C], "union": [N, C], "correct": [N], "labeled": [N]},
            optionally "boundary": {"intersection": [N, C], "union": [N, C]}}`` (see :func:`record_counts`).
        level, resamples, seed: see :class:`CIConfig` (``resamples >= 1``).
        scale: unit of the result (100: percent, as ``results.json``).

    Returns:
        ``{"mIoU": [low, high], "pixel_accuracy": [low, high], "per_class_iou": [[low, high] | None] * C}``,
        plus ``"boundary_iou"`` and ``"per_class_boundary_iou"`` with boundary counts; None where a score is
        undefined in every resample (a class never present).
    """
    CIConfig(level, resamples, seed)
    if resamples < 1:
        raise ValueError("bootstrap_metrics needs resamples >= 1")
    layout = _Layout(counts)
    stats = bootstrap(layout.columns, layout.scores, resamples, seed)
    return {k: _scaled(v, scale) for k, v in layout.named(_percentile(stats, level)).items()}


def _p_value(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of finite resampled differences (see the module docstring)."""
    r = deltas.size
    below = (1 + int((deltas <= 0).sum())) / (1 + r)
    above = (1 + int((deltas >= 0).sum())) / (1 + r)
    return min(1.0, 2 * min(below, above))


def paired_bootstrap(
    counts_a: Mapping[str, Mapping[str, Any]],
    counts_b: Mapping[str, Mapping[str, Any]],
    *,
    metric: str = "mIoU",
    level: float = CIConfig.level,
    resamples: int = CIConfig.resamples,
    seed: int = CIConfig.seed,
    scale: float = 100.0,
) -> dict[str, Any]:
    """``A - B`` of one score for two runs on the same images, with the images resampled jointly.

    Args:
        counts_a, counts_b: per-image counts (see :func:`bootstrap_metrics`) in the same image order.
        metric: ``"mIoU"``, ``"pixel_accuracy"`` or ``"boundary_iou"`` (per-class deltas for the IoUs).

    Returns:
        ``{"metric", "a", "b", "delta", "ci": [low, high], "p_value", "significant", "level", "resamples",
        "seed", "num_images", "per_class": [{"index", "a", "b", "delta", "ci"}]}`` in ``scale`` units;
        ``per_class`` holds the classes scored in both runs, largest ``|delta|`` first.
    """
    CIConfig(level, resamples, seed)
    la, lb = _Layout(counts_a), _Layout(counts_b)
    n = la.columns.shape[0]
    if lb.columns.shape[0] != n or la.num_classes != lb.num_classes:
        raise ValueError(
            f"runs differ in images or classes: {n} x {la.num_classes} vs "
            f"{lb.columns.shape[0]} x {lb.num_classes}"
        )
    keys = {
        "mIoU": (0, 2),
        "pixel_accuracy": (1, None),
        "boundary_iou": (2 + la.num_classes, 3 + la.num_classes),
    }
    if metric not in keys:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(keys)}")
    if metric == "boundary_iou" and not (la.boundary and lb.boundary):
        raise ValueError("boundary_iou needs Boundary IoU counts in both runs (metrics.boundary=true)")
    col, per_class = keys[metric]
    c = la.num_classes
    cols = [col] + (list(range(per_class, per_class + c)) if per_class is not None else [])

    def diff(sums: np.ndarray) -> np.ndarray:
        a, b = la.scores(sums[:, : la.width])[:, cols], lb.scores(sums[:, la.width :])[:, cols]
        return np.concatenate([a, b, a - b], axis=1)

    both = np.concatenate([la.columns, lb.columns], axis=1)
    point = diff(both.sum(0, keepdims=True))[0]
    m = len(cols)
    if resamples > 0:
        stats = bootstrap(both, diff, resamples, seed)[:, 2 * m :]
        intervals = _percentile(stats, level)
    else:
        stats, intervals = np.zeros((0, m)), [None] * m
    main = stats[:, 0][np.isfinite(stats[:, 0])]
    ci = intervals[0]
    rows = []
    for j in range(1, m):
        if np.isfinite(point[2 * m + j]):
            rows.append(
                {
                    "index": j - 1,
                    "a": _scaled(point[j], scale),
                    "b": _scaled(point[m + j], scale),
                    "delta": _scaled(point[2 * m + j], scale),
                    "ci": _scaled(intervals[j], scale),
                }
            )
    rows.sort(key=lambda r: (-abs(r["delta"]), r["index"]))
    return {
        "metric": metric,
        "a": _scaled(point[0], scale),
        "b": _scaled(point[m], scale),
        "delta": _scaled(point[2 * m], scale),
        "ci": _scaled(ci, scale),
        "p_value": _p_value(main) if main.size else None,
        "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
        "level": float(level),
        "resamples": int(resamples),
        "seed": int(seed),
        "num_images": int(n),
        "per_class": rows,
    }


def record_counts(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """``(ids, counts)`` of the scored per-image records (error records are left out), int64 arrays.

    ``counts`` is ``{"iou": {...}}`` plus ``"boundary"`` when every scored record holds boundary counts.
    """
    scored = [r for r in records if "error" not in r]
    ids = [str(r["id"]) for r in scored]
    counts: dict[str, dict[str, np.ndarray]] = {}
    for fam, names in FAMILIES.items():
        if scored and all(fam in r for r in scored):
            counts[fam] = {n: np.asarray([r[fam][n] for r in scored], dtype=np.int64) for n in names}
    return ids, counts


def score_rows(counts: Mapping[str, Mapping[str, Any]], scale: float = 100.0) -> dict[str, Any]:
    """The split's own scores from per-image counts (the point estimate the intervals belong to)."""
    layout = _Layout(counts)
    values = layout.scores(layout.columns.sum(0, keepdims=True))[0]
    return {k: _scaled(v, scale) for k, v in layout.named(list(values)).items()}


def results_intervals(
    records: Sequence[Mapping[str, Any]], classes: Sequence[str], ci: CIConfig, *, boundary: bool = False
) -> dict[str, Any]:
    """The interval fields of ``results.json`` (percent): ``mIoU_ci``, ``pixel_accuracy_ci``,
    ``per_class_iou_ci`` (by display name), with ``boundary`` also ``boundary_iou_ci`` and
    ``per_class_boundary_iou_ci``, and ``ci`` (the settings). ``{"ci": None}`` when ``ci`` is off."""
    from .records import class_display_names  # torch/torchmetrics: only when intervals are computed

    if not ci.enabled:
        return {"ci": None}
    names = class_display_names(classes)
    _, counts = record_counts(records)
    if not boundary:
        counts.pop("boundary", None)
    keys = ["mIoU", "pixel_accuracy", "per_class_iou"] + (
        ["boundary_iou", "per_class_boundary_iou"] if boundary else []
    )
    if "iou" not in counts or (boundary and "boundary" not in counts):
        res: dict[str, Any] = {
            k: None if not k.startswith("per_class") else [None] * len(names) for k in keys
        }
    else:
        res = bootstrap_metrics(counts, level=ci.level, resamples=ci.resamples, seed=ci.seed)
    out = {
        f"{k}_ci": dict(zip(names, res[k], strict=True)) if k.startswith("per_class") else res[k]
        for k in keys
    }
    out["ci"] = ci.as_dict()
    return out
