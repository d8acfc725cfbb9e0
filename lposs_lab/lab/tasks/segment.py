"""``task=segment``: label PNG, overlay with a legend and (on request) scores for each input image.

Output names mirror the inputs' paths below their common folder: ``photos/cat.jpg`` gives
``<out>/photos/cat.labels.png``, ``cat.overlay.png`` and ``cat.scores.npz``. Two inputs that would share
a name (``x.png`` and ``x.jpg`` in one folder, or ``x.jpg`` beside ``x.labels.png``) keep their whole file
name instead (``x.png.labels.png``), so names never collide; ``segment.json`` maps every input to its
outputs. Every input is decoded and every output location checked before a model is built.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig

from lposs_lab.errors import OutputError, UserError
from lposs_lab.files import atomic_write
from lposs_lab.image_io import load_image
from lposs_lab.text import parse_classes
from lposs_lab.viz import label_image, overlay, save_png

from .config import abstain_rule, build_predictor, check_output_dir, postprocess_step, random_init_encoders

__all__ = ["segment", "output_names", "OUTPUT_SUFFIXES"]

#: what each input gives: kind -> file suffix
OUTPUT_SUFFIXES = {"labels": ".labels.png", "overlay": ".overlay.png", "scores": ".scores.npz"}


def _image_paths(value) -> list[Path]:
    if value is None:
        raise UserError("no image given: pass image=PATH (or image=[a.jpg,b.png])")
    items = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    if not items:
        raise UserError("the image list is empty: pass image=PATH")
    paths = [Path(str(p)).expanduser() for p in items]
    seen: dict[Path, int] = {}
    for i, p in enumerate(paths):
        key = p.resolve()
        if key in seen:
            raise UserError(f"image {p} is given twice (items {seen[key] + 1} and {i + 1} of image=)")
        seen[key] = i
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """A unique output stem per input, relative to the inputs' common folder (see the module docstring)."""
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    rel = [p.relative_to(root) for p in absolute]
    full = [False] * len(rel)
    while True:
        stems = [str(r if f else r.with_suffix("")) for r, f in zip(rel, full, strict=True)]
        owners: dict[str, list[int]] = {}
        for i, stem in enumerate(stems):
            for suffix in OUTPUT_SUFFIXES.values():
                owners.setdefault(stem + suffix, []).append(i)
        clash = {i for users in owners.values() if len(users) > 1 for i in users if not full[i]}
        # an input whose stem equals another input's whole file name would collide once that one keeps it
        clash |= {i for i, s in enumerate(stems) if not full[i] and any(s == str(r) for r in rel)}
        if not clash:
            return stems
        for i in clash:
            full[i] = True


def _outputs(out: Path, stem: str, cfg: DictConfig) -> dict[str, Path]:
    kinds = ["labels"] + (["overlay"] if cfg.get("overlay", True) else [])
    kinds += ["scores"] if cfg.get("save_scores", False) else []
    return {kind: out / f"{stem}{OUTPUT_SUFFIXES[kind]}" for kind in kinds}


def _check_outputs(out: Path, plans: list[dict[str, Path]], inputs: list[Path]) -> None:
    check_output_dir(out)
    sources = {p.resolve() for p in inputs}
    for files in plans:
        for path in files.values():
            check_output_dir(path.parent)
            if path.is_dir():
                raise OutputError(f"cannot write {path}: a folder of that name exists; choose another out=")
            if path.resolve() in sources:
                raise OutputError(f"output {path} would overwrite an input image; choose another out=")


def segment(cfg: DictConfig) -> list[dict]:
    """Segment every ``image`` into ``classes``; write label maps, overlays (and scores) under ``out``."""
    paths = _image_paths(cfg.get("image"))
    classes = parse_classes(cfg.get("classes"))
    images = [load_image(p) for p in paths]  # a bad input fails the run before anything is written
    out = Path(str(cfg.get("out") or "outputs")).expanduser()
    plans = [_outputs(out, stem, cfg) for stem in output_names(paths)]
    _check_outputs(out, plans, paths)
    abstain, postprocess = abstain_rule(cfg), postprocess_step(cfg)  # checked before the model is built
    model = build_predictor(cfg)
    model.set_classes(classes)
    random_init = random_init_encoders(model.config)
    note = "random-init weights: meaningless" if random_init else None
    results = []
    for path, files, image in zip(paths, plans, images, strict=True):
        pred = model.predict(image, abstain=abstain, postprocess=postprocess)
        labels = pred.labels.numpy()
        save_png(label_image(labels), files["labels"])
        if "overlay" in files:
            save_png(overlay(image, labels, pred.class_names, note=note), files["overlay"])
        if "scores" in files:
            buf = io.BytesIO()
            np.savez_compressed(
                buf, scores=pred.scores.numpy().astype(np.float16), classes=np.array(pred.class_names)
            )
            with atomic_write(files["scores"]) as fh:
                fh.write(buf.getvalue())
        ids, counts = np.unique(labels, return_counts=True)
        names = [*pred.class_names, *["unknown"] * (256 - len(pred.class_names))]
        present = {names[i] if i < len(names) else str(i): int(c) for i, c in zip(ids, counts, strict=True)}
        if 255 in ids and len(pred.class_names) <= 255:
            present["unknown"] = present.pop(names[255])
        results.append(
            {
                "image": str(path),
                "outputs": {kind: str(p) for kind, p in files.items()},
                "size": list(labels.shape),
                "pixels_per_class": present,
                "seconds": {k: round(v, 4) for k, v in pred.timings.items()},
            }
        )
        t = pred.timings
        print(
            f"{path} -> {files['labels']}  [{labels.shape[1]}x{labels.shape[0]}, "
            f"{t['total']:.2f}s: features {t['features']:.2f}s, patch LP {t['patch_lp']:.2f}s, "
            f"pixel LP {t['pixel_lp']:.2f}s]"
        )
    summary = {"method": model.method, "classes": classes, "random_init": random_init, "images": results}
    with atomic_write(out / "segment.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    if random_init:
        print(f"note: random-init weights ({', '.join(random_init)}): the masks are meaningless")
    return results
