"""Gather finished runs into the paper's tables and figures.

Runs are the ``results.json`` files of ``task=evaluate`` (found recursively, so multirun folders work) or,
with ``--wandb PROJECT``, the runs of a W&B project (public API, imported lazily). Output: markdown tables in
the paper's layout (rows = configurations, columns = the 8 datasets + Avg, the paper's numbers beside ours),
Figure-10-style sweep plots (mIoU vs k / sigma / r) and per-image scatter plots (e.g. LPOSS+ vs MaskCLIP).

    python -m lposs_lab.lab.report multirun/ --out report.md --figures figures/
    python -m lposs_lab.lab.report --wandb lposs_lab --entity me --out report.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .tables import (
    DATASET_COLUMNS,
    cell,
    config_value,
    group_runs,
    method_label,
    results_table,
    run_info,
    run_overrides,
    varying_keys,
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
        out.append({"name": data.get("name", "optuna"), "best_value": data.get("best_value"),
                    "best_params": dict(data["best_params"]), "_source": str(f)})
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


def load_wandb_runs(project: str, entity: str | None = None, *, filters: Mapping[str, Any] | None = None
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
        out.append(res)
    return out


def markdown_report(
    runs: Sequence[Mapping[str, Any]],
    *,
    figures: dict[str, str] | None = None,
    searches: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The whole report: one section per table (mIoU, and Boundary IoU when present), the Optuna searches'
    best points, then the figures."""
    parts = ["# lposs_lab report", "", f"{len(runs)} run(s).", ""]
    if searches:
        parts += ["## Searches (best point of each)", "", search_table(searches), ""]
    for table, group in group_runs(runs).items():
        parts += [f"## {table}", "", "mIoU (%)", "", results_table(group, "mIoU").to_markdown(), ""]
        if any("boundary_iou" in r for r in group):
            parts += ["Boundary IoU (%)", "", results_table(group, "boundary_iou").to_markdown(), ""]
        secs = [(run_info(r)["row"], r.get("dataset"), r.get("seconds_per_image")) for r in group]
        if table.startswith("table6"):
            parts += ["| configuration | dataset | s/image |", "|---|---|---|"]
            parts += [f"| {a} | {b} | {cell(c) if c is None else f'{c:.3f}'} |" for a, b, c in secs] + [""]
    parts += vocabulary_section(runs)  # runs scored under several vocabularies (experiment=vocabulary)
    for title, path in (figures or {}).items():
        parts += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(parts)


def sweep_series(runs: Sequence[Mapping[str, Any]], param: str, metric: str = "mIoU"
                 ) -> dict[str, list[tuple[float, float]]]:
    """``{dataset: [(x, metric), ...]}`` sorted by x, x from the runs' configs at ``param`` (``lp.k``)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        x = config_value(r.get("config") or {}, param)
        if x is None:
            x = run_overrides(r).get(param)
        if x is None or r.get(metric) is None:
            continue
        series.setdefault(str(r.get("dataset")), []).append((float(x), float(r[metric])))
    return {k: sorted(v) for k, v in series.items()}


def plot_sweep(runs: Sequence[Mapping[str, Any]], param: str, out: str | Path, metric: str = "mIoU") -> Path:
    """Figure 10 style: ``metric`` vs ``param``, one line per dataset. Writes a PNG, returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sweep_series(runs, param, metric)
    if not series:
        raise ValueError(f"no run has both {param!r} and {metric!r}; is this the right sweep folder?")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for ds, pts in series.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=DATASET_COLUMNS.get(ds, ds))
    ax.set_xlabel(param)
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_per_image(a: Mapping[str, Any], b: Mapping[str, Any], out: str | Path) -> tuple[Path, int]:
    """Scatter of per-image mIoU of run ``b`` (y) against run ``a`` (x), images matched by id.

    Returns ``(png path, number of images plotted)``; points above the diagonal are images ``b`` wins.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ra = {p["id"]: p["mIoU"] for p in a.get("per_image") or [] if p.get("mIoU") is not None}
    rb = {p["id"]: p["mIoU"] for p in b.get("per_image") or [] if p.get("mIoU") is not None}
    ids = sorted(set(ra) & set(rb))
    if not ids:
        raise ValueError("the two runs share no image with a per-image mIoU (per_image in results.json)")
    xs, ys = [ra[i] for i in ids], [rb[i] for i in ids]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(xs, ys, s=8, alpha=0.6)
    ax.plot([0, 100], [0, 100], color="grey", lw=1)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"{run_info(a)['row']} per-image mIoU (%)")
    ax.set_ylabel(f"{run_info(b)['row']} per-image mIoU (%)")
    wins = sum(y > x for x, y in zip(xs, ys, strict=True))
    ax.set_title(f"{a.get('dataset')}: {wins}/{len(ids)} images improved", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out, len(ids)


def _figures(runs: Sequence[Mapping[str, Any]], folder: Path, sweep: str | None) -> dict[str, str]:
    figs: dict[str, str] = {}
    for table, group in group_runs(runs).items():
        x = run_info(group[0])["x"]
        params = [sweep] if sweep else ([x] if x else varying_keys(group))
        for param in params:
            if param and sweep_series(group, param):
                name = f"{table}_{param.replace('.', '_')}.png"
                figs[f"{table}: mIoU vs {param}"] = str(plot_sweep(group, param, folder / name))
    by_ds: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in runs:
        by_ds.setdefault(str(r.get("dataset")), {}).setdefault(str(r.get("method")), r)
    for ds, methods in by_ds.items():
        if "maskclip" in methods:
            for other in ("lposs_plus", "lposs"):
                if other in methods and methods[other].get("per_image"):
                    png = folder / f"per_image_{ds}.png"
                    path, _ = plot_per_image(methods["maskclip"], methods[other], png)
                    figs[f"{ds}: {method_label(other)} vs MaskCLIP per image"] = str(path)
                    break
    return figs


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lposs_lab.lab.report [PATHS...] [--wandb PROJECT] [--out FILE] [--figures DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m lposs_lab.lab.report", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="results.json files or folders (searched recursively)")
    ap.add_argument("--wandb", metavar="PROJECT", help="also read the runs of this W&B project")
    ap.add_argument("--entity", help="W&B entity (user or team)")
    ap.add_argument("--out", help="write the markdown report here (default: print it)")
    ap.add_argument("--figures", help="write PNG figures into this folder")
    ap.add_argument("--sweep", help="plot mIoU against this config key (default: report.x or what varies)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
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
    figures = _figures(runs, Path(args.figures), args.sweep) if args.figures else {}
    if args.out and figures:
        base = Path(args.out).resolve().parent
        rel = {k: Path(v).resolve() for k, v in figures.items()}
        figures = {k: str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for k, p in rel.items()}
    text = markdown_report(runs, figures=figures, searches=searches)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out} ({len(runs)} runs, {len(figures)} figures)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
