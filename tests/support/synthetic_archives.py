"""Tiny archives in the benchmarks' original download formats, and the labels a correct prepare must write.

``make_archives(folder)`` writes the 8 files ``prepare`` reads (same names, member paths and encodings as the
real downloads: VOC tars, Context's ``trainval_merged.json`` with COCO compressed RLE, the COCO-Stuff and ADE
zips, the Cityscapes zips with ``labelIds`` PNGs and ``polygons`` JSON) and returns a :class:`Synthetic`
holding their paths and, per ``dataset=`` name, ``{id: expected [H, W] uint8 label}`` computed here
independently of the package (numpy painting and sorted-id ranks, no lookup tables from the package).

Every split also has members the val split must not take (train images, a train label, ...).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "H",
    "W",
    "Synthetic",
    "assert_labels_equal",
    "copy_cityscapes",
    "encode_rle",
    "error_lines",
    "make_archives",
    "snapshot",
    "write_manifest",
]

H, W = 24, 32  # every synthetic image is 32x24 (W x H)

# published facts (PASCAL in Detail, COCO-Stuff, cityscapesScripts), restated independently of the package
CONTEXT59 = [2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
             115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
             347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458]  # fmt: skip
COCO_UNUSED0 = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
CITY_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
              26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CITY_NAMES = {"road": 7, "sidewalk": 8, "building": 11, "car": 26, "person": 24, "sky": 23, "static": 4,
              "bicycle": 33}  # fmt: skip


@dataclass
class Synthetic:
    archives: dict[str, Path]
    labels: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # dataset= -> id -> label
    polygon_labels: dict[str, np.ndarray] = field(default_factory=dict)  # cityscapes via polygons
    counts: dict[str, int] = field(default_factory=dict)


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a ``[h, w]`` bool mask (column-major runs, 5-bit groups, delta from i-2)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:  # runs start with zeros
        runs = [0, *runs]
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(out)}


def _png(arr: np.ndarray, palette: bool = False) -> bytes:
    img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette(list(np.random.default_rng(7).integers(0, 256, 768)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _rects(rng: np.random.Generator, values: list[int], fill: int, k: int = 3) -> np.ndarray:
    lab = np.full((H, W), fill, dtype=np.int32)
    for _ in range(k):
        y0, x0 = int(rng.integers(0, H - 3)), int(rng.integers(0, W - 3))
        lab[y0 : int(rng.integers(y0 + 2, H + 1)), x0 : int(rng.integers(x0 + 2, W + 1))] = rng.choice(values)
    return lab


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _voc(folder: Path, syn: Synthetic, rng: np.random.Generator, n: int) -> None:
    ids = [f"2007_{i:06d}" for i in range(n)]
    m: dict[str, bytes] = {}
    p = "VOCdevkit/VOC2012"
    m[f"{p}/ImageSets/Segmentation/val.txt"] = "".join(f"{k}\n" for k in ids).encode()
    m[f"{p}/ImageSets/Segmentation/train.txt"] = b"2007_999999\n"
    syn.labels["voc"] = {}
    for k in [*ids, "2007_999999"]:
        lab = _rects(rng, list(range(21)), int(rng.integers(0, 21)))
        lab[int(rng.integers(0, H)), :] = 255
        m[f"{p}/JPEGImages/{k}.jpg"] = _image(rng)
        m[f"{p}/SegmentationClass/{k}.png"] = _png(lab, palette=True)
        m[f"{p}/Annotations/{k}.xml"] = b"<annotation/>"
        if k in ids:
            syn.labels["voc"][k] = lab.astype(np.uint8)
    syn.labels["voc20"] = {k: _reduce_zero(v) for k, v in syn.labels["voc"].items()}
    syn.archives["VOCtrainval_11-May-2012.tar"] = folder / "VOCtrainval_11-May-2012.tar"
    _tar(syn.archives["VOCtrainval_11-May-2012.tar"], m)
    syn.counts["voc"] = n


def _reduce_zero(lab: np.ndarray) -> np.ndarray:
    out = lab.astype(np.int64) - 1
    out[lab == 0] = 255
    out[lab == 255] = 255
    return out.astype(np.uint8)


def _context(folder: Path, syn: Synthetic, rng: np.random.Generator, n: int) -> None:
    val = [f"2008_{i:06d}" for i in range(n)]
    train, test = ["2008_100000"], ["2008_200000"]
    images, annos, tar = [], [], {}
    order = [0, *CONTEXT59]  # rank in this list is the label
    syn.labels["context"] = {}
    aid = 1
    for stem, phase in [
        *((s, "val") for s in val),
        *((s, "train") for s in train),
        *((s, "test") for s in test),
    ]:
        image_id = int(stem.replace("_", ""))
        images.append(
            {"image_id": image_id, "file_name": f"{stem}.jpg", "height": H, "width": W, "phase": phase}
        )
        tar[f"VOCdevkit/VOC2010/JPEGImages/{stem}.jpg"] = _image(rng)
        painted = np.zeros((H, W), dtype=np.int64)
        for _ in range(4):  # overlapping masks: the later one wins
            mask = _rects(rng, [1], 0, k=2).astype(bool)
            cat = int(rng.choice(CONTEXT59))
            painted[mask] = cat
            rle = encode_rle(mask)
            annos.append({"id": aid, "image_id": image_id, "category_id": cat, "segmentation": rle,
                          "iscrowd": 0, "parts": []})  # fmt: skip
            aid += 1
        if phase == "val":
            syn.labels["context"][stem] = np.vectorize(order.index)(painted).astype(np.uint8)
    tar["VOCdevkit/VOC2010/ImageSets/Main/train.txt"] = b"2008_100000\n"
    data = {
        "images": images,
        "annos_segmentation": annos,
        "categories": [],
        "annos_occlusion": [],
        "parts": [],
    }
    syn.labels["context59"] = {k: _reduce_zero(v) for k, v in syn.labels["context"].items()}
    syn.archives["VOCtrainval_03-May-2010.tar"] = folder / "VOCtrainval_03-May-2010.tar"
    _tar(syn.archives["VOCtrainval_03-May-2010.tar"], tar)
    syn.archives["trainval_merged.json"] = folder / "trainval_merged.json"
    syn.archives["trainval_merged.json"].write_text(json.dumps(data))
    syn.counts["context"] = n


def _coco(folder: Path, syn: Synthetic, rng: np.random.Generator, n: int) -> None:
    ids = [f"{i + 139:012d}" for i in range(n)]
    used = [i for i in range(182) if i not in COCO_UNUSED0]  # 171 stuff train ids, ascending
    things = [i for i in range(91) if i not in COCO_UNUSED0]  # 80 object ids
    imgs, maps = {}, {"train2017/000000000009.png": _png(np.zeros((H, W)))}
    syn.labels["coco_stuff"], syn.labels["coco_object"] = {}, {}
    for k in ids:
        raw = _rects(rng, [0, 5, 11, 40, 89, 90, 91, 120, 181], 255, k=4)  # 11 and 90 are never-used ids
        imgs[f"val2017/{k}.jpg"] = _image(rng)
        maps[f"val2017/{k}.png"] = _png(raw)
        stuff = np.full((H, W), 255, dtype=np.uint8)
        obj = np.zeros((H, W), dtype=np.uint8)
        for v in np.unique(raw):
            if v in used:
                stuff[raw == v] = used.index(v)
            if v in things:
                obj[raw == v] = things.index(v) + 1
        syn.labels["coco_stuff"][k], syn.labels["coco_object"][k] = stuff, obj
    syn.archives["val2017.zip"] = folder / "val2017.zip"
    _zip(syn.archives["val2017.zip"], imgs)
    syn.archives["stuffthingmaps_trainval2017.zip"] = folder / "stuffthingmaps_trainval2017.zip"
    _zip(syn.archives["stuffthingmaps_trainval2017.zip"], maps)
    syn.counts["coco_stuff"] = n


def _ade(folder: Path, syn: Synthetic, rng: np.random.Generator, n: int) -> None:
    p = "ADEChallengeData2016"
    m = {f"{p}/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n", f"{p}/sceneCategories.txt": b""}
    m[f"{p}/images/training/ADE_train_00000001.jpg"] = _image(rng)
    m[f"{p}/annotations/training/ADE_train_00000001.png"] = _png(np.zeros((H, W)))
    syn.labels["ade20k"] = {}
    for i in range(n):
        k = f"ADE_val_{i + 1:08d}"
        lab = _rects(rng, list(range(151)), 0)
        m[f"{p}/images/validation/{k}.jpg"] = _image(rng)
        m[f"{p}/annotations/validation/{k}.png"] = _png(lab)
        syn.labels["ade20k"][k] = _reduce_zero(lab)
    syn.archives["ADEChallengeData2016.zip"] = folder / "ADEChallengeData2016.zip"
    _zip(syn.archives["ADEChallengeData2016.zip"], m)
    syn.counts["ade20k"] = n


def _cityscapes(folder: Path, syn: Synthetic, rng: np.random.Generator, n: int) -> None:
    gt = {
        "README": b"gtFine",
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png": _png(np.zeros((H, W))),
    }
    left = {"leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png": _image(rng, "PNG")}
    syn.labels["cityscapes"] = {}
    for i in range(n):
        city = ("frankfurt", "lindau")[i % 2]
        k = f"{city}/{city}_000000_{i:06d}"
        ids = np.zeros((H, W), dtype=np.int64)  # 0 unlabeled
        poly = np.full((H, W), 255, dtype=np.int64)
        objects = []
        for j, name in enumerate(["road", "building", "cargroup", "person", "license plate", "bicycle"]):
            x0, y0 = int(rng.integers(0, W - 4)), int(rng.integers(0, H - 4))
            x1, y1 = int(rng.integers(x0 + 2, W)), int(rng.integers(y0 + 2, H))
            deleted = j == 5
            objects.append({"label": name, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                            **({"deleted": 1} if deleted else {})})  # fmt: skip
            if name == "license plate" or deleted:
                continue
            label_id = CITY_NAMES[name[: -len("group")] if name.endswith("group") else name]
            ids[y0 : y1 + 1, x0 : x1 + 1] = label_id  # a drawn polygon covers its edge pixels
            poly[y0 : y1 + 1, x0 : x1 + 1] = CITY_TRAIN[label_id]
        ids[0, :] = CITY_NAMES["sky"]  # only in labelIds: the two routes must differ here
        ids[-1, :3] = CITY_NAMES["static"]
        stem = f"gtFine/val/{k}_gtFine"
        gt[f"{stem}_labelIds.png"] = _png(ids)
        gt[f"{stem}_instanceIds.png"] = _png(ids)
        gt[f"{stem}_color.png"] = _png(ids)
        gt[f"{stem}_polygons.json"] = json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}).encode()
        left[f"leftImg8bit/val/{k}_leftImg8bit.png"] = _image(rng, "PNG")
        lut = np.full(256, 255, dtype=np.uint8)
        for a, b in CITY_TRAIN.items():
            lut[a] = b
        syn.labels["cityscapes"][k] = lut[ids]
        syn.polygon_labels[k] = poly.astype(np.uint8)
    syn.archives["gtFine_trainvaltest.zip"] = folder / "gtFine_trainvaltest.zip"
    _zip(syn.archives["gtFine_trainvaltest.zip"], gt)
    syn.archives["leftImg8bit_trainvaltest.zip"] = folder / "leftImg8bit_trainvaltest.zip"
    _zip(syn.archives["leftImg8bit_trainvaltest.zip"], left)
    syn.counts["cityscapes"] = n


def make_archives(folder: Path, n: int = 4, seed: int = 0) -> Synthetic:
    """Write the 8 archives (``n`` val images per benchmark) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    syn = Synthetic({})
    for make in (_voc, _context, _coco, _ade, _cityscapes):
        make(folder, syn, rng, n)
    return syn


def write_manifest(path: Path, syn: Synthetic, base_url: str | None, **override: dict) -> Path:
    """A manifest for ``syn``'s archives served at ``base_url/<name>`` (Cityscapes never has a URL).

    ``override[name]`` replaces fields of one archive entry (e.g. ``{"urls": [...]}``).
    """
    archives = {}
    for name, p in syn.archives.items():
        data = p.read_bytes()
        entry = {
            "urls": [] if base_url is None or "trainvaltest" in name else [f"{base_url}/{name}"],
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "md5": hashlib.md5(data).hexdigest(),
        }
        entry.update(override.get(name, {}))
        archives[name] = entry
    path.write_text(json.dumps({"archives": archives, "expected": dict(syn.counts)}))
    return path


# ------------------------------------------------------------------ checks shared by the prepare tests
def copy_cityscapes(syn: Synthetic, downloads: Path) -> None:
    """Put the two Cityscapes zips where a user would (they have no URL)."""
    downloads.mkdir(parents=True, exist_ok=True)
    for name in ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"):
        shutil.copy(syn.archives[name], downloads / name)


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of stderr (progress lines go there too)."""
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def snapshot(root: Path) -> dict[str, int]:
    """``{file: mtime_ns}`` of every file below ``root``."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def assert_labels_equal(root: Path, name: str, expected: dict[str, np.ndarray]) -> None:
    """What ``dataset=name`` reads under ``root`` (ids, labels, image sizes) is exactly ``expected``."""
    from lposs_lab.lab.data import SegmentationDataset

    ds = SegmentationDataset(name, root)
    assert sorted(ds.ids) == sorted(expected)
    for i in range(len(ds)):
        s = ds[i]
        assert "error" not in s, s.get("error")
        np.testing.assert_array_equal(s["label"], expected[s["id"]], err_msg=f"{name} {s['id']}")
        assert s["image"].shape == (H, W, 3)
