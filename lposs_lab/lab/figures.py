"""The report's figures: Figure-10-style sweeps (a metric against a config key, with its interval band) and
per-image scatter plots of two runs. matplotlib is imported when a figure is drawn.

    python -m lposs_lab.lab.report multirun/ --figures figures/     # every table's sweep and scatter plots
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tables import (
    DATASET_COLUMNS,
    base_label,
    config_value,
    group_runs,
    method_label,
    run_info,
    run_overrides,
    varying_keys,
)

__all__ = ["sweep_series", "sweep_figure", "plot_sweep", "plot_per_image", "report_figures"]


def _sweep_runs(
    runs: Sequence[Mapping[str, Any]], param: str, metric: str
) -> dict[str, list[tuple[float, Mapping[str, Any]]]]:
    """``{dataset: [(x, run), ...]}`` sorted by x, for the runs that have ``param`` and ``metric``."""
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for r in runs:
        x = config_value(r.get("config") or {}, param)
        if x is None:
            x = run_overrides(r).get(param)
        if x is None or r.get(metric) is None:
            continue
        series.setdefault(str(r.get("dataset")), []).append((float(x), r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in series.items()}


def sweep_series(
    runs: Sequence[Mapping[str, Any]], param: str, metric: str = "mIoU"
) -> dict[str, list[tuple[float, float]]]:
    """``{dataset: [(x, metric), ...]}`` sorted by x, x from the runs' configs at ``param`` (``lp.k``)."""
    return {
        ds: [(x, float(r[metric])) for x, r in pts] for ds, pts in _sweep_runs(runs, param, metric).items()
    }


def _sweep_title(runs: Sequence[Mapping[str, Any]], datasets: Sequence[str], param: str, metric: str) -> str:
    """``LPOSS+ on VOC20, ADE: mIoU vs lp.k`` (and a second line for random-init runs)."""
    methods = ", ".join(dict.fromkeys(base_label(r) for r in runs))
    names = ", ".join(DATASET_COLUMNS.get(d, d) for d in datasets)
    title = f"{methods} on {names}: {metric} vs {param}"
    if any(r.get("random_init") for r in runs):
        title += "\nrandom init (dashed, open markers): the numbers are meaningless"
    return title


def _plain(value: float) -> str:
    """A tick label without exponent: ``0.00001``, ``0.5``, ``800``."""
    return np.format_float_positional(float(value), trim="-")


def sweep_figure(runs: Sequence[Mapping[str, Any]], param: str, metric: str = "mIoU") -> Any:
    """Figure 10 style: ``metric`` vs ``param``, one line per dataset (a matplotlib ``Figure``).

    Ticks at the values tried, written plainly (no axis offset, no exponent); a band for each run's
    ``<metric>_ci``; random-init runs dashed with open markers and named so in the legend and the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    series = _sweep_runs(runs, param, metric)
    if not series:
        raise ValueError(f"no run has both {param!r} and {metric!r}; is this the right sweep folder?")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    band_level = None
    for ds, pts in series.items():
        xs = [x for x, _ in pts]
        ys = [float(r[metric]) for _, r in pts]
        random = any(r.get("random_init") for _, r in pts)
        label = DATASET_COLUMNS.get(ds, ds) + (" (random init)" if random else "")
        (line,) = ax.plot(
            xs,
            ys,
            marker="o",
            label=label,
            linestyle="--" if random else "-",
            markerfacecolor="none" if random else None,
        )
        ivs = [r.get(f"{metric}_ci") for _, r in pts]
        if all(iv and None not in iv for iv in ivs):
            ax.fill_between(
                xs,
                [iv[0] for iv in ivs],
                [iv[1] for iv in ivs],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
            band_level = next((r["ci"]["level"] for _, r in pts if r.get("ci")), band_level)
    values = sorted({x for pts in series.values() for x, _ in pts})
    if values[0] > 0 and values[-1] / values[0] >= 100:  # sigma, tau: decades apart
        ax.set_xscale("log")
    if len(values) <= 12:  # ticks at the values tried, written plainly (no 1e-5 offset, no 10^x)
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
    else:
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    yfmt = ScalarFormatter(useOffset=False)
    yfmt.set_scientific(False)
    ax.yaxis.set_major_formatter(yfmt)
    ax.set_xlabel(param)
    band = f"; band: {100 * band_level:g} % interval" if band_level else ""
    ax.set_ylabel(f"{metric} (%){band}")
    ax.set_title(
        _sweep_title([r for pts in series.values() for _, r in pts], list(series), param, metric), fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(runs: Sequence[Mapping[str, Any]], param: str, out: str | Path, metric: str = "mIoU") -> Path:
    """:func:`sweep_figure` written as a PNG; returns its path."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(runs, param, metric)
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


def report_figures(runs: Sequence[Mapping[str, Any]], folder: Path, sweep: str | None) -> dict[str, str]:
    """Every figure the runs allow, written into ``folder``: ``{title: png path}``.

    Per table: ``metric`` against ``sweep`` (default: the table's ``report.x`` or the keys that vary); per
    dataset: LPOSS+ (or LPOSS) against MaskCLIP image by image.
    """
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
