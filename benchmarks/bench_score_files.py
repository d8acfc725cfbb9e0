"""Size on disk of one image's saved scores (``save_scores``), per form, and the time to write/read them.

An ADE20k-like case by default: a 448 x 597 resized image, 150 classes, 224/112 windows of 14 x 14 patches
(15 windows). The patch scores are random but smooth (a few low-frequency waves per class, plus a little
noise), like propagated patch scores; they are stitched exactly as the predictor does. Rows:

* ``window grids`` (MaskCLIP / LPOSS): what ``save_scores`` writes for them now;
* ``full, stitched`` (the same scores as a [C, h, w] float16 map: what was written before);
* ``full, after the pixel stage`` (LPOSS+, with ``--pixel-stage``: the real pixel stage on a synthetic image).

    python benchmarks/bench_score_files.py                 # 448 x 597, 150 classes
    python benchmarks/bench_score_files.py --pixel-stage   # also the LPOSS+ form (slow on a CPU)

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lposs_lab.config import PixelConfig, WindowConfig
from lposs_lab.score_files import PatchGrids, read_score_file, write_score_file
from lposs_lab.windows import window_grid


def smooth_patch_scores(h: int, w: int, patch: int, classes: int, seed: int = 0) -> np.ndarray:
    """``[C, H/patch, W/patch]``-ish smooth scores over the whole image at patch resolution (float32)."""
    rng = np.random.default_rng(seed)
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    yy, xx = np.mgrid[0:gh, 0:gw] / max(gh, gw)
    out = np.zeros((classes, gh, gw), np.float32)
    for c in range(classes):
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi)
            out[c] += np.sin(2 * math.pi * (fy * yy + fx * xx) + phase) * rng.uniform(0.02, 0.08)
        out[c] += 0.15 + rng.normal(0, 0.002, (gh, gw))
    return out


def window_grids(scores: np.ndarray, h: int, w: int, win: WindowConfig, patch: int) -> PatchGrids:
    """Cut the image-level patch scores into each window's ``size / patch`` grid."""
    windows = window_grid(h, w, win.size, win.stride)
    g = win.size // patch
    grids = np.stack([scores[:, wd.y1 // patch : wd.y1 // patch + g, wd.x1 // patch : wd.x1 // patch + g]
                      for wd in windows])  # fmt: skip
    c = scores.shape[0]
    tensor = torch.from_numpy(np.ascontiguousarray(grids))
    return PatchGrids(tensor, tuple(windows), (h, w), torch.arange(c), c)


def measure(name: str, scores, classes: list[str], folder: Path) -> tuple[str, int, float, float]:
    path = folder / f"{name.replace(' ', '_').replace(',', '')}.npz"
    t0 = time.perf_counter()
    size = write_score_file(path, scores, classes)
    t1 = time.perf_counter()
    back, _ = read_score_file(path)
    if isinstance(back, PatchGrids):
        back.scores()
    t2 = time.perf_counter()
    return name, size, t1 - t0, t2 - t1


def main() -> None:
    raw_help = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw_help)
    parser.add_argument("--size", default="448x597", help="resized image HxW (default 448x597, ADE20k-like)")
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--pixel-stage", action="store_true", help="also the LPOSS+ full-resolution form")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    win = WindowConfig()
    names = [f"class{i}" for i in range(args.classes)]
    grids = window_grids(smooth_patch_scores(h, w, args.patch, args.classes), h, w, win, args.patch)
    stitched = grids.scores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(measure("window grids (maskclip, lposs)", grids, names, folder))
        rows.append(measure("full, stitched (before)", stitched, names, folder))
        if args.pixel_stage:
            from bench_e2e import synthetic_image

            from lposs_lab.pixels import pixel_stage

            image = torch.from_numpy(synthetic_image(h, w)).permute(2, 0, 1).float() / 255.0
            refined = pixel_stage(image, stitched, PixelConfig())
            rows.append(measure("full, after the pixel stage (lposs_plus)", refined, names, folder))
    raw = args.classes * h * w * 2
    print(f"{args.classes} classes, {h} x {w} resized image, {len(grids.windows)} windows of "
          f"{grids.grids.shape[-2]} x {grids.grids.shape[-1]} patches; uncompressed float16 [C, h, w]: "
          f"{raw / 1e6:.1f} MB\n")  # fmt: skip
    print("| form | file size | write s | read s |")
    print("|---|---:|---:|---:|")
    for name, size, t_write, t_read in rows:
        shown = f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"
        print(f"| {name} | {shown} | {t_write:.2f} | {t_read:.2f} |")


if __name__ == "__main__":
    main()
