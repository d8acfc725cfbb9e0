"""COCO-Object labels from COCO-Stuff-164k label maps (docs/method.md §7).

The stuffthingmaps PNGs hold 0-based COCO-Stuff ids: things 0..90 (COCO's 91-id space, of which 11 ids are
unused), stuff 91..181, 255 unlabeled. COCO-Object keeps the 80 real thing ids, in order, as 1..80 and puts
everything else (stuff, unlabeled, and the never-used ids) into 0 = background, so it has no ignored pixels.

CLI: ``python -m lposs_lab.lab.data.coco_object SRC DST`` converts every ``SRC/*.png`` (files already named
``*TrainIds.png`` are skipped) to ``DST/<name>_instanceTrainIds.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lposs_lab.files import atomic_write
from lposs_lab.lab.data.benchmarks import BENCHMARKS

__all__ = [
    "COCO_THING_IDS",
    "COCO_UNUSED_IDS",
    "OBJECT_SUFFIX",
    "coco_object_lut",
    "convert_coco_stuff_to_object",
    "convert_label_map",
    "main",
]

# 1-based COCO category ids that the 2014 paper defined but never annotated (street sign, hat, shoe,
# eye glasses, plate, mirror, window, desk, door, blender, hair brush); 0-based in stuffthingmaps.
COCO_UNUSED_IDS: tuple[int, ...] = tuple(i - 1 for i in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91))
COCO_THING_IDS: tuple[int, ...] = tuple(i for i in range(91) if i not in COCO_UNUSED_IDS)
OBJECT_SUFFIX: str = BENCHMARKS["coco_object"].label_suffix  # "_instanceTrainIds.png"
assert len(COCO_THING_IDS) == 80 and max(COCO_THING_IDS) == 89


def coco_object_lut() -> np.ndarray:
    """Lookup table ``[256]`` uint8: stuffthingmaps id -> COCO-Object label (things 1..80, else 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(COCO_THING_IDS)] = np.arange(1, 81, dtype=np.uint8)
    return lut


def convert_label_map(label: np.ndarray) -> np.ndarray:
    """Map one ``[H, W]`` stuffthingmaps label array to COCO-Object labels ``[H, W]`` uint8 in 0..80."""
    if label.ndim != 2:
        raise ValueError(f"label map must be [H, W], got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError("label map has values outside 0..255; expected a COCO-Stuff stuffthingmaps PNG")
        label = label.astype(np.uint8)
    return coco_object_lut()[label]


def _read_map(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise ValueError(
                    f"{path} has mode {img.mode}; expected a single-channel 8-bit stuffthingmaps PNG"
                )
            return np.asarray(img)
    except ValueError:
        raise
    except (OSError, SyntaxError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot read {path}: {msg}") from None


def convert_coco_stuff_to_object(
    stuff_label_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> list[Path]:
    """Convert every stuffthingmaps PNG in ``stuff_label_dir`` to ``out_dir/<stem>_instanceTrainIds.png``.

    Files whose name already contains ``TrainIds`` (MMSeg's converted maps living beside the raw ones) are
    skipped. Each output is written atomically.

    Args:
        stuff_label_dir: folder with COCO-Stuff-164k ``<image id>.png`` label maps
            (e.g. ``annotations/val2017``).
        out_dir: output folder (created if missing; may equal ``stuff_label_dir``).

    Returns:
        The written files, sorted.

    Raises:
        ValueError: missing folder, no PNG in it, or a file that is not a single-channel 8-bit label map
            (one line naming the file).
    """
    src = Path(stuff_label_dir)
    if not src.is_dir():
        raise ValueError(
            f"{src} is not a folder; pass the COCO-Stuff-164k label folder (e.g. annotations/val2017)"
        )
    files = sorted(p for p in src.glob("*.png") if p.is_file() and "TrainIds" not in p.name)
    if not files:
        raise ValueError(f"no stuffthingmaps .png label maps in {src}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        converted = convert_label_map(_read_map(path))
        target = out / f"{path.stem}{OBJECT_SUFFIX}"
        with atomic_write(target) as fh:
            Image.fromarray(converted).save(fh, format="PNG")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 bad arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m lposs_lab.lab.data.coco_object",
        description="Convert COCO-Stuff-164k stuffthingmaps PNGs to COCO-Object *_instanceTrainIds.png maps.",
    )
    parser.add_argument("src", help="folder with COCO-Stuff <id>.png label maps (e.g. annotations/val2017)")
    parser.add_argument("dst", help="output folder for <id>_instanceTrainIds.png")
    args = parser.parse_args(argv)
    try:
        written = convert_coco_stuff_to_object(args.src, args.dst)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} COCO-Object label maps to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
