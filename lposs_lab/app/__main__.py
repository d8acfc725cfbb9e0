"""``python -m lposs_lab.app [--runs DIR] [--vm NAME] [--vlm NAME] [--device auto|cpu|cuda] [--host H]
[--port N] [--share]``: serve the web app (127.0.0.1 unless ``--host`` says otherwise; ``--share`` opts
in to a public Gradio link)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lposs_lab.config import LPOSSConfig
from lposs_lab.errors import UserError

DEFAULTS = LPOSSConfig()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lposs-app", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--runs", type=Path, default=None, help="folder whose results.json files the Runs tab shows"
    )
    p.add_argument("--vm", default=DEFAULTS.vm, help=f"graph-feature encoder (default {DEFAULTS.vm})")
    p.add_argument("--vlm", default=DEFAULTS.vlm, help=f"initial predictor (default {DEFAULTS.vlm})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--share", action="store_true", help="also open a public Gradio share link (off by default)"
    )
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    from lposs_lab.models import VLM_MODELS, VM_MODELS
    from lposs_lab.predictor import resolve_device

    for kind, name, table in (("vm", args.vm, VM_MODELS), ("vlm", args.vlm, VLM_MODELS)):
        if name not in table:
            raise UserError(f"unknown --{kind} {name!r}; valid: {', '.join(table)}")
    if args.runs is not None and not args.runs.expanduser().is_dir():
        raise UserError(
            f"--runs {args.runs} is not a folder; pass the folder holding your runs' results.json"
        )
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is out of range; valid: 1..65535")
    resolve_device(args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        _check(args)
        from .ui import AppSettings, build_app, launch

        settings = AppSettings(
            runs=None if args.runs is None else args.runs.expanduser().resolve(), vm=args.vm, vlm=args.vlm,
            device=args.device, host=args.host, port=args.port, share=args.share,
        )  # fmt: skip
        demo = build_app(settings)
        launch(demo, settings, prevent_thread_lock=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in ("gradio", "gradio_client"):
            raise
        print("error: the web app needs Gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    print(
        f"serving on http://{args.host}:{args.port} "
        f"(ready after {time.perf_counter() - t0:.1f} s); Ctrl+C stops"
    )
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
