"""Paired comparison of two evaluations on the same images, and the report's "not distinguishable" marks.

    python -m lposs_lab.lab.report compare RUN_A RUN_B [--json OUT] [--metric mIoU] [--top 10]

A run is a run folder (holding ``results.json`` and its ``states/``) or a ``results.json`` file. Both runs
must have scored the same benchmark and the same images; the per-image counts come from each run's state
directory. The images are resampled jointly (:func:`lposs_lab.lab.stats.paired_bootstrap`): the interval
of ``A - B`` says how much the difference could move with another draw of images like these.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lposs_lab.errors import UserError
from lposs_lab.files import atomic_write

from .records import StateStore, StateStoreError
from .stats import CIConfig, paired_bootstrap, record_counts
from .tables import row_labels, run_info

__all__ = ["CompareError", "load_run", "run_counts", "compare_runs", "table_marks", "main"]

METRICS = ("mIoU", "boundary_iou", "pixel_accuracy")
#: the report's cell marks: the reference cell, and cells not distinguishable from it
REFERENCE_MARK, SAME_MARK = "*", " ≈"


class CompareError(UserError, ValueError):
    """Two runs that cannot be compared (different data or images, missing states): one line, exit 2."""


def load_run(path: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a run folder or file, with ``"_source"`` (its path)."""
    p = Path(path).expanduser()
    file = p / "results.json" if p.is_dir() else p
    if p.is_dir() and not file.is_file():
        found = sorted(p.rglob("results.json"))
        if len(found) != 1:
            what = "no results.json" if not found else f"{len(found)} results.json files"
            raise CompareError(f"{p} holds {what}; pass one run folder or its results.json")
        file = found[0]
    if not file.is_file():
        raise CompareError(f"{p} does not exist; pass a run folder or its results.json")
    try:
        run = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"cannot read {file}: {exc}") from None
    if not isinstance(run, dict) or "dataset" not in run or "per_image" not in run:
        raise CompareError(f"{file} is not the results.json of task=evaluate (no dataset / per_image)")
    run["_source"] = str(file)
    return run


def run_counts(run: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``(ids, counts)`` of a run's scored images, read from its state directory.

    The directory is ``state_dir`` of ``results.json``, else ``states/`` beside it (a moved run folder).
    """
    ids = [str(p["id"]) for p in run.get("per_image") or []]
    source = Path(str(run.get("_source", "results.json")))
    places = [Path(str(run["state_dir"]))] if run.get("state_dir") else []
    places.append(source.parent / "states")
    for root in places:
        if root.is_dir():
            try:
                return record_counts(StateStore(root).load(ids))
            except StateStoreError as exc:
                raise CompareError(f"{source}: {exc}") from None
    looked = " or ".join(str(p) for p in places)
    raise CompareError(f"no per-image states for {source} (looked in {looked}); the run's states/ are needed")


def _differences(
    a: Mapping[str, Any], b: Mapping[str, Any], ids_a: list[str], ids_b: list[str]
) -> str | None:
    """How two runs differ in what they scored (dataset, classes, images), or None."""
    if a.get("dataset") != b.get("dataset"):
        return f"they scored different datasets: A {a.get('dataset')}, B {b.get('dataset')}"
    ca, cb = a.get("per_class_iou") or {}, b.get("per_class_iou") or {}
    if len(ca) != len(cb):  # names may differ (another vocabulary): the benchmark's classes, in its order
        return f"they scored different numbers of classes ({len(ca)} vs {len(cb)})"
    only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
    if only_a or only_b:
        parts = [f"{len(x)} only in {w} (first: {x[0]})" for w, x in (("A", only_a), ("B", only_b)) if x]
        return f"they scored different images ({len(ids_a)} vs {len(ids_b)}): " + ", ".join(parts)
    return None


def compare_runs(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    metric: str = "mIoU",
    ci: CIConfig | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The paired comparison ``A - B`` of two loaded runs (see :func:`paired_bootstrap`), per class by name.

    ``cache``: a dict that keeps the runs' counts by source between calls (a table compares many pairs).

    Raises:
        CompareError: the runs differ in dataset, classes or images, or their states are missing.
    """
    ci = ci or CIConfig()
    if not ci.enabled:
        raise CompareError("compare needs resamples >= 1")
    cache = {} if cache is None else cache
    for run in (a, b):
        if run["_source"] not in cache:
            cache[run["_source"]] = run_counts(run)
    ids_a, counts_a = cache[a["_source"]]
    ids_b, counts_b = cache[b["_source"]]
    why = _differences(a, b, ids_a, ids_b)
    if why:
        raise CompareError(f"cannot compare {a['_source']} with {b['_source']}: {why}")
    if not ids_a:
        raise CompareError(f"{a['_source']} has no scored image")
    order = {k: i for i, k in enumerate(ids_b)}
    perm = [order[k] for k in ids_a]
    counts_b = {fam: {k: v[perm] for k, v in states.items()} for fam, states in counts_b.items()}
    if metric == "boundary_iou" and not ("boundary" in counts_a and "boundary" in counts_b):
        raise CompareError("--metric boundary_iou needs runs made with metrics.boundary=true")
    res = paired_bootstrap(
        counts_a, counts_b, metric=metric, level=ci.level, resamples=ci.resamples, seed=ci.seed
    )
    names = list(a.get("per_class_iou") or {})  # A's names (a run with another vocabulary names them so)
    res["per_class"] = {
        names[r["index"]]: {k: r[k] for k in ("delta", "ci", "a", "b")} for r in res["per_class"]
    }
    res["dataset"] = a["dataset"]
    res["runs"] = {"A": a["_source"], "B": b["_source"]}
    return res


def _fmt(x: float | None, sign: bool = False) -> str:
    return "-" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _interval(iv: Sequence[float] | None) -> str:
    return "[-, -]" if iv is None else f"[{iv[0]:+.2f}, {iv[1]:+.2f}]"


def format_comparison(res: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any], top: int) -> str:
    """The terminal text of a comparison: the runs, the difference with its interval, per-class deltas."""
    m, level = res["metric"], 100 * res["level"]
    verdict = "significant" if res["significant"] else "not significant"
    lines = [
        f"{res['dataset']}: {res['num_images']} images, the same in both runs",
        f"  A  {_fmt(res['a'])}  {run_info(a)['row']}  ({a['_source']})",
        f"  B  {_fmt(res['b'])}  {run_info(b)['row']}  ({b['_source']})",
        f"Δ{m} = A - B = {_fmt(res['delta'], True)} {_interval(res['ci'])}  ({level:g} % paired bootstrap "
        f"interval, {res['resamples']} resamples, seed {res['seed']})",
        f"p = {res['p_value']:.3g} (two-sided): {verdict} at {level:g} %"
        + (" (the interval excludes 0)" if res["significant"] else " (the interval holds 0)"),
    ]
    rows = list(res["per_class"].items())
    if rows:
        shown = rows if top <= 0 else rows[:top]
        width = max(len(name) for name, _ in shown)
        lines += [
            "",
            f"per class Δ (largest first{'' if len(shown) == len(rows) else f', top {len(shown)}'}):",
        ]
        for name, r in shown:
            lines.append(
                f"  {name.ljust(width)}  {_fmt(r['delta'], True):>7} {_interval(r['ci']):>18}   "
                f"A {_fmt(r['a'])}  B {_fmt(r['b'])}"
            )
        if len(shown) < len(rows):
            lines.append(f"  ... {len(rows) - len(shown)} more (--top 0 shows all, --json writes all)")
    return "\n".join(lines)


def table_marks(
    runs: Sequence[Mapping[str, Any]], metric: str, reference: str, ci: CIConfig | None = None
) -> tuple[dict[tuple[str, str], str], list[str]]:
    """Cell marks of a results table: per dataset, the reference row (``"best"``: the highest score, else
    the row labelled ``reference``) gets :data:`REFERENCE_MARK`, rows whose paired difference from it is not
    significant get :data:`SAME_MARK`.

    Returns ``(marks by (row label, dataset), notes)``: the notes name the cells that could not be paired.
    """
    ci = ci or CIConfig()
    labels = row_labels(runs)
    by_ds: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for label, r in zip(labels, runs, strict=True):
        if r.get(metric) is not None:
            by_ds.setdefault(str(r.get("dataset")), []).append((label, r))
    marks: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    cache: dict[str, Any] = {}
    for ds, rows in by_ds.items():
        if reference == "best":
            ref = max(rows, key=lambda lr: float(lr[1][metric]))
        else:
            ref = next((lr for lr in rows if lr[0] in (reference, f"{reference} (random init)")), None)
            if ref is None:
                continue
        marks[(ref[0], ds)] = REFERENCE_MARK
        for label, r in rows:
            if r is ref[1]:
                continue
            try:
                res = compare_runs(r, ref[1], metric=metric, ci=ci, cache=cache)
            except CompareError as exc:
                notes.append(f"{label} ({ds}): not compared, {exc}")
                continue
            if not res["significant"]:
                marks[(label, ds)] = SAME_MARK
    return marks, notes


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lposs_lab.lab.report compare RUN_A RUN_B [--json OUT]``."""
    d = CIConfig()
    ap = argparse.ArgumentParser(
        prog="python -m lposs_lab.lab.report compare",
        description="Paired bootstrap comparison of two evaluations on the same images (A - B).",
    )
    ap.add_argument("run_a", help="run folder or results.json (A)")
    ap.add_argument("run_b", help="run folder or results.json (B)")
    ap.add_argument("--json", metavar="OUT", help="also write the comparison as JSON here")
    ap.add_argument("--metric", choices=METRICS, default="mIoU", help="score to compare (default mIoU)")
    ap.add_argument("--level", type=float, default=d.level, help=f"interval level (default {d.level})")
    ap.add_argument("--resamples", type=int, default=d.resamples, help=f"default {d.resamples}")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    ap.add_argument("--top", type=int, default=10, help="per-class rows printed (0: all; default 10)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        ci = CIConfig(args.level, args.resamples, args.seed)
        a, b = load_run(args.run_a), load_run(args.run_b)
        res = compare_runs(a, b, metric=args.metric, ci=ci)
        if args.json:
            out = Path(args.json).expanduser()
            if out.is_dir():
                raise CompareError(f"--json {out} is a folder; pass a file name")
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out, "w") as fh:
                json.dump(res, fh, indent=1)
    except UserError as exc:
        msg = str(exc).replace("metrics.ci.", "--")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(format_comparison(res, a, b, args.top))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0
