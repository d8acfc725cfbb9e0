"""Gather finished runs into the paper's tables and figures.

Runs are the ``results.json`` files of ``task=evaluate`` (found recursively, so multirun folders work) or,
with ``--wandb PROJECT``, the runs of a W&B project (public API, imported lazily). Output: markdown tables in
the paper's layout (rows = configurations, columns = the 8 datasets + Avg, the paper's numbers beside ours),
Figure-10-style sweep plots (mIoU vs k / sigma / r) and per-image scatter plots (e.g. LPOSS+ vs MaskCLIP).

    python -m lposs_lab.lab.report multirun/ --out report.md --figures figures/
    python -m lposs_lab.lab.report multirun/ --compare-to best   # mark rows not distinguishable from the best
    python -m lposs_lab.lab.report --wandb lposs_lab --entity me --out report.md
    python -m lposs_lab.lab.report compare RUN_A RUN_B --json d.json  # paired A - B (lposs_lab.lab.compare)

Scores carry their bootstrap intervals (``results.json`` ``mIoU_ci``): ``42.1 ±0.6`` in the tables, a band
in the sweep figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .figures import plot_per_image, plot_sweep, report_figures, sweep_series
from .tables import (
    cell,
    group_runs,
    results_table,
    run_info,
)
from .vocab_table import vocabulary_section

__all__ = [
    "load_runs",
    "load_searches",
    "load_wandb_runs",
    "search_table",
    "markdown_report",
    "sweep_series",
    "plot_sweep",
    "plot_per_image",
    "main",
]


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` under ``paths`` (files or folders, searched recursively), sorted by path.

    Each run gets ``"_source"`` (its path). Unreadable files raise ``ValueError`` naming the file.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("results.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p} does not exist; pass results.json files or folders holding them")
    runs = []
    for f in sorted(set(files)):
        try:
            run = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {f}: {exc}") from exc
        run["_source"] = str(f)
        runs.append(run)
    return runs


def load_searches(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The Optuna searches under ``paths``: each ``optimization_results.yaml`` the Hydra Optuna sweeper wrote.

    Returns ``[{"name", "best_value", "best_params", "_source"}]`` sorted by path; folders without a search
    give nothing. Unreadable files raise ``ValueError`` naming the file.
    """
    from omegaconf import OmegaConf

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("optimization_results.yaml"))
        elif p.name == "optimization_results.yaml":
            files.append(p)
    out = []
    for f in sorted(set(files)):
        try:
            data = OmegaConf.to_container(OmegaConf.load(f))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {f}: {exc}") from exc
        if not isinstance(data, dict) or "best_params" not in data:
            raise ValueError(f"{f} is not an Optuna result (no best_params)")
        out.append(
            {
                "name": data.get("name", "optuna"),
                "best_value": data.get("best_value"),
                "best_params": dict(data["best_params"]),
                "_source": str(f),
            }
        )
    return out


def search_table(searches: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per search, its best value and the best point's parameters."""
    keys = sorted({k for s in searches for k in s["best_params"]})
    lines = ["| search | best mIoU | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for s in searches:
        folder = Path(s["_source"]).parent
        cells = [_param(s["best_params"].get(k)) for k in keys]
        lines.append(f"| {folder} | {cell(s['best_value'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _param(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def load_wandb_runs(
    project: str, entity: str | None = None, *, filters: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Runs of a W&B project as results dicts (``dataset``, ``method``, ``mIoU``, ``config``...).

    Uses ``wandb.Api`` (needs network and credentials); the run's logged ``config`` (the resolved Hydra config
    of ``task=evaluate``) and its summary ``test/mIoU`` / ``test/boundary_iou`` are used.
    """
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    out = []
    for run in api.runs(path, filters=dict(filters or {})):
        config = dict(run.config.get("config", run.config))
        summary = dict(run.summary)
        if "test/mIoU" not in summary:
            continue
        ds = config.get("dataset") or {}
        res = {
            "dataset": ds.get("name") if isinstance(ds, Mapping) else ds,
            "method": (config.get("method") or {}).get("name", "lposs_plus"),
            "label": run.config.get("label"),
            "mIoU": summary.get("test/mIoU"),
            "config": config,
            "_source": f"wandb:{path}/{run.id}",
        }
        if "test/boundary_iou" in summary:
            res["boundary_iou"] = summary["test/boundary_iou"]
        for key in ("mIoU", "boundary_iou", "pixel_accuracy"):
            if f"test/{key}_ci_low" in summary and f"test/{key}_ci_high" in summary:
                res[f"{key}_ci"] = [summary[f"test/{key}_ci_low"], summary[f"test/{key}_ci_high"]]
        out.append(res)
    return out


def _legend(
    group: Sequence[Mapping[str, Any]], metric: str, compare_to: str | None, notes: list[str]
) -> list[str]:
    """The lines under a table saying what ``±``, ``*`` and ``≈`` mean."""
    out = []
    settings = next((r["ci"] for r in group if r.get(f"{metric}_ci") and r.get("ci")), None)
    if settings:
        out.append(
            f"±: half the width of the run's {100 * settings['level']:g} % bootstrap interval over its "
            f"images ({settings['resamples']} resamples)."
        )
    if compare_to:
        ref = "the best row" if compare_to == "best" else f"{compare_to!r}"
        out.append(
            f"`*`: {ref} in each column; `≈`: not distinguishable from it (its paired bootstrap interval of "
            "the difference holds 0; `python -m lposs_lab.lab.report compare A B` for the numbers)."
        )
        out += [f"- {n}" for n in notes]
    return out + ([""] if out else [])


def _check_reference(runs: Sequence[Mapping[str, Any]], compare_to: str) -> None:
    from .tables import row_labels

    if compare_to == "best":
        return
    labels = [lb for table in group_runs(runs).values() for lb in row_labels(table)]
    if not any(compare_to in (lb, lb.removesuffix(" (random init)")) for lb in labels):
        valid = ", ".join(dict.fromkeys(labels))
        raise ValueError(f"--compare-to {compare_to!r} names no row; valid: best or one of: {valid}")


def markdown_report(
    runs: Sequence[Mapping[str, Any]],
    *,
    figures: dict[str, str] | None = None,
    searches: Sequence[Mapping[str, Any]] = (),
    compare_to: str | None = None,
) -> str:
    """The whole report: one section per table (mIoU, and Boundary IoU when present), the Optuna searches'
    best points, then the figures.

    Cells show ``score ±h`` (``h``: half the run's interval width) when the runs carry intervals;
    ``compare_to`` (``"best"`` or a row label) marks per column the reference row ``*`` and the rows not
    distinguishable from it ``≈`` (paired bootstrap on the runs' per-image states).
    """
    if compare_to:
        _check_reference(runs, compare_to)
    parts = ["# lposs_lab report", "", f"{len(runs)} run(s).", ""]
    if searches:
        parts += ["## Searches (best point of each)", "", search_table(searches), ""]
    for table, group in group_runs(runs).items():
        parts += [f"## {table}", ""]
        for metric, title in (("mIoU", "mIoU (%)"), ("boundary_iou", "Boundary IoU (%)")):
            if metric != "mIoU" and not any(metric in r for r in group):
                continue
            marks, notes = {}, []
            if compare_to:
                from .compare import table_marks

                marks, notes = table_marks(group, metric, compare_to)
            md = results_table(group, metric, ci="pm", marks=marks).to_markdown()
            parts += [title, "", md, "", *_legend(group, metric, compare_to if marks else None, notes)]
        secs = [(run_info(r)["row"], r.get("dataset"), r.get("seconds_per_image")) for r in group]
        if table.startswith("table6"):
            parts += ["| configuration | dataset | s/image |", "|---|---|---|"]
            parts += [f"| {a} | {b} | {cell(c) if c is None else f'{c:.3f}'} |" for a, b, c in secs] + [""]
    parts += vocabulary_section(runs)  # runs scored under several vocabularies (experiment=vocabulary)
    for title, path in (figures or {}).items():
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lposs_lab.lab.report [PATHS...] [--wandb PROJECT] [--out FILE] [--figures DIR]
    [--compare-to best|LABEL]``, or ``python -m lposs_lab.lab.report compare RUN_A RUN_B [--json OUT]``
    (a folder named ``compare`` is passed as ``./compare``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return compare_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m lposs_lab.lab.report",
        description=__doc__.split("\n")[0],
        epilog="python -m lposs_lab.lab.report compare RUN_A RUN_B [--json OUT]: "
        "paired comparison of two runs (compare --help)",
    )
    ap.add_argument("paths", nargs="*", help="results.json files or folders (searched recursively)")
    ap.add_argument("--wandb", metavar="PROJECT", help="also read the runs of this W&B project")
    ap.add_argument("--entity", help="W&B entity (user or team)")
    ap.add_argument("--out", help="write the markdown report here (default: print it)")
    ap.add_argument("--figures", help="write PNG figures into this folder")
    ap.add_argument("--sweep", help="plot mIoU against this config key (default: report.x or what varies)")
    ap.add_argument(
        "--compare-to",
        metavar="LABEL",
        help="mark per column this row (or 'best') with * and the "
        "rows not distinguishable from it with ≈ (paired bootstrap on the runs' states)",
    )
    args = ap.parse_args(argv)
    if not args.paths and not args.wandb:
        print("error: nothing to report; pass result folders (multirun/) or --wandb PROJECT", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.paths)
        searches = load_searches(args.paths)
        if args.wandb:
            runs += load_wandb_runs(args.wandb, args.entity)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no results.json under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        if args.compare_to:
            _check_reference(runs, args.compare_to)
        figures = report_figures(runs, Path(args.figures), args.sweep) if args.figures else {}
        if args.out and figures:
            base = Path(args.out).resolve().parent
            rel = {k: Path(v).resolve() for k, v in figures.items()}
            figures = {
                k: str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for k, p in rel.items()
            }
        text = markdown_report(runs, figures=figures, searches=searches, compare_to=args.compare_to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out} ({len(runs)} runs, {len(figures)} figures)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
