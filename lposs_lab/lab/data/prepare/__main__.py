"""Command line of ``prepare``: ``python -m lposs_lab.lab.data.prepare NAME... [--root DIR] [options]``."""

from __future__ import annotations

import argparse
import sys

from lposs_lab.errors import UserError

from .manifest import ALIASES, TARGETS, load_manifest
from .pipeline import prepare_datasets


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lposs_lab.lab.data.prepare",
        description="Download, check, extract and convert the validation splits of the benchmarks into the "
        "layouts `python run.py dataset=NAME` reads. A rerun of a finished set does nothing.",
    )
    p.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help=f"{' '.join(TARGETS)} or all; also " + ", ".join(f"{a} (= {t})" for a, t in ALIASES.items()),
    )
    p.add_argument("--root", help="data root (default: $LPOSS_DATA_DIR, else ./data), as paths.data_dir")
    p.add_argument("--manifest", help="a JSON file replacing the packaged manifest (mirrors, tests)")
    p.add_argument("--archives", metavar="DIR", help="use the archives in DIR; make no network request")
    p.add_argument("--force", action="store_true", help="redo every step, even for stamped sets")
    p.add_argument(
        "--cityscapes-from-polygons",
        action="store_true",
        help="draw Cityscapes train ids from *_polygons.json (MMSeg/LPOSS route), not labelIds",
    )
    p.add_argument("--workers", type=int, default=None, help="conversion processes (default: CPUs, max 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 done, 2 a problem with the input, printed as one line)."""
    args = parser().parse_args(argv)
    try:
        prepare_datasets(
            args.names,
            args.root,
            manifest=load_manifest(args.manifest) if args.manifest else None,
            archives=args.archives,
            force=args.force,
            cityscapes_from_polygons=args.cityscapes_from_polygons,
            workers=args.workers,
        )
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
