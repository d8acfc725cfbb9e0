"""What each target takes from its archives and how its labels are made, into the layouts the lab reads.

``voc`` -> ``VOCdevkit/VOC2012``, ``context`` -> ``VOCdevkit/VOC2010``, ``coco_stuff`` (both label sets) ->
``coco_stuff164k``, ``ade20k`` -> ``ade/ADEChallengeData2016``, ``cityscapes`` -> ``cityscapes``. Only the
validation members are read. Every output is written atomically; one that already exists is kept (unless
``force``), so an interrupted run resumes file by file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lposs_lab.files import atomic_write

from ..benchmarks import BENCHMARKS
from .cityscapes import train_ids_from_label_ids, train_ids_from_polygons
from .coco import coco_labels
from .context import context_label, split_lists
from .extract import open_archive

__all__ = ["BuildContext", "RECIPES", "save_png", "run_tasks"]


@dataclass
class BuildContext:
    """Where to write, which archive files to read, and how."""

    root: Path
    archives: dict[str, Path]
    force: bool = False
    from_polygons: bool = False
    workers: int = 1
    log: Callable[[str], None] = print
    counts: dict[str, int] = field(default_factory=dict)  # files written, by kind


def save_png(label: np.ndarray, path: Path) -> None:
    """Write a ``[H, W]`` uint8 label map as a single-channel PNG, atomically."""
    with atomic_write(path) as fh:
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(fh, format="PNG")


def _read_raw(path: str) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "P"):
            raise ValueError(f"{path} has mode {img.mode}; expected a single-channel 8-bit label map")
        return np.asarray(img)


def _coco_task(task: tuple[str, str, str]) -> None:
    src, stuff, obj = task
    stuff_map, obj_map = coco_labels(_read_raw(src))
    save_png(stuff_map, Path(stuff))
    save_png(obj_map, Path(obj))


def _context_task(task: tuple[str, int, int, list, str]) -> None:
    stem, h, w, segs, out = task
    save_png(context_label(stem, h, w, segs), Path(out))


def _city_ids_task(task: tuple[str, str]) -> None:
    src, out = task
    save_png(train_ids_from_label_ids(_read_raw(src)), Path(out))


def _city_poly_task(task: tuple[str, str]) -> None:
    src, out = task
    save_png(train_ids_from_polygons(Path(src).read_bytes(), src), Path(out))


def run_tasks(fn: Callable, tasks: list, workers: int) -> None:
    """``fn(task)`` for every task, in ``workers`` processes when there are enough tasks to pay for them."""
    if workers <= 1 or len(tasks) < 4 * workers:
        for t in tasks:
            fn(t)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, tasks, chunksize=max(1, len(tasks) // (8 * workers))):
            pass


def _todo(ctx: BuildContext, outputs: Iterable[Path]) -> bool:
    return ctx.force or not all(p.is_file() for p in outputs)


def _write_text(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return  # unchanged: not rewritten
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _extract(ctx: BuildContext, archive: str, pairs: list[tuple[str, Path]], what: str) -> None:
    with open_archive(ctx.archives[archive]) as ar:
        n = ar.extract(pairs, ctx.root, overwrite=ctx.force)
    ctx.counts[what] = ctx.counts.get(what, 0) + n
    ctx.log(f"  {archive}: {len(pairs)} {what} ({n} written, {len(pairs) - n} already there)")


def build_voc(ctx: BuildContext) -> None:
    info, prefix = BENCHMARKS["voc"], "VOCdevkit/VOC2012"
    base = ctx.root / info.root
    with open_archive(ctx.archives["VOCtrainval_11-May-2012.tar"]) as ar:
        split = f"{prefix}/{info.split}"
        ar.require([split], "voc")
        ids = sorted(dict.fromkeys(ar.read(split).decode().split()))
    pairs = [(split, base / info.split)]
    for key in ids:
        pairs.append((f"{prefix}/{info.images}/{key}{info.image_suffix}", base / info.images / f"{key}.jpg"))
        pairs.append((f"{prefix}/{info.labels}/{key}{info.label_suffix}", base / info.labels / f"{key}.png"))
    _extract(ctx, "VOCtrainval_11-May-2012.tar", pairs, "files")


def build_context(ctx: BuildContext) -> None:
    info = BENCHMARKS["context"]
    base = ctx.root / info.root
    data = json.loads(ctx.archives["trainval_merged.json"].read_bytes())
    val, train_stems, val_stems = split_lists(data)
    del data
    images = [
        (f"VOCdevkit/VOC2010/{info.images}/{s}{info.image_suffix}", base / info.images / f"{s}.jpg")
        for s in val_stems
    ]
    _extract(ctx, "VOCtrainval_03-May-2010.tar", images, "images")
    split_dir = (base / info.split).parent
    _write_text(split_dir / "val.txt", "".join(f"{s}\n" for s in val_stems))
    _write_text(split_dir / "train.txt", "".join(f"{s}\n" for s in train_stems))
    tasks = []
    for s in val_stems:
        out = base / info.labels / f"{s}{info.label_suffix}"
        if _todo(ctx, [out]):
            h, w, segs = val[s]
            tasks.append((s, h, w, segs, str(out)))
    run_tasks(_context_task, tasks, ctx.workers)
    ctx.log(f"  context: {len(val_stems)} label maps ({len(tasks)} converted)")


def _members(ctx: BuildContext, archive: str, prefix: str, suffix: str) -> list[str]:
    with open_archive(ctx.archives[archive]) as ar:
        return sorted(n for n in ar.names() if n.startswith(prefix) and n.endswith(suffix))


def build_coco(ctx: BuildContext) -> None:
    stuff, obj = BENCHMARKS["coco_stuff"], BENCHMARKS["coco_object"]
    base = ctx.root / stuff.root
    imgs = _members(ctx, "val2017.zip", "val2017/", ".jpg")
    _extract(ctx, "val2017.zip", [(m, base / stuff.images / Path(m).name) for m in imgs], "images")
    raws = [
        m for m in _members(ctx, "stuffthingmaps_trainval2017.zip", "val2017/", ".png") if "TrainIds" not in m
    ]
    lbl = base / stuff.labels
    _extract(ctx, "stuffthingmaps_trainval2017.zip", [(m, lbl / Path(m).name) for m in raws], "label maps")
    tasks = []
    for m in raws:
        stem = Path(m).stem
        outs = (lbl / f"{stem}{stuff.label_suffix}", lbl / f"{stem}{obj.label_suffix}")
        if _todo(ctx, outs):
            tasks.append((str(lbl / Path(m).name), str(outs[0]), str(outs[1])))
    run_tasks(_coco_task, tasks, ctx.workers)
    ctx.log(f"  coco_stuff + coco_object: {len(raws)} label maps ({len(tasks)} converted)")


def build_ade(ctx: BuildContext) -> None:
    info = BENCHMARKS["ade20k"]
    base, archive = ctx.root / info.root, "ADEChallengeData2016.zip"
    names = []
    for folder, suffix in ((info.images, info.image_suffix), (info.labels, info.label_suffix)):
        names += _members(ctx, archive, f"ADEChallengeData2016/{folder}/", suffix)
    with open_archive(ctx.archives[archive]) as ar:
        names += [
            n
            for n in ("ADEChallengeData2016/objectInfo150.txt", "ADEChallengeData2016/sceneCategories.txt")
            if n in ar.names()
        ]
    pairs = [(n, base / n.split("/", 1)[1]) for n in names]
    _extract(ctx, archive, pairs, "files")


def build_cityscapes(ctx: BuildContext) -> None:
    info = BENCHMARKS["cityscapes"]
    base = ctx.root / info.root
    imgs = _members(ctx, "leftImg8bit_trainvaltest.zip", f"{info.images}/", info.image_suffix)
    _extract(ctx, "leftImg8bit_trainvaltest.zip", [(m, base / m) for m in imgs], "images")
    src_suffix = "_gtFine_polygons.json" if ctx.from_polygons else "_gtFine_labelIds.png"
    srcs = _members(ctx, "gtFine_trainvaltest.zip", f"{info.labels}/", src_suffix)
    _extract(ctx, "gtFine_trainvaltest.zip", [(m, base / m) for m in srcs], "label sources")
    tasks = []
    for m in srcs:
        out = base / (m[: -len(src_suffix)] + info.label_suffix)
        if _todo(ctx, [out]):
            tasks.append((str(base / m), str(out)))
    run_tasks(_city_poly_task if ctx.from_polygons else _city_ids_task, tasks, ctx.workers)
    route = "polygons" if ctx.from_polygons else "labelIds"
    ctx.log(f"  cityscapes: {len(srcs)} label maps from {route} ({len(tasks)} converted)")


RECIPES: dict[str, Callable[[BuildContext], None]] = {
    "voc": build_voc,
    "context": build_context,
    "coco_stuff": build_coco,
    "ade20k": build_ade,
    "cityscapes": build_cityscapes,
}


def default_workers() -> int:
    """Conversion processes when ``--workers`` is not given: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))
