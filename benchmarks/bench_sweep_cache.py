"""A 10-point k sweep with and without the feature cache (tiny random encoders, synthetic VOC20, CPU).

    python benchmarks/bench_sweep_cache.py [--images 8] [--size 240 320] [--method lposs]

Prints a table: total sweep seconds, seconds in the encoders, and the speed-up. The uncached sweep encodes
every image at every point; the cached one encodes each image once (first point) and reads Arrow after.
``--arch base`` (default) runs the real ViT-B/16 architectures, random weights: the encoder cost is real,
no download needed; ``--arch tiny`` the tiny test encoders (encoding is then almost free).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320))
    ap.add_argument("--method", default="lposs", choices=("lposs", "lposs_plus"))
    ap.add_argument("--arch", default="base", choices=("base", "tiny"),
                    help="base: DINO + CLIP ViT-B/16 architectures, random weights (real encoder cost);"
                    " tiny: the tiny test encoders")
    args = ap.parse_args()

    import torch
    from synthetic_data import make_dataset

    from lposs_lab.config import LPConfig, LPOSSConfig, WindowConfig
    from lposs_lab.lab.cache import attach_feature_cache
    from lposs_lab.lab.data import SegmentationDataset
    from lposs_lab.models import create_vlm, create_vm
    from lposs_lab.predictor import LPOSS

    torch.set_num_threads(2)
    ks = [10, 20, 40, 60, 80, 100, 150, 200, 300, 400]
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        make_dataset(tmp / "data", "voc20", args.images, tuple(args.size), seed=0)
        ds = SegmentationDataset("voc20", tmp / "data")
        samples = [ds[i] for i in range(len(ds))]
        names = ("dino_b16", "maskclip_b16") if args.arch == "base" else ("tiny_random", "tiny_random")
        vm = create_vm(names[0], pretrained=False)
        vlm = create_vlm(names[1], pretrained=False)
        base = LPOSSConfig(vm=names[0], vlm=names[1], device="cpu", window=WindowConfig())
        rows = []
        for cached in (False, True):
            enc = {"calls": 0, "seconds": 0.0}
            t0 = time.perf_counter()
            outputs = []
            model = LPOSS(vm, vlm, base, method=args.method)
            model.set_classes(list(ds.info.classes))
            original = model.extract

            def timed(*a, _orig=original, _enc=enc, **kw):
                t = time.perf_counter()
                out = _orig(*a, **kw)
                _enc["calls"] += 1
                _enc["seconds"] += time.perf_counter() - t
                return out

            model.extract = timed
            if cached:
                attach_feature_cache(model, tmp / "cache", "voc20@bench", shard_size=4)
            for k in ks:
                model.config = replace(base, lp=LPConfig(k=k))
                outputs.append([model.predict(s["image"], image_id=s["id"]).labels for s in samples])
            if cached:
                model.feature_cache.close()
            total = time.perf_counter() - t0
            rows.append((cached, total, enc["calls"], enc["seconds"], outputs))
            print(f"cache {'on' if cached else 'off'}: {total:.1f}s", file=sys.stderr, flush=True)
        pairs = zip(rows[0][4], rows[1][4], strict=True)
        same = all(torch.equal(a, b) for pa, pb in pairs for a, b in zip(pa, pb, strict=True))
        n = len(samples)
        print(f"{len(ks)}-point k sweep, {n} synthetic VOC20 images {args.size[0]}x{args.size[1]} "
              f"(resized to short side 448), method {args.method}, encoders {args.arch} (random weights), "
              f"CPU {torch.get_num_threads()} threads")
        print(f"{'cache':<8}{'sweep s':>10}{'encoder calls':>15}{'encoder s':>11}{'s/point':>9}")
        for cached, total, calls, esec, _ in rows:
            name = "on" if cached else "off"
            print(f"{name:<8}{total:>10.1f}{calls:>15d}{esec:>11.1f}{total / len(ks):>9.2f}")
        print(f"speed-up: {rows[0][1] / rows[1][1]:.2f}x; labels identical with and without cache: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
