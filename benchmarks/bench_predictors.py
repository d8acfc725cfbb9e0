"""CPU time of each initial predictor's dense features for one image's windows, against MaskCLIP.

Real architectures (ViT-B/16; OpenAI ``ViT-B-16-quickgelu`` for the five docs/predictors.md methods, OpenCLIP
``ViT-B-16`` for MaskCLIP, DINO ViT-B/16 for ProxyCLIP's VFM and the VM) with **random init** (no
download; the cost does not depend on the weights, except SC-CLIP's data-dependent parts, which are
negligible). One 448x640 image -> 224/112 windows (3 x 5 = 15), one batch, float32, ``torch.no_grad``.
A warm-up run on one window, then ``--repeats`` timed runs; the table gives the median seconds and
the ratio to MaskCLIP.

    python benchmarks/bench_predictors.py [--threads 2] [--repeats 3] [--size 448x640]

Rows ``VM + ProxyCLIP`` compare what LPOSS pays per image for both encoders: ProxyCLIP running its own
DINO beside the VM, or the VM's single DINO pass shared (``shared_vfm_forward``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lposs_lab.models import create_vlm, create_vm
from lposs_lab.models.proxyclip import shared_vfm_forward
from lposs_lab.windows import crop_windows, window_grid


def timed(fn: Callable[[object], object], repeats: int, crops: object, warm: object) -> float:
    fn(warm)  # warm-up on one window
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(crops)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="448x640")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    windows = window_grid(h, w, 224, 112)
    crops = crop_windows(image, windows)
    print(f"image {h}x{w}: {len(windows)} windows of 224, threads={torch.get_num_threads()}")

    vm = create_vm("dino_b16", pretrained=False)
    bench = (args.repeats, crops, crops[:1])
    rows: list[tuple[str, float]] = []
    with torch.no_grad():
        names = ("maskclip_b16", "sclip_b16", "clearclip_b16", "naclip_b16", "proxyclip_b16", "scclip_b16")
        for name in names:
            enc = create_vlm(name, pretrained=False)
            rows.append((name, timed(enc, *bench)))
            print(f"{name}: {rows[-1][1]:.2f} s", flush=True)
            if name == "proxyclip_b16":
                proxy = enc
        rows.append(("dino_b16 VM (values)", timed(vm, *bench)))
        separate = timed(lambda x: (vm(x), proxy(x)), *bench)
        rows.append(("VM + ProxyCLIP, separate DINO", separate))
        if shared_vfm_forward(proxy, vm, crops) is None:
            raise RuntimeError("expected the VM's pass to be shareable with ProxyCLIP's VFM")
        shared = timed(lambda x: shared_vfm_forward(proxy, vm, x), *bench)
        rows.append(("VM + ProxyCLIP, shared DINO", shared))
    base = rows[0][1]
    print(f"| {'features (15 windows)':<32} | {'seconds':>8} | {'x MaskCLIP':>10} |")
    print(f"|{'-' * 34}|{'-' * 10}:|{'-' * 11}:|")
    for name, sec in rows:
        print(f"| {name:<32} | {sec:8.2f} | {sec / base:10.2f} |")


if __name__ == "__main__":
    main()
