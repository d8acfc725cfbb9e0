"""The web app's response times: one Segment on a new image, then propagation slider moves on kept features.

    python benchmarks/bench_app.py                      # tiny random-init encoders (no weights needed), CPU
    python benchmarks/bench_app.py --vm dino_b16 --vlm maskclip_b16 --device cuda
    python benchmarks/bench_app.py --serve              # also: start to first page of python -m lposs_lab.app

Prints one row per request: what moved, seconds, which methods were recomputed and whether the image features
were reused. The image is ``examples/astronaut.jpg`` resized to ``--size`` (default 448x640, H x W).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = "person;astronaut, flag, rocket;space shuttle, wall;background"


def _serve_seconds(vm: str, vlm: str, device: str, timeout: float = 300.0) -> float:
    """Seconds from ``python -m lposs_lab.app`` to the first page served on a free 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lposs_lab.app", "--vm", vm, "--vlm", vlm, "--device", device]
    cmd += ["--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"the app exited with status {proc.returncode} before serving a page")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.25)
        raise SystemExit(f"no page served within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vm", default="tiny_random")
    ap.add_argument("--vlm", default="tiny_random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="448x640", help="H x W of the test image")
    ap.add_argument("--serve", action="store_true", help="also time start to first served page")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    from lposs_lab.app.engine import Engine, Params

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        Image.open(REPO / "examples" / "astronaut.jpg").convert("RGB").resize((w, h)).save(path)
        t0 = time.perf_counter()
        engine = Engine(args.vm, args.vlm, device=args.device)
        engine.model()
        build = time.perf_counter() - t0
        steps = [
            ("Segment, new image (all three methods)", Params()),
            ("same request again (results kept)", Params()),
            ("slider: k=200", Params(k=200)),
            ("slider: tau=0.02 (k=200 kept)", Params(k=200, tau=0.02)),
            ("slider: abstain threshold 0.5", Params(k=200, tau=0.02, threshold=0.5)),
        ]
        rows = [("build models", build, "-", "-")]
        for name, params in steps:
            t0 = time.perf_counter()
            result = engine.segment(str(path), CLASSES, params=params)
            seconds = time.perf_counter() - t0
            redone = [m for m in result.labels if m not in result.unchanged]
            rows.append((name, seconds, ",".join(redone) or "none", str(result.features_reused)))
    if args.serve:
        rows.append(("start to first served page", _serve_seconds(args.vm, args.vlm, args.device), "-", "-"))
    n = len(CLASSES.split(","))
    print(f"vm={args.vm} vlm={args.vlm} device={args.device} image {h}x{w}, {n} classes")
    print(f"| {'request':<42} | {'seconds':>8} | {'recomputed':<24} | features reused |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 26}|-----------------|")
    for name, seconds, redone, reused in rows:
        print(f"| {name:<42} | {seconds:8.2f} | {redone:<24} | {reused:<15} |")


if __name__ == "__main__":
    main()
