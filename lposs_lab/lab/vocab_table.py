"""The vocabulary robustness table: mIoU of one method under each vocabulary and its drop from ``default``.

Runs are ``results.json`` dicts; each names its ``vocabulary`` (runs written before there was one used
``default``). One row per (configuration, dataset) that was scored under ``default`` and at least one other
vocabulary, in the paper's dataset order, then (for two datasets or more) an ``Avg`` row over the datasets
every vocabulary covers.

A cell is ``mIoU [low, high]`` with the run's bootstrap interval ``mIoU_ci`` when it has one. The drop is
``mIoU(vocabulary) - mIoU(default)`` (negative: worse than the default names); its interval, when both runs
have one, is ``[low_v - high_d, high_v - low_d]``: it holds every difference of two values inside the two
intervals, so it is wider than the interval of a paired comparison of the same two runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .tables import DATASET_COLUMNS, Table, cell, run_info

__all__ = ["NAMED", "robustness_table", "vocabulary_name", "vocabulary_section"]

#: the named vocabularies, in column order (files come after them)
NAMED: tuple[str, ...] = ("default", "plain", "first")

_VOCAB_IN_LABEL = re.compile(r"(, )?vocabulary=[^,\]]*")


def vocabulary_name(run: Mapping[str, Any]) -> str:
    """A run's vocabulary as a column header: the named one, or the file's name."""
    vocab = str(run.get("vocabulary") or "default")
    return vocab if vocab in NAMED else Path(vocab).name


def _config_label(run: Mapping[str, Any]) -> str:
    """The run's row label without its vocabulary (``LPOSS+``, ``LPOSS+ [lp.k=800]``)."""
    label = _VOCAB_IN_LABEL.sub("", run_info(run)["row"])
    label = label.replace("[, ", "[").replace(" []", "").strip()
    return label + (" (random init)" if run.get("random_init") else "")  # meaningless numbers say so


def _interval(run: Mapping[str, Any] | None) -> tuple[float, float] | None:
    ci = None if run is None else run.get("mIoU_ci")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def _with_interval(value: float | None, ci: tuple[float, float] | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.1f}" if signed else cell(value)
    return text if ci is None else f"{text} [{ci[0]:.1f}, {ci[1]:.1f}]"


def robustness_table(runs: Sequence[Mapping[str, Any]]) -> Table | None:
    """The robustness table of ``runs``, or None when no dataset was scored under two vocabularies.

    Columns: ``default``, then for every other vocabulary its mIoU and ``Δ <name>`` (its drop from default).
    """
    grid: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("mIoU") is None:
            continue
        key = (_config_label(r), str(r.get("dataset")))
        grid.setdefault(key, {})[vocabulary_name(r)] = r  # a later run of the same point wins
    keys = [k for k, by_vocab in grid.items() if "default" in by_vocab and len(by_vocab) > 1]
    if not keys:
        return None
    seen = {v for k in keys for v in grid[k]}
    others = [v for v in NAMED[1:] if v in seen] + sorted(seen - set(NAMED))
    order = {d: i for i, d in enumerate(DATASET_COLUMNS)}
    configs = list(dict.fromkeys(c for c, _ in keys))
    keys.sort(key=lambda k: (configs.index(k[0]), order.get(k[1], len(order)), k[1]))
    several = len(configs) > 1
    rows: list[tuple[str, tuple[str, ...]]] = []
    for config in configs:
        mine = [k for k in keys if k[0] == config]
        for key in mine:
            by_vocab = grid[key]
            base = by_vocab["default"]
            cells = [_with_interval(base["mIoU"], _interval(base))]
            for v in others:
                run = by_vocab.get(v)
                if run is None:
                    cells += ["-", "-"]
                    continue
                lo_hi_d, lo_hi_v = _interval(base), _interval(run)
                drop = float(run["mIoU"]) - float(base["mIoU"])
                drop_ci = (
                    (lo_hi_v[0] - lo_hi_d[1], lo_hi_v[1] - lo_hi_d[0]) if lo_hi_d and lo_hi_v else None
                )
                cells += [_with_interval(run["mIoU"], lo_hi_v), _with_interval(drop, drop_ci, signed=True)]
            name = DATASET_COLUMNS.get(key[1], key[1])
            rows.append((f"{config} {name}" if several else name, tuple(cells)))
        if len(mine) > 1:
            rows.append(_average_row(config if several else "", [grid[k] for k in mine], others))
    header = ("dataset", "default", *[h for v in others for h in (v, f"Δ {v}")])
    random = any(r.get("random_init") for k in keys for r in grid[k].values())
    title = "Vocabulary robustness, mIoU (%)" + (" (random-init weights: meaningless)" if random else "")
    return Table(title, header, tuple(rows))


def _average_row(
    config: str, points: Sequence[Mapping[str, Mapping[str, Any]]], others: Sequence[str]
) -> tuple[str, tuple[str, ...]]:
    """Means over the datasets scored under every vocabulary (no interval: the runs are independent sets)."""
    full = [p for p in points if all(v in p for v in others)]
    label = f"{config} Avg ({len(full)} sets)".strip()
    if not full:
        return label, ("-",) * (1 + 2 * len(others))
    mean_default = sum(float(p["default"]["mIoU"]) for p in full) / len(full)
    cells = [cell(mean_default)]
    for v in others:
        mean = sum(float(p[v]["mIoU"]) for p in full) / len(full)
        cells += [cell(mean), f"{mean - mean_default:+.1f}"]
    return label, tuple(cells)


def vocabulary_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's markdown lines of the robustness table (none when it does not apply)."""
    table = robustness_table(runs)
    if table is None:
        return []
    note = (
        "Δ: mIoU under the vocabulary minus under `default` (negative: the names cost mIoU). Intervals: the "
        "runs' bootstrap `mIoU_ci`; a Δ interval holds every difference of values inside the two intervals, "
        "so it is wider than a paired comparison (`python -m lposs_lab.lab.report compare RUN_A RUN_B`)."
    )
    return ["## Vocabulary robustness", "", table.title, "", table.to_markdown(), "", note, ""]
