"""How well the bootstrap intervals cover, on simulated ADE-like splits (a statistical check, not speed).

    python benchmarks/check_bootstrap_coverage.py [--images 2000] [--classes 150] [--splits 40]

A fixed "population" (class c in an image with probability ~ 0.5 / (c + 1), at least 0.002; a fixed
fraction of each class found; false positives of absent classes with probability 0.05) gives
``--splits`` independent splits. Each split's 95 % intervals (the lab's percentile interval, and for
comparison the basic and BCa intervals from the same resamples) are checked against the population mIoU
(ratio of expected counts) and against the mean split mIoU (the centre of the split-to-split spread).
Prints coverage and mean widths; then the same for ``report compare``'s paired interval of A - B, two
methods that differ per class (A finds about 1 % more of each class, B has 0.06 instead of 0.05 false
positives).
"""

from __future__ import annotations

import argparse
from statistics import NormalDist

import numpy as np

from lposs_lab.lab.stats import bootstrap, paired_bootstrap


def miou(sums: np.ndarray) -> np.ndarray:
    """``[r, 2C]`` summed (intersection, union) -> ``[r, 1]`` mIoU in percent (classes with a union)."""
    c = sums.shape[1] // 2
    inter, union = sums[:, :c], sums[:, c:]
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan)
    return 100 * np.nanmean(iou, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--splits", type=int, default=40)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    n, c = args.images, args.classes
    nd = NormalDist()
    params = np.random.default_rng(123)
    p = np.clip(0.5 / np.arange(1, c + 1), 0.002, 1.0)
    found = np.clip(0.5 + params.normal(0, 0.15, c), 0.05, 0.95)
    area_mean, fp_mean = (500 + 19999) / 2, (50 + 1999) / 2
    theta = 100 * np.mean(p * area_mean * found / (p * area_mean * (2 - found) + (1 - p) * 0.05 * fp_mean))
    points, intervals = [], {"percentile": [], "basic": [], "BCa": []}
    for s in range(args.splits):
        rng = np.random.default_rng(1000 + s)
        present = rng.random((n, c)) < p
        area = rng.integers(500, 20000, (n, c))
        false_pos = np.where(~present & (rng.random((n, c)) < 0.05), rng.integers(50, 2000, (n, c)), 0)
        inter = np.where(present, area * found, 0.0)
        union = np.where(present, area * (2 - found), 0.0) + false_pos
        cols = np.concatenate([inter, union], axis=1)
        stats = bootstrap(cols, miou, args.resamples, seed=s)[:, 0]
        point = float(miou(cols.sum(0, keepdims=True))[0, 0])
        points.append(point)
        lo, hi = np.quantile(stats, [0.025, 0.975])
        intervals["percentile"].append((lo, hi))
        intervals["basic"].append((2 * point - hi, 2 * point - lo))
        jack = miou(cols.sum(0)[None] - cols)[:, 0]
        d = jack.mean() - jack
        accel = (d**3).sum() / (6 * ((d**2).sum()) ** 1.5)
        below = ((stats < point).sum() + 0.5 * (stats == point).sum()) / stats.size
        z0 = nd.inv_cdf(min(max(below, 1e-3), 1 - 1e-3))
        qs = [nd.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))) for z in (nd.inv_cdf(0.025), nd.inv_cdf(0.975))]
        intervals["BCa"].append(tuple(np.quantile(stats, qs)))
    pts = np.asarray(points)
    centre = float(pts.mean())
    print(f"{n} images x {c} classes, {args.splits} splits, {args.resamples} resamples")
    print(
        f"population mIoU {theta:.2f}; split mIoU mean {centre:.2f}, sd {pts.std():.2f} "
        f"(4 sd = {4 * pts.std():.2f})\n"
    )
    print("| interval | covers population mIoU | covers mean split mIoU | mean width |")
    print("|---|---|---|---|")
    for name, ivs in intervals.items():
        cov_t = np.mean([lo <= theta <= hi for lo, hi in ivs])
        cov_m = np.mean([lo <= centre <= hi for lo, hi in ivs])
        width = np.mean([hi - lo for lo, hi in ivs])
        print(f"| {name} | {cov_t:.2f} | {cov_m:.2f} | {width:.2f} |")
    paired_check(n, c, args.splits, args.resamples)


def _counts(split: tuple, found: np.ndarray, fp_rate: float) -> dict:
    """Per-image counts of a method (fraction ``found`` of each class) on a simulated split."""
    present, area, u, fp_area = split
    inter = np.where(present, area * found, 0.0)
    union = np.where(present, area * (2 - found), 0.0) + np.where(~present & (u < fp_rate), fp_area, 0)
    labeled = np.where(present, area, 0).sum(1)
    return {"iou": {"intersection": inter, "union": union, "correct": inter.sum(1), "labeled": labeled}}


def paired_check(n: int, c: int, splits: int, resamples: int) -> None:
    """Coverage of the paired interval of ``mIoU_A - mIoU_B`` (see the module docstring)."""
    params = np.random.default_rng(123)
    p = np.clip(0.5 / np.arange(1, c + 1), 0.002, 1.0)
    found_b = np.clip(0.5 + params.normal(0, 0.15, c), 0.05, 0.95)
    found_a = np.clip(found_b + params.normal(0.01, 0.02, c), 0.05, 0.95)
    area_mean, fp_mean = (500 + 19999) / 2, (50 + 1999) / 2

    def population(f: np.ndarray, q: float) -> float:
        return 100 * np.mean(p * area_mean * f / (p * area_mean * (2 - f) + (1 - p) * q * fp_mean))

    theta = population(found_a, 0.05) - population(found_b, 0.06)
    deltas, intervals = [], []
    for s in range(splits):
        rng = np.random.default_rng(1000 + s)
        present = rng.random((n, c)) < p
        area = rng.integers(500, 20000, (n, c))
        u, fp_area = rng.random((n, c)), rng.integers(50, 2000, (n, c))

        split = (present, area, u, fp_area)

        res = paired_bootstrap(
            _counts(split, found_a, 0.05), _counts(split, found_b, 0.06), resamples=resamples, seed=s
        )
        deltas.append(res["delta"])
        intervals.append(res["ci"])
    d = np.asarray(deltas)
    centre = float(d.mean())
    cov_t = np.mean([lo <= theta <= hi for lo, hi in intervals])
    cov_m = np.mean([lo <= centre <= hi for lo, hi in intervals])
    width = np.mean([hi - lo for lo, hi in intervals])
    print(
        f"\npaired A - B: population {theta:.3f}; split mean {centre:.3f}, sd {d.std():.3f} "
        f"(4 sd = {4 * d.std():.3f})"
    )
    print("\n| interval | covers population delta | covers mean split delta | mean width |")
    print("|---|---|---|---|")
    print(f"| paired percentile (report compare) | {cov_t:.2f} | {cov_m:.2f} | {width:.3f} |")


if __name__ == "__main__":
    main()
