"""Time `lposs_lab.refine` (LPOSS+ pixel stage on external scores) and `lposs_lab.pamr` on one image size.

    python benchmarks/bench_refine.py --size 448x640 --classes 21,150 --repeats 3

Scores are random ``[C, h/16, w/16]`` maps (a patch-level segmenter's output); the image is random
uint8 with flat regions. ``refine`` = decode + resize (no-op at short side 448) + bilinear upsampling
of the scores + pixel stage + resize/argmax to the image size; ``pixel stage`` = the
:func:`lposs_lab.pixels.pixel_stage` call alone on the upsampled scores. Medians of ``--repeats`` runs
and minima after one warm-up (numba compilation); the load average before and after is printed
(other processes on the machine inflate the medians).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from datetime import date

import numpy as np
import torch

from lposs_lab import PixelConfig, pamr, refine
from lposs_lab.kernels import resolve_backend
from lposs_lab.pixels import pixel_stage
from lposs_lab.refine import resize_scores, resized_image_tensor


def _times(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """``(median, min)`` seconds of ``repeats`` calls (the min is the robust one on a shared machine)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="448x640", help="image HxW")
    parser.add_argument("--classes", default="21,150")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-pamr", action="store_true", help="skip the PAMR rows")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 3] = (200, 40, 30)
    image[h // 2 :, w // 2 :] = (20, 90, 200)
    img, _ = resized_image_tensor(image, device=device)
    guide = torch.from_numpy(image).to(device).permute(2, 0, 1).float() / 255.0  # PAMR: original size
    backend = resolve_backend(args.backend, device.type)
    px = PixelConfig(backend=args.backend)

    # warm-up: numba compilation and allocator
    refine(image[:64, :96], torch.randn(3, 4, 6, device=device), backend=args.backend)

    print(
        f"# {date.today().isoformat()}, commit {_commit()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"device {device}, pixel backend {backend}, {args.repeats} runs, load average before "
        f"{os.getloadavg()[0]:.2f}"
    )
    print("| image | C | scores in | refine s (median / min) | pixel stage s | pamr s |")
    print("|---|---|---|---|---|---|")
    for c in (int(v) for v in args.classes.split(",")):
        g = torch.Generator().manual_seed(c)
        low = torch.randn(c, h // 16, w // 16, generator=g).to(device)
        t_refine = _times(lambda low=low: refine(image, low, backend=args.backend), args.repeats, device)
        up = resize_scores(low, img.shape[1], img.shape[2])
        t_pixel = _times(lambda up=up: pixel_stage(img, up, px), args.repeats, device)
        t_pamr = (float("nan"), float("nan"))
        if not args.no_pamr:
            full = resize_scores(low, h, w)
            t_pamr = _times(lambda full=full: pamr(guide, full), args.repeats, device)
        cells = " | ".join(f"{med:.3f} / {low_:.3f}" for med, low_ in (t_refine, t_pixel, t_pamr))
        print(f"| {h}x{w} | {c} | {h // 16}x{w // 16} | {cells} |")
    print(f"# load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
