"""Benchmark the two propagation stages against the per-class scipy port of the published structure.

Every measurement runs in its own child process (so peak memory is that process's RSS high-water
mark, which sees torch, numpy and numba alike): a warm-up on a small input of the same kind (JIT,
caches, allocator), then ``--repeats`` timed runs at full size; the table gives the median.

    python benchmarks/bench_propagation.py --quick
    python benchmarks/bench_propagation.py --sizes 448x640 --classes 21 --repeats 3

Columns: ``time`` median seconds of one whole stage (graph construction and the 10-step CG);
``port build``/``port CG`` split the port's time; ``peak RSS`` the child's high-water mark;
``+RSS`` that minus its RSS once the inputs existed; ``rel diff`` = max |ours - port| / max |port|.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SIZES = "224x288,448x640,448x896"
DEFAULT_CLASSES = "21,60,171"


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-ish ``[H, W, 3]`` RGB image in ``[0, 1]``: smooth gradients, coloured blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.6 * yy + 0.2, 0.5 * xx + 0.3 * yy, 0.7 - 0.4 * xx], axis=-1)
    for _ in range(12):
        cy, cx = rng.random(2)
        rad = 0.05 + 0.2 * rng.random()
        blob = np.exp(-((((yy - cy) ** 2 + (xx - cx) ** 2) / rad**2) ** 2))
        img = img * (1 - blob[..., None]) + rng.random(3) * blob[..., None]
    img = img + 0.03 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).astype(np.float32) / 255.0


def patch_layout(h: int, w: int, window: int = 224, stride: int = 112, patch: int = 16) -> np.ndarray:
    """Patch centres ``[N, 2]`` of all sliding windows of an ``h x w`` image (docs/method.md §1, §3)."""

    def starts(n_pix: int) -> list[int]:
        n = max(n_pix - window + stride - 1, 0) // stride + 1
        return [max(min(i * stride + window, n_pix) - window, 0) for i in range(n)]

    g = window // patch
    centres = [
        (y1 + patch / 2 + patch * i, x1 + patch / 2 + patch * j)
        for y1 in starts(h)
        for x1 in starts(w)
        for i in range(g)
        for j in range(g)
    ]
    return np.asarray(centres, dtype=np.float32)


def make_inputs(stage: str, h: int, w: int, c: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    if stage == "pixel":
        return {
            "image": synthetic_image(h, w, seed),
            "scores": rng.standard_normal((c, h, w)).astype(np.float32),
        }
    pos = patch_layout(h, w)
    feats = rng.standard_normal((pos.shape[0], 768)).astype(np.float32)
    return {
        "features": feats,
        "positions": pos,
        "scores": rng.standard_normal((pos.shape[0], c)).astype(np.float32),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _runner(impl: str, stage: str, device: str, max_bytes: int = 0):
    """``(fn(inputs) -> (output ndarray, {phase: seconds}), sync)`` for one implementation."""
    if impl == "port":
        sys.path.insert(0, str(HERE))
        import reference_port as rp

        def port(inp):
            t0 = time.perf_counter()
            if stage == "pixel":
                c, h, w = inp["scores"].shape
                lap = rp.pixel_laplacian(inp["image"])
                y = inp["scores"].reshape(c, h * w).T
            else:
                lap = rp.patch_laplacian(inp["features"], inp["positions"])
                y = inp["scores"]
            t1 = time.perf_counter()
            x = rp.solve_per_class(lap, y)
            t2 = time.perf_counter()
            out = x.T.reshape(inp["scores"].shape) if stage == "pixel" else x
            return out, {"build": t1 - t0, "cg": t2 - t1}

        return port, lambda: None

    import torch

    sys.path.insert(0, str(REPO))
    from lposs_lab.pixels import refine_pixels
    from lposs_lab.propagation import refine_patches

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    extra = {"max_bytes": max_bytes} if max_bytes else {}

    def ours(inp):
        t = {k: torch.from_numpy(v).to(device) for k, v in inp.items()}
        sync()
        if stage == "pixel":
            out = refine_pixels(t["image"].permute(2, 0, 1).contiguous(), t["scores"], backend=impl, **extra)
        else:
            out = refine_patches(t["features"], t["positions"], t["scores"])
        sync()
        return out.cpu().numpy(), {}

    return ours, sync


def child(spec: dict) -> None:
    """Run one measurement and print its JSON result (invoked as ``--child JSON``)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    stage, h, w, c, impl = spec["stage"], spec["h"], spec["w"], spec["c"], spec["impl"]
    fn, _ = _runner(impl, stage, spec["device"], spec.get("max_bytes", 0))
    small = make_inputs(stage, min(h, 48), min(w, 64), c, seed=7)
    fn(small)  # warm-up: JIT / cache loading / allocator
    inp = make_inputs(stage, h, w, c)
    base = _rss_mb()
    times, phases = [], []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        result, ph = fn(inp)
        times.append(time.perf_counter() - t0)
        phases.append(ph)
        del result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # One more run to hand the output to the parent (not timed, after the peak was read).
    result, _ = fn(inp)
    np.save(spec["out"], result)
    gpu_peak = None
    if spec["device"].startswith("cuda") and impl != "port":
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20
    print(
        "RESULT "
        + json.dumps(
            {"times": times, "phases": phases, "peak_mb": peak, "base_mb": base, "gpu_peak_mb": gpu_peak}
        )
    )


def measure(
    stage: str, h: int, w: int, c: int, impl: str, repeats: int, device: str, out: str, max_bytes: int = 0
) -> dict:
    spec = {"stage": stage, "h": h, "w": w, "c": c, "impl": impl, "repeats": repeats, "device": device}
    spec.update(out=out, max_bytes=max_bytes)
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not line:
        raise RuntimeError(f"{impl} {stage} {h}x{w} C={c} failed:\n{res.stderr[-2000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def _backends(device: str) -> list[str]:
    sys.path.insert(0, str(REPO))
    from lposs_lab.kernels import available_backends

    return [b for b in available_backends(device.split(":")[0]) if b != "auto"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small size, 21 classes, 1 repeat")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"HxW list (default {DEFAULT_SIZES})")
    ap.add_argument("--classes", default=DEFAULT_CLASSES, help=f"class counts (default {DEFAULT_CLASSES})")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of ours per case (median reported)")
    ap.add_argument("--port-repeats", type=int, default=1, help="timed runs of the scipy port per case")
    ap.add_argument("--device", default="cpu", help="device of ours: cpu or cuda[:i] (the port is CPU)")
    ap.add_argument("--backends", default=None, help="pixel-stage backends (default: all available)")
    ap.add_argument("--stages", default="pixel,patch", help="pixel,patch")
    ap.add_argument(
        "--torch-max-pixels",
        type=int,
        default=300_000,
        help="skip the slow torch pixel backend on larger CPU images (0: never skip)",
    )
    ap.add_argument(
        "--max-bytes",
        type=int,
        default=0,
        help="refine_pixels(max_bytes=...) class-chunk budget (0: its default)",
    )
    ap.add_argument("--no-port", action="store_true", help="skip the scipy port (no speed-up / diff columns)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.sizes, args.classes, args.repeats = "224x288", "21", 1
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    classes = [int(c) for c in args.classes.split(",") if c]
    backends = args.backends.split(",") if args.backends else _backends(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in [s for s in args.stages.split(",") if s]:
            impls = backends if stage == "pixel" else ["torch"]
            for h, w in sizes:
                for c in classes:
                    ref, port_t = None, None
                    if not args.no_port:
                        ref_path = os.path.join(tmp, "port.npy")
                        r = measure(stage, h, w, c, "port", args.port_repeats, "cpu", ref_path)
                        port_t = statistics.median(r["times"])
                        ref = np.load(ref_path)
                        ph = r["phases"][0]
                        rows.append(
                            [
                                stage,
                                f"{h}x{w}",
                                c,
                                "scipy port",
                                port_t,
                                len(r["times"]),
                                r["peak_mb"],
                                r["peak_mb"] - r["base_mb"],
                                None,
                                None,
                                ph["build"],
                                ph["cg"],
                            ]
                        )
                        print(f"# {stage} {h}x{w} C={c} port {port_t:.2f}s", file=sys.stderr, flush=True)
                    for impl in impls:
                        if (
                            stage == "pixel"
                            and impl == "torch"
                            and args.device == "cpu"
                            and 0 < args.torch_max_pixels < h * w
                        ):
                            continue
                        path = os.path.join(tmp, f"{impl}.npy")
                        r = measure(stage, h, w, c, impl, args.repeats, args.device, path, args.max_bytes)
                        t = statistics.median(r["times"])
                        diff = None
                        if ref is not None:
                            diff = float(np.abs(np.load(path) - ref).max() / np.abs(ref).max())
                        name = f"ours ({impl})" if stage == "pixel" else "ours (torch CSR)"
                        peak = r["gpu_peak_mb"] if r["gpu_peak_mb"] is not None else r["peak_mb"]
                        rows.append(
                            [
                                stage,
                                f"{h}x{w}",
                                c,
                                name,
                                t,
                                len(r["times"]),
                                peak,
                                peak - (0 if r["gpu_peak_mb"] is not None else r["base_mb"]),
                                (port_t / t) if port_t else None,
                                diff,
                                None,
                                None,
                            ]
                        )
                        print(f"# {stage} {h}x{w} C={c} {impl} {t:.2f}s", file=sys.stderr, flush=True)
    print(format_table(rows, args.device))
    return 0


def format_table(rows: list[list], device: str) -> str:
    mem = "peak GPU MB" if device.startswith("cuda") else "peak RSS MB"
    head = [
        "stage",
        "size",
        "C",
        "impl",
        "time s",
        "runs",
        mem,
        "+RSS MB",
        "speed-up",
        "rel diff",
        "port build s",
        "port CG s",
    ]

    def fmt(v, i):
        if v is None:
            return ""
        if i == 4 or i in (10, 11):
            return f"{v:.3f}" if v < 10 else f"{v:.1f}"
        if i in (6, 7):
            return f"{v:.0f}"
        if i == 8:
            return f"{v:.1f}x"
        if i == 9:
            return f"{v:.1e}"
        return str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(v, i) for i, v in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
