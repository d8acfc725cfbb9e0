"""Tables of finished runs: one model (rows of numbers per dataset) rendered for the terminal or as markdown.

Runs are results dicts (``results.json`` of ``task=evaluate``). A table has one row per configuration, one
column per dataset in the paper's order, then ``Avg`` (when a row covers all 8 datasets) and ``Paper Avg``;
rows that are the paper's default setting get a ``paper`` row with docs/method.md §6's numbers under them, and
rows whose ``report.paper`` maps datasets to published numbers (``conf/experiment/own_*.yaml``) get a
``published`` row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATASET_COLUMNS",
    "PAPER",
    "PAPER_DATASETS",
    "Table",
    "config_value",
    "base_label",
    "cell",
    "ci_cell",
    "group_runs",
    "method_label",
    "predictor_label",
    "results_table",
    "row_labels",
    "run_info",
    "run_overrides",
    "varying_keys",
]

#: Column order and headers of the paper's Tables 1 and 2; a benchmark added here gets a column after them.
DATASET_COLUMNS: dict[str, str] = {
    "voc": "VOC",
    "coco_object": "Object",
    "context": "Context",
    "context59": "C59",
    "coco_stuff": "Stuff",
    "voc20": "VOC20",
    "ade20k": "ADE",
    "cityscapes": "City",
}

#: The 8 benchmarks of the paper's tables, in its order: ``Avg`` and the paper's averages are over these.
PAPER_DATASETS = ("voc", "coco_object", "context", "context59", "coco_stuff", "voc20", "ade20k", "cityscapes")


def _paper_row(*values: float) -> dict[str, float]:
    return dict(zip(PAPER_DATASETS, values, strict=True))


#: The paper's numbers (docs/method.md §6): ``PAPER[metric][method][dataset]`` in percent.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "mIoU": {
        "lposs": _paper_row(61.1, 33.4, 34.6, 37.8, 25.9, 78.8, 21.8, 37.3),
        "lposs_plus": _paper_row(62.4, 34.3, 35.4, 38.6, 26.5, 79.3, 22.3, 37.9),
    },
    "boundary_iou": {
        "lposs_plus": _paper_row(51.2, 20.4, 21.6, 27.1, 19.2, 71.7, 16.0, 29.5),
    },
}

_METHOD_LABELS = {
    "lposs": "LPOSS",
    "lposs_plus": "LPOSS+",
    "maskclip": "MaskCLIP",
    "oracle_patch": "Oracle (patch)",
    "predictions": "Predictions",
}


def method_label(method: str) -> str:
    """Display name of a method (``lposs_plus`` -> ``LPOSS+``)."""
    return _METHOD_LABELS.get(method, method)


def predictor_label(vlm: str | None) -> str | None:
    """Display name of an initial predictor other than MaskCLIP (``sclip_b16`` -> ``SCLIP``), else None:
    the registry entry's ``label`` (an unregistered name is its own label)."""
    from lposs_lab.models.registry import vlm_label  # the tables only: no torch, no model module

    return vlm_label(vlm)


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def run_overrides(run: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for o in run.get("overrides") or []:
        key, _, value = str(o).lstrip("+~").partition("=")
        out[key] = value
    return out


def run_info(run: Mapping[str, Any]) -> dict[str, Any]:
    """``{"table", "row", "paper_avg", "x"}`` of a run, from its config's ``report`` section when present."""
    config = run.get("config") or {}
    rep = config.get("report") or {}
    method = str(run.get("method") or "")
    return {
        "table": str(rep.get("table") or "runs"),
        "row": str(rep.get("row") or run.get("label") or method_label(method)),
        "paper_avg": rep.get("paper_avg"),
        "x": rep.get("x"),
        "experiment": rep.get("experiment"),
    }


def group_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs by ``report.table`` (``"runs"`` for runs without one), in first-seen order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(run_info(r)["table"], []).append(r)
    return groups


def varying_keys(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Override keys whose values differ between runs of one dataset (sweep parameters)."""
    keys: dict[str, set[str]] = {}
    for r in runs:
        for k, v in run_overrides(r).items():
            if k not in ("dataset", "data_root", "hydra.sweep.dir", "hydra.run.dir"):
                keys.setdefault(k, set()).add(v)
    by_ds: dict[str, int] = {}
    for r in runs:
        by_ds[str(r.get("dataset"))] = by_ds.get(str(r.get("dataset")), 0) + 1
    if max(by_ds.values(), default=0) < 2:
        return []
    return sorted(k for k, v in keys.items() if len(v) > 1)


def _base_label(run: Mapping[str, Any]) -> str:
    """``report.row``; else the method after the initial predictor unless MaskCLIP (``SCLIP + LPOSS+``)."""
    config = run.get("config") or {}
    row = (config.get("report") or {}).get("row")
    if row:
        return str(row)
    method = str(run.get("method"))
    predictor = predictor_label(config_value(config, "vlm.name"))
    if predictor is None:
        return method_label(method)
    return predictor if method == "maskclip" else f"{predictor} + {method_label(method)}"


def base_label(run: Mapping[str, Any]) -> str:
    """The row label of ``run`` without its sweep values (``SCLIP + LPOSS+``, ``LPOSS+``, ``report.row``)."""
    return _base_label(run)


def _row_label(run: Mapping[str, Any], varying: Sequence[str] | None) -> str:
    """``varying=None`` (nothing varies between the table's runs): the run's own label. Else its base label
    and ``varying``, the keys that vary among the runs sharing that base (none when the base already tells
    them apart: ``report.row``, or predictor + method)."""
    info = run_info(run)
    # runs made with random-init weights say so in every table (their numbers are meaningless)
    mark = " (random init)" if run.get("random_init") else ""
    if varying is None:
        return info["row"] + mark
    base = _base_label(run)
    if not varying:
        return base + mark
    ov = run_overrides(run)
    return base + " [" + ", ".join(f"{k}={ov.get(k, '-')}" for k in varying) + "]" + mark


def cell(x: Any) -> str:
    """A table cell: one decimal, ``-`` for a missing or NaN value."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.1f}"


@dataclass(frozen=True)
class Table:
    """A titled grid: ``header`` (first cell names the row labels) and rows of ``(label, cells)``."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, tuple[str, ...]], ...]

    def to_markdown(self) -> str:
        """GitHub markdown (the title is not included)."""
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in self.rows]
        return "\n".join(lines)

    def to_text(self) -> str:
        """Aligned plain text for the terminal, the title in the first header cell."""
        grid = [[self.title, *self.header[1:]], *[[label, *cells] for label, cells in self.rows]]
        widths = [max(len(row[i]) for row in grid) for i in range(len(self.header))]
        return "\n".join(
            "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(max(widths[i], 5)) for i, c in enumerate(row))
            for row in grid
        )


_TITLES = {"mIoU": ("mIoU (%)", "Table 1"), "boundary_iou": ("Boundary IoU (%)", "Table 2")}


def row_labels(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The row label each of ``runs`` gets in :func:`results_table` (same order as ``runs``)."""
    by_base: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_base.setdefault(_base_label(r), []).append(r)
    varying = {base: varying_keys(group) for base, group in by_base.items()} if varying_keys(runs) else {}
    return [_row_label(r, varying[_base_label(r)] if varying else None) for r in runs]


def ci_cell(x: Any, interval: Sequence[float] | None, style: str | None = "interval") -> str:
    """A cell with its confidence interval: ``42.1 [41.5, 42.7]`` (``style="interval"``), ``42.1 ±0.6``
    (``"pm"``: half the interval's width) or ``42.1`` (``None``, or no interval)."""
    if style is None or not interval or cell(x) == "-" or any(v is None for v in interval):
        return cell(x)
    low, high = float(interval[0]), float(interval[1])
    if style == "pm":
        return f"{cell(x)} ±{(high - low) / 2:.1f}"
    if style == "interval":
        return f"{cell(x)} [{low:.1f}, {high:.1f}]"
    raise ValueError(f"unknown interval style {style!r}; valid: interval, pm, None")


def results_table(
    runs: Sequence[Mapping[str, Any]],
    metric: str = "mIoU",
    *,
    paper: bool = True,
    all_datasets: bool = True,
    ci: str | None = None,
    marks: Mapping[tuple[str, str], str] | None = None,
) -> Table:
    """The paper-layout table of ``metric`` over ``runs``.

    Args:
        runs: results dicts; runs without ``metric`` are left out.
        metric: ``"mIoU"`` or ``"boundary_iou"`` (any key of the results dicts works).
        paper: add the paper's numbers (rows under default-setting rows, the ``Paper Avg`` column).
        all_datasets: a column for each of the 8 benchmarks (the report) or only for those present
            (the summary printed after one evaluation).
        ci: show each run's ``<metric>_ci`` interval: ``"interval"`` or ``"pm"`` (see :func:`ci_cell`).
        marks: ``{(row label, dataset): suffix}`` appended to those cells (e.g. the best row's marker).
    """
    labels = row_labels(runs)
    values: dict[str, dict[str, float | None]] = {}
    intervals: dict[str, dict[str, Any]] = {}
    meta: dict[str, tuple[str, Any, Any]] = {}
    for r, label in zip(runs, labels, strict=True):
        if metric not in r:
            continue
        values.setdefault(label, {})[str(r.get("dataset"))] = r.get(metric)
        intervals.setdefault(label, {})[str(r.get("dataset"))] = r.get(f"{metric}_ci")
        published = ((r.get("config") or {}).get("report") or {}).get("paper")
        meta[label] = (str(r.get("method")), run_info(r)["paper_avg"], published)
    present = {d for v in values.values() for d in v}
    datasets = [d for d in DATASET_COLUMNS if all_datasets or d in present]
    cols = datasets + sorted(present - set(DATASET_COLUMNS))
    title, table_name = _TITLES.get(metric, (metric, "paper"))
    marks = marks or {}

    def ours(label: str) -> tuple[str, ...]:
        vals, ivs = values[label], intervals[label]
        return tuple(ci_cell(vals.get(d), ivs.get(d), ci) + marks.get((label, d), "") for d in cols)

    rows: list[tuple[str, tuple[str, ...]]] = []
    for label, vals in values.items():
        method, paper_avg, published = meta[label]
        got = [vals.get(d) for d in PAPER_DATASETS]
        avg = sum(got) / len(got) if all(v is not None for v in got) else None
        ref = PAPER.get(metric, {}).get(method) if paper else None
        default_row = label == method_label(method)
        if paper and metric == "mIoU" and isinstance(published, Mapping) and published:
            pub = {d: float(v) for d, v in published.items() if v is not None}
            full = set(PAPER_DATASETS) <= set(pub)
            pub_avg = sum(pub[d] for d in PAPER_DATASETS) / len(PAPER_DATASETS) if full else None
            shown = paper_avg if paper_avg is not None else pub_avg
            rows.append((label, ours(label) + (cell(avg), cell(shown))))
            rows.append(("  published", tuple(cell(pub.get(d)) for d in cols) + (cell(pub_avg), "")))
            continue
        ref_avg = sum(ref.values()) / len(ref) if ref and default_row else None
        shown = (paper_avg if metric == "mIoU" and paper_avg is not None else ref_avg) if paper else None
        rows.append((label, ours(label) + (cell(avg), cell(shown))))
        if ref and default_row:
            rows.append(
                (f"  paper ({table_name})", tuple(cell(ref.get(d)) for d in cols) + (cell(ref_avg), ""))
            )
    header = ("configuration", *[DATASET_COLUMNS.get(d, d) for d in cols], "Avg", "Paper Avg")
    return Table(title, header, tuple(rows))
