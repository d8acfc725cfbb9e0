"""Seconds from `python run.py` with bad input to its one-line error (each case a fresh subprocess).

    python benchmarks/bench_errors.py                 # every case once
    python benchmarks/bench_errors.py --repeats 3     # median of 3 runs per case

Each case is a fresh ``python run.py ...`` (Python start, Hydra, our checks) in a temporary folder, offline;
the table gives its exit status, wall-clock seconds and the last line it printed on stderr. The load average
before and after is printed: other processes on the machine inflate the times.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "examples" / "astronaut.jpg"


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    """``(name, overrides)`` of every bad command; ``tmp`` holds what a case needs (a missing data folder)."""
    tiny = [f"image={IMAGE}", "classes=cat", "vm=tiny_random", "vlm=tiny_random", f"out={tmp / 'out'}"]
    return [
        ("missing image", [f"image={tmp / 'no_such_photo.jpg'}", "classes=cat"]),
        ("lp.k=-5", [f"image={IMAGE}", "classes=cat", "lp.k=-5"]),
        ("out= below a file", [f"image={IMAGE}", "classes=cat", f"out={IMAGE}/out"]),
        ("missing dataset folder", ["dataset=voc", f"paths.data_dir={tmp / 'no_data'}"]),
        ("vm=dino_b61", ["dataset=voc", "vm=dino_b61"]),
        ("lp.kk=800", ["dataset=voc", "lp.kk=800"]),
        ("classes=cat,dog unquoted", [f"image={IMAGE}", "classes=cat,dog"]),
        ("pixel.depth_model unknown", [*tiny, "pixel=depth", "pixel.depth_model=depth_xl"]),
        ("pixel.backend=triton on the CPU", [*tiny, "pixel.backend=triton", "device=cpu"]),
    ]


def run_case(overrides: list[str], tmp: Path) -> tuple[int, float, str]:
    """``(exit status, seconds, last stderr line)`` of one ``python run.py`` call."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(REPO / "run.py"), *overrides, f"hydra.run.dir={tmp / 'run'}"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    return res.returncode, seconds, (lines[-1] if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the median is shown)")
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--width", type=int, default=110, help="error lines are cut to this many characters")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"{date.today()}  {platform.node()}  {os.cpu_count()} CPUs  commit {commit}  "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print()
    print("| case | exit | seconds | error line |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-errors-") as name:
        tmp = Path(name)
        for label, overrides in cases(tmp):
            if args.k not in label:
                continue
            runs = [run_case(overrides, tmp) for _ in range(args.repeats)]
            code, _, line = runs[-1]
            seconds = statistics.median(r[1] for r in runs)
            line = line.replace(str(tmp), "TMP").replace(str(REPO), "REPO").replace("|", "\\|")
            if len(line) > args.width:
                line = line[: args.width - 3] + "..."
            print(f"| {label} | {code} | {seconds:.2f} | `{line}` |", flush=True)
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}; command: python run.py OVERRIDES "
          f"hydra.run.dir=TMP/run ({shlex.quote(sys.executable)})")


if __name__ == "__main__":
    main()
