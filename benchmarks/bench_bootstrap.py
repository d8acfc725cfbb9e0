"""Cost of the bootstrap intervals (lposs_lab.lab.stats) at benchmark sizes, on synthetic per-image counts.

    python benchmarks/bench_bootstrap.py [--sizes 2000x150 5000x171] [--resamples 1000] [--repeats 3]

Per size (images x classes) it prints the wall time of: stacking the per-image records into arrays
(``record_counts``, what ``results.json`` does first), ``bootstrap_metrics`` (mIoU, pixel accuracy and every
class; with Boundary IoU counts too), and ``paired_bootstrap`` (two runs, jointly resampled), with the peak
memory numpy allocated (tracemalloc) and the point score and interval the lab would report.

The counts mimic ADE20k / COCO-Stuff: class c is in an image with probability ~ 0.5 / (c + 1) (at least
0.002, so the rarest classes are in a handful of images), and a method predicts a class that is absent from
an image there with probability 0.05 (false positives).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from lposs_lab.lab.stats import bootstrap_metrics, paired_bootstrap, record_counts, score_rows


def synthetic_counts(n: int, c: int, seed: int, quality: float = 0.5) -> dict:
    """ADE-like per-image counts (see the module docstring); ``quality``: mean fraction of a class found."""
    rng = np.random.default_rng(seed)
    p = np.clip(0.5 / np.arange(1, c + 1), 0.002, 1.0)
    present = rng.random((n, c)) < p
    area = rng.integers(500, 20000, (n, c))
    found = np.clip(quality + rng.normal(0, 0.15, c), 0.05, 0.95)
    inter = np.where(present, (area * found).astype(np.int64), 0)
    false_pos = np.where(~present & (rng.random((n, c)) < 0.05), rng.integers(50, 2000, (n, c)), 0)
    union = np.where(present, area + (area * (1 - found)).astype(np.int64), 0) + false_pos
    labeled = np.where(present, area, 0).sum(1)
    return {
        "iou": {"intersection": inter, "union": union, "correct": inter.sum(1), "labeled": labeled},
        "boundary": {"intersection": inter // 5, "union": union // 3},
    }


def as_records(counts: dict) -> list[dict]:
    """The per-image JSON records the lab keeps (lists of ints), for the stacking cost."""
    n = counts["iou"]["labeled"].shape[0]
    return [
        {"id": f"im{i}", **{f: {k: v[i].tolist() for k, v in s.items()} for f, s in counts.items()}}
        for i in range(n)
    ]


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best seconds, peak MB of numpy allocations, result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return best, peak, out


def bench_size(n: int, c: int, r: int, repeats: int) -> list[str]:
    """The table rows of one size."""
    counts = synthetic_counts(n, c, seed=0)
    other = synthetic_counts(n, c, seed=0, quality=0.52)  # same images and classes, a better method
    iou_only = {"iou": counts["iou"]}
    records = as_records(counts)
    point = score_rows(counts)
    steps = [
        ("record_counts (stack the records)", lambda: record_counts(records), None, None),
        ("bootstrap_metrics, IoU", lambda: bootstrap_metrics(iou_only, resamples=r), "mIoU", point["mIoU"]),
        (
            "bootstrap_metrics, IoU + Boundary IoU",
            lambda: bootstrap_metrics(counts, resamples=r),
            "boundary_iou",
            point["boundary_iou"],
        ),
        ("paired_bootstrap (mIoU, A - B)", lambda: paired_bootstrap(other, counts, resamples=r), "ci", None),
    ]
    rows = []
    for name, fn, key, value in steps:
        secs, peak, out = timed(fn, repeats)
        shown, iv, width = "", "", ""
        if key == "ci":
            shown, iv = f"{out['delta']:+.2f}", out["ci"]
        elif key:
            shown, iv = f"{value:.2f}", out[key]
        if iv:
            width = f"{iv[1] - iv[0]:.2f}"
            iv = f"[{iv[0]:.2f}, {iv[1]:.2f}]"
        rows.append(f"| {n} x {c} | {name} | {secs:.3f} | {peak:.0f} | {shown} | {iv} | {width} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["2000x150", "5000x171"], help="IMAGESxCLASSES")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"resamples = {args.resamples}; best of {args.repeats}; peak = numpy allocations (tracemalloc)\n")
    print("| images x classes | step | seconds | peak MB | score | interval (95 %) | width |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, c = (int(v) for v in size.split("x"))
        print("\n".join(bench_size(n, c, args.resamples, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
