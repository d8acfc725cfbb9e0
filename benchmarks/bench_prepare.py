"""``prepare``: wall time of ``prepare all`` on the synthetic archives, and label conversion throughput.

1. ``prepare all`` on the tests' synthetic archives (``tests/support/synthetic_archives.py``, 32x24 images),
   from ``--archives`` (no network) and over HTTP from a local server, then a rerun (valid stamps).
2. Label files per second at 640x480 for each conversion (and the verification read), in one process and
   in ``--workers`` processes: Context (RLE decode, paint, map, PNG), COCO (one read, two PNGs), Cityscapes
   from labelIds and from polygons, and ``verify`` (image header + label read + value check).

    python benchmarks/bench_prepare.py --n 40 --files 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from http_server import FileServer  # noqa: E402
from synthetic_archives import encode_rle, make_archives, write_manifest  # noqa: E402

from lposs_lab.lab.data.prepare import load_manifest, prepare_datasets  # noqa: E402
from lposs_lab.lab.data.prepare import recipes as R  # noqa: E402
from lposs_lab.lab.data.prepare.context import CONTEXT59_IDS  # noqa: E402
from lposs_lab.lab.data.prepare.verify import check_pair  # noqa: E402

HH, WW = 480, 640


def _quiet(_line: str) -> None:
    pass


def bench_prepare_all(tmp: Path, n: int, workers: int) -> list[tuple[str, float]]:
    syn = make_archives(tmp / "archives", n=n)
    rows = []
    root = tmp / "local"
    manifest = load_manifest(write_manifest(tmp / "m_local.json", syn, None))
    t0 = time.perf_counter()
    prepare_datasets(["all"], root, manifest=manifest, archives=tmp / "archives", workers=workers, log=_quiet)
    rows.append((f"prepare all, --archives, {n} images/set", time.perf_counter() - t0))
    t0 = time.perf_counter()
    prepare_datasets(["all"], root, manifest=manifest, archives=tmp / "archives", workers=workers, log=_quiet)
    rows.append(("rerun (valid stamps)", time.perf_counter() - t0))
    with FileServer({f"/{k}": p for k, p in syn.archives.items()}) as srv:
        root = tmp / "http"
        (root / "downloads").mkdir(parents=True)
        for k in ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"):
            (root / "downloads" / k).write_bytes(syn.archives[k].read_bytes())
        manifest = load_manifest(write_manifest(tmp / "m_http.json", syn, srv.url))
        t0 = time.perf_counter()
        prepare_datasets(
            ["all"], root, manifest=manifest, workers=workers, log=_quiet, stream=open("/dev/null", "w")
        )
        rows.append((f"prepare all, over HTTP (127.0.0.1), {n} images/set", time.perf_counter() - t0))
    return rows


def _raw_maps(rng: np.random.Generator, values: list[int], fill: int) -> np.ndarray:
    lab = np.full((HH, WW), fill, dtype=np.uint8)
    for _ in range(12):
        y0, x0 = int(rng.integers(0, HH - 40)), int(rng.integers(0, WW - 40))
        lab[y0 : y0 + int(rng.integers(20, 200)), x0 : x0 + int(rng.integers(20, 300))] = rng.choice(values)
    return lab


def conversion_inputs(tmp: Path, files: int) -> dict[str, list]:
    rng = np.random.default_rng(0)
    out: dict[str, list] = {k: [] for k in ("context", "coco", "city_ids", "city_poly", "verify")}
    for i in range(files):
        segs = []
        for _ in range(8):
            mask = _raw_maps(rng, [1], 0).astype(bool)
            segs.append((int(rng.choice(CONTEXT59_IDS)), encode_rle(mask)))
        out["context"].append((f"x{i}", HH, WW, segs, str(tmp / f"ctx_{i}.png")))
        raw = tmp / f"coco_{i}.png"
        Image.fromarray(_raw_maps(rng, [0, 5, 40, 91, 120, 181], 255)).save(raw)
        out["coco"].append((str(raw), str(tmp / f"coco_{i}_s.png"), str(tmp / f"coco_{i}_o.png")))
        ids = tmp / f"city_{i}_labelIds.png"
        Image.fromarray(_raw_maps(rng, [7, 8, 11, 21, 23, 26], 0)).save(ids)
        out["city_ids"].append((str(ids), str(tmp / f"city_{i}_t.png")))
        objs = []
        for _ in range(40):
            x, y = float(rng.integers(0, WW - 60)), float(rng.integers(0, HH - 60))
            pts = [[x + 60 * np.cos(a), y + 60 * np.sin(a)] for a in np.linspace(0, 6.2, 24)]
            objs.append({"label": str(rng.choice(["road", "car", "person", "building"])), "polygon": pts})
        poly = tmp / f"city_{i}_polygons.json"
        poly.write_text(json.dumps({"imgHeight": HH, "imgWidth": WW, "objects": objs}))
        out["city_poly"].append((str(poly), str(tmp / f"city_{i}_p.png")))
        img = tmp / f"img_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (HH, WW, 3), dtype=np.uint8)).save(img, quality=90)
        out["verify"].append((str(img), str(ids), 256))
    return out


def bench_conversions(tmp: Path, files: int, workers: int) -> list[tuple[str, int, float, float]]:
    inputs = conversion_inputs(tmp, files)
    fns = {"context": R._context_task, "coco": R._coco_task, "city_ids": R._city_ids_task,
           "city_poly": R._city_poly_task, "verify": check_pair}  # fmt: skip
    names = {
        "context": "Context: RLE -> 0..59 PNG",
        "coco": "COCO: stuffthingmaps -> 171 + 81 PNGs",
        "city_ids": "Cityscapes: labelIds -> trainIds",
        "city_poly": "Cityscapes: polygons (40) -> trainIds",
        "verify": "verify: image header + label values",
    }
    rows = []
    for key, fn in fns.items():
        rates = []
        for w in (1, workers):
            t0 = time.perf_counter()
            if key == "verify" and w > 1:
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(w) as pool:
                    list(pool.map(fn, inputs[key], chunksize=8))
            else:
                R.run_tasks(fn, inputs[key], w)
            rates.append(files / (time.perf_counter() - t0))
        rows.append((names[key], files, rates[0], rates[1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="validation images per synthetic set")
    ap.add_argument("--files", type=int, default=200, help="640x480 label files per conversion")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = bench_prepare_all(tmp / "all", args.n, args.workers)
        print(f"| prepare (workers={args.workers}) | wall s |\n|---|---|")
        for name, sec in rows:
            print(f"| {name} | {sec:.3f} |")
        (tmp / "conv").mkdir()
        conv = bench_conversions(tmp / "conv", args.files, args.workers)
        print(
            f"\n| conversion at {WW}x{HH} | files | files/s, 1 process | files/s, {args.workers} processes |"
        )
        print("|---|---|---|---|")
        for name, n, r1, rw in conv:
            print(f"| {name} | {n} | {r1:.1f} | {rw:.1f} |")


if __name__ == "__main__":
    main()
