"""``task=segment``: label PNG, overlay with a legend and (on request) scores for each input image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig

from ..image_io import atomic_write, load_image
from ..viz import label_image, label_name, overlay, save_png
from .common import build_predictor, parse_classes

__all__ = ["segment"]


def _image_paths(value) -> list[Path]:
    from . import UserError

    if value is None:
        raise UserError("no image given: pass image=PATH (or image=[a.jpg,b.png])")
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not items:
        raise UserError("the image list is empty: pass image=PATH")
    return [Path(str(p)).expanduser() for p in items]


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return stems


def segment(cfg: DictConfig) -> list[dict]:
    """Segment every ``image`` into ``classes``; write ``<out>/<name>.png`` (+ overlay, scores)."""
    paths = _image_paths(cfg.get("image"))
    classes = parse_classes(cfg.get("classes"))
    # Decode everything first: a bad input fails the run before any output is written.
    images = [load_image(p) for p in paths]
    out = Path(str(cfg.get("out") or "outputs")).expanduser()
    if out.exists() and not out.is_dir():
        from . import UserError

        raise UserError(f"out={out} exists and is not a directory")
    model = build_predictor(cfg)
    model.set_classes(classes)
    results = []
    for path, stem, image in zip(paths, _unique_stems(paths), images, strict=True):
        pred = model.predict(image)
        labels = pred.labels.numpy()
        save_png(label_image(labels), out / f"{stem}.png")
        if cfg.get("overlay", True):
            save_png(overlay(image, labels, pred.class_names), out / f"{stem}_overlay.png")
        if cfg.get("save_scores", False):
            buf = io.BytesIO()
            np.savez_compressed(
                buf, scores=pred.scores.numpy().astype(np.float16), classes=np.array(pred.class_names)
            )
            with atomic_write(out / f"{stem}_scores.npz") as fh:
                fh.write(buf.getvalue())
        present = {
            label_name(int(i), pred.class_names): int(c)
            for i, c in zip(*np.unique(labels, return_counts=True), strict=True)
        }
        summary = {
            "image": str(path),
            "label_png": str(out / f"{stem}.png"),
            "size": list(labels.shape),
            "classes": pred.class_names,
            "pixels_per_class": present,
            "seconds": {k: round(v, 4) for k, v in pred.timings.items()},
        }
        results.append(summary)
        t = pred.timings
        print(
            f"{path} -> {out / (stem + '.png')}  [{labels.shape[1]}x{labels.shape[0]}, "
            f"{t['total']:.2f}s: features {t['features']:.2f}s, patch LP {t['patch_lp']:.2f}s, "
            f"pixel LP {t['pixel_lp']:.2f}s]"
        )
    with atomic_write(out / "segment.json", "w") as fh:
        json.dump({"method": model.method, "classes": classes, "images": results}, fh, indent=2)
    return results
