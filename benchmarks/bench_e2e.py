"""End-to-end LPOSS+ time per image, split by stage (features, patch LP, pixel LP).

The encoders are the real architectures (DINO ViT-B/16 and OpenCLIP ViT-B-16) with random weights
(``pretrained=False``: no download, and the cost is the same as with the real weights), or the tiny
random models (``--tiny``). Prints a markdown table; medians over ``--repeats`` after a warm-up.

    python benchmarks/bench_e2e.py --sizes 448x640 --classes 21 --device cpu
    python benchmarks/bench_e2e.py --device cuda --dtype float16 --compare-dtype
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lposs_lab import LPOSS, LPOSSConfig, PixelConfig
from lposs_lab.models import create_vlm, create_vm


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, blobby, slightly noisy RGB image (uint8), so the pixel graph has regions and edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 0.35 + 0.5
    for _ in range(12):
        cy, cx, r = rng.random() * h, rng.random() * w, (0.05 + 0.15 * rng.random()) * min(h, w)
        mask = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
        img[mask] = rng.random(3)
    img += rng.normal(0, 0.02, img.shape)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def build(args, dtype: str) -> LPOSS:
    if args.tiny:
        vm, vlm = create_vm("tiny_random"), create_vlm("tiny_random")
    else:
        vm, vlm = create_vm(args.vm, pretrained=False), create_vlm(args.vlm, pretrained=False)
    cfg = LPOSSConfig(
        vm=args.vm,
        vlm=args.vlm,
        device=args.device,
        encoder_dtype=dtype,
        pixel=PixelConfig(backend=args.backend),
    )
    return LPOSS(vm, vlm, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="448x640", help="comma-separated HxW of the input image")
    ap.add_argument("--classes", default="21", help="comma-separated class counts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default="auto", help="pixel stencil backend")
    ap.add_argument("--vm", default="dino_b16")
    ap.add_argument("--vlm", default="maskclip_b16")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny random encoders instead of the real architectures"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compare-dtype",
        action="store_true",
        help="also report how much half-precision encoders change the scores and labels",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args, args.dtype)
    ref_model = build(args, "float32") if args.compare_dtype and args.dtype != "float32" else None
    print(
        f"device: {model.device}, encoders: {'tiny' if args.tiny else args.vm + ' + ' + args.vlm} "
        f"({args.dtype}), torch {torch.__version__}, threads {torch.get_num_threads()}\n"
    )
    print(
        "| image | C | features s | patch LP s | pixel LP s | total s |"
        + (" max abs Δscore | label agree |" if ref_model else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if ref_model else ""))
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.lower().split("x"))
        image = synthetic_image(h, w)
        for c in (int(v) for v in args.classes.split(",")):
            names = [f"class {i}" for i in range(c)]
            model.set_classes(names)
            model.predict(image)  # warm-up (kernel compilation, allocator)
            runs = [model.predict(image).timings for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row = (
                f"| {h}x{w} | {c} | {med['features']:.3f} | {med['patch_lp']:.3f} | {med['pixel_lp']:.3f} "
                f"| {med['total']:.3f} |"
            )
            if ref_model is not None:
                ref_model.set_classes(names)
                a, b = model.predict(image), ref_model.predict(image)
                diff = (a.low_res_scores - b.low_res_scores).abs().max().item()
                agree = (a.labels == b.labels).float().mean().item()
                row += f" {diff:.2e} | {agree * 100:.2f}% |"
            print(row, flush=True)
    t = time.strftime("%Y-%m-%d")
    print(f"\n(measured {t}; images are resized per docs/method.md §1 first: 448xW inputs are used as is)")


if __name__ == "__main__":
    main()
