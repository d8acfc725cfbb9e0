"""Benchmarks, datasets over the 8 MMSeg layouts, the cached index and COCO-Object conversion."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import EXTRA_ID, expected_ids, make_dataset

from lposs_lab.errors import ConfigError
from lposs_lab.lab.data import BENCHMARKS, DatasetError, SegmentationDataset, collate_samples, get_benchmark
from lposs_lab.lab.data.coco_object import (
    COCO_THING_IDS,
    convert_coco_stuff_to_object,
    convert_label_map,
    main,
)
from lposs_lab.lab.data.index import build_index, index_path

REPO = Path(__file__).resolve().parents[2]
NAMES = ["voc", "voc20", "context", "context59", "coco_object", "coco_stuff", "ade20k", "cityscapes"]


# ---------------------------------------------------------------- benchmark table


def test_benchmark_table():
    assert list(BENCHMARKS) == NAMES
    counts = {n: BENCHMARKS[n].num_classes for n in NAMES}
    assert counts == {
        "voc": 21,
        "voc20": 20,
        "context": 60,
        "context59": 59,
        "coco_object": 81,
        "coco_stuff": 171,
        "ade20k": 150,
        "cityscapes": 19,
    }
    voc = get_benchmark("voc")
    assert voc.split == "ImageSets/Segmentation/val.txt" and voc.num_images == 1449
    assert get_benchmark("voc20").reduce_zero_label and not voc.reduce_zero_label
    assert get_benchmark(voc) is voc
    with pytest.raises(dataclasses.FrozenInstanceError):
        voc.root = "x"  # type: ignore[misc]


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        get_benchmark("pascal")
    assert str(exc.value) == f"unknown benchmark 'pascal'; choose one of: {', '.join(NAMES)} (dataset=NAME)"
    assert isinstance(exc.value, ConfigError)  # a user error: one line, exit 2


# ---------------------------------------------------------------- the 8 layouts


def _allowed_labels(name: str) -> set[int]:
    return set(range(BENCHMARKS[name].num_classes)) | {255}


@pytest.mark.parametrize("name", NAMES)
def test_each_layout_is_found_and_read(tmp_path, name):
    root = make_dataset(tmp_path, name, n_images=4)
    ds = SegmentationDataset(name, root)
    info = BENCHMARKS[name]
    assert len(ds) == 4
    assert ds.ids == expected_ids(name, 4)
    assert EXTRA_ID not in ds.ids  # split layouts: only the ids of val.txt
    for i in range(len(ds)):
        s = ds[i]
        assert "error" not in s
        assert s["id"] == ds.ids[i]
        assert s["image"].shape == (40, 56, 3) and s["image"].dtype == np.uint8
        assert s["label"].shape == (40, 56)
        assert set(np.unique(s["label"]).tolist()) <= _allowed_labels(name)
        assert Path(s["path"]).name.endswith(info.image_suffix) and Path(s["path"]).is_file()
        raw = np.asarray(Image.open(s["label_path"]))
        if info.reduce_zero_label:
            assert s["label"][0, 0] == 255 and raw[0, 0] == 0  # synthetic maps put raw 0 at (0, 0)
            expected = np.where(raw == 0, 255, np.where(raw == 255, 255, raw.astype(np.int64) - 1))
            assert np.array_equal(s["label"], expected)
        else:
            assert np.array_equal(s["label"], raw)
    if name == "coco_object":
        labels = np.concatenate([ds[i]["label"].ravel() for i in range(len(ds))])
        assert labels.max() <= 80 and 255 not in labels  # no ignored pixels in COCO-Object
    if name == "cityscapes":
        assert {k.split("/")[0] for k in ds.ids} == {"frankfurt", "lindau"}


def test_voc_palette_labels_read_as_indices(tmp_path):
    root = make_dataset(tmp_path, "voc", n_images=1)
    ds = SegmentationDataset("voc", root)
    assert Image.open(ds[0]["label_path"]).mode == "P"
    assert 255 in ds[0]["label"]  # the ignore strip survives as index 255, not a palette colour


def test_ade_root_without_ade_folder(tmp_path):
    make_dataset(tmp_path, "ade20k", n_images=2)
    shutil.move(tmp_path / "ade" / "ADEChallengeData2016", tmp_path / "ADEChallengeData2016")
    ds = SegmentationDataset("ade20k", tmp_path)
    assert len(ds) == 2 and "error" not in ds[1]
    # the benchmark folder itself may be given as the data root
    assert SegmentationDataset("ade20k", tmp_path / "ADEChallengeData2016").ids == ds.ids


def test_limit_and_ids(tmp_path):
    root = make_dataset(tmp_path, "coco_stuff", n_images=4)
    assert SegmentationDataset("coco_stuff", root, limit=2).ids == expected_ids("coco_stuff", 4)[:2]
    want = [expected_ids("coco_stuff", 4)[3], expected_ids("coco_stuff", 4)[0]]
    assert SegmentationDataset("coco_stuff", root, ids=want).ids == want
    with pytest.raises(DatasetError, match="'nope'"):
        SegmentationDataset("coco_stuff", root, ids=["nope"])


def test_dataloader_with_collate_samples(tmp_path):
    root = make_dataset(tmp_path, "cityscapes", n_images=3)
    ds = SegmentationDataset("cityscapes", root)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1] and batches[0][0]["image"].shape == (40, 56, 3)


# ---------------------------------------------------------------- errors


def test_missing_folder_message(tmp_path):
    make_dataset(tmp_path, "voc", n_images=1)
    shutil.rmtree(tmp_path / "VOCdevkit/VOC2012/JPEGImages")
    with pytest.raises(DatasetError) as exc:
        SegmentationDataset("voc", tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"{tmp_path}/VOCdevkit/VOC2012/JPEGImages not found" in msg
    assert "{JPEGImages,SegmentationClass,ImageSets/Segmentation/val.txt}" in msg


def test_missing_label_folder_split_and_data_root(tmp_path):
    with pytest.raises(DatasetError, match="data root .* not found"):
        SegmentationDataset("voc", tmp_path / "nowhere")
    make_dataset(tmp_path, "context", n_images=1)
    (tmp_path / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt").unlink()
    with pytest.raises(DatasetError, match="SegmentationContext/val.txt not found"):
        SegmentationDataset("context", tmp_path)
    shutil.rmtree(tmp_path / "VOCdevkit/VOC2010/SegmentationClassContext")
    with pytest.raises(DatasetError, match="SegmentationClassContext not found; expected the MMSegmentation"):
        SegmentationDataset("context59", tmp_path)


def test_missing_label_file_named_at_construction(tmp_path):
    make_dataset(tmp_path, "ade20k", n_images=3)
    lbl = tmp_path / "ade/ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    lbl.unlink()
    with pytest.raises(DatasetError, match="ADE_val_00000002.png for image 'ADE_val_00000002' not found"):
        SegmentationDataset("ade20k", tmp_path)


def test_corrupt_image_reported_not_dropped(tmp_path):
    make_dataset(tmp_path, "voc", n_images=3)
    bad = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2008_000001.jpg"
    bad.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "VOCdevkit/VOC2012/JPEGImages/2008_000002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    ds = SegmentationDataset("voc", tmp_path)
    assert len(ds) == 3
    good, s1, s2 = ds[0], ds[1], ds[2]
    assert "error" not in good and good["image"] is not None
    for s, path in ((s1, bad), (s2, truncated)):
        assert s["image"] is None and str(path) in s["error"] and "\n" not in s["error"]
        assert s["label"] is not None  # the label was fine
    errors = sum("error" in ds[i] for i in range(len(ds)))
    assert errors == 2
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2008_000000.png").write_bytes(b"\x89PNG broken")
    s0 = ds[0]
    assert s0["label"] is None and s0["image"] is not None and "cannot decode label" in s0["error"]


def test_label_of_other_size_reported(tmp_path):
    make_dataset(tmp_path, "cityscapes", n_images=2)
    lbl = next((tmp_path / "cityscapes/gtFine/val").rglob("*_gtFine_labelTrainIds.png"))
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(lbl)
    ds = SegmentationDataset("cityscapes", tmp_path)
    assert "40x56 but its label is 10x10" in ds[0]["error"]


# ---------------------------------------------------------------- cached index


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_index_built_once_and_rebuilt_when_split_changes(tmp_path):
    root = make_dataset(tmp_path / "data", "voc", n_images=4)
    cache = tmp_path / "cache"
    info = get_benchmark("voc")
    idx = build_index(info, root, cache)
    assert idx.column_names == ["id", "image_path", "label_path", "height", "width"]
    assert idx["id"] == expected_ids("voc", 4) and set(idx["height"]) == {40} and set(idx["width"]) == {56}
    folder = index_path(info, root, cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]
    before = _stamp(folder / "dataset_info.json")

    again = build_index("voc", root, cache)  # same key: loaded, not rebuilt
    assert again["id"] == idx["id"]
    assert _stamp(folder / "dataset_info.json") == before

    split = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.write_text("2008_000003\n2008_000001\n")
    os.utime(split, ns=(split.stat().st_atime_ns, split.stat().st_mtime_ns + 10**9))
    rebuilt = build_index("voc", root, cache)
    assert rebuilt["id"] == ["2008_000001", "2008_000003"]
    new_folder = index_path(info, root, cache)
    assert new_folder != folder
    assert [p.name for p in cache.iterdir()] == [new_folder.name]  # the stale index was removed
    ds = SegmentationDataset("voc", root, index_cache_dir=cache)
    assert ds.ids == ["2008_000001", "2008_000003"] and ds.sizes["2008_000001"] == (40, 56)
    assert np.array_equal(ds[1]["label"], SegmentationDataset("voc", root)[1]["label"])


def test_index_without_split_file_rebuilt_when_images_added(tmp_path):
    root = make_dataset(tmp_path / "data", "cityscapes", n_images=2)
    cache = tmp_path / "cache"
    assert len(build_index("cityscapes", root, cache)) == 2
    make_dataset(tmp_path / "data", "cityscapes", n_images=4)  # adds files inside the city folders
    idx = build_index("cityscapes", root, cache)
    assert idx["id"] == expected_ids("cityscapes", 4)


def test_index_records_unreadable_header(tmp_path):
    root = make_dataset(tmp_path / "data", "ade20k", n_images=2)
    (root / "ade/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg").write_bytes(b"junk")
    idx = build_index("ade20k", root, tmp_path / "cache")
    assert idx["height"] == [-1, 40] and idx["width"] == [-1, 56]
    ds = SegmentationDataset("ade20k", root, index_cache_dir=tmp_path / "cache")
    assert ds[0]["image"] is None and "error" in ds[0]


# ---------------------------------------------------------------- COCO-Object


# The 80 COCO category ids (1-based, as in instances_val2017.json): 1..90 minus the 10 unused ids.
COCO_CATEGORY_IDS = (
    list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
    + [67, 70] + list(range(72, 83)) + list(range(84, 91))
)  # fmt: skip


def test_thing_ids_are_the_real_coco_categories():
    assert len(COCO_CATEGORY_IDS) == 80
    assert list(COCO_THING_IDS) == [i - 1 for i in COCO_CATEGORY_IDS]  # stuffthingmaps are 0-based


def test_convert_hand_made_map():
    raw = np.array([[0, 11, 12, 89], [90, 91, 181, 255]], dtype=np.uint8)
    # 0 person -> 1; 11 (street sign, unused) -> 0; 12 stop sign -> 12; 89 toothbrush -> 80;
    # 90 (hair brush, unused) -> 0; 91 and 181 stuff -> 0; 255 unlabeled -> 0
    assert convert_label_map(raw).tolist() == [[1, 0, 12, 80], [0, 0, 0, 0]]
    every = convert_label_map(np.arange(256, dtype=np.uint8)[None])
    assert every[0, list(COCO_THING_IDS)].tolist() == list(range(1, 81))
    assert int(np.count_nonzero(every)) == 80


def test_convert_folder_and_cli(tmp_path):
    src = tmp_path / "val2017"
    src.mkdir()
    raw = np.array([[0, 24, 26], [90, 150, 255]], dtype=np.uint8)
    Image.fromarray(raw).save(src / "000000000139.png")
    # an MMSeg-converted map beside the raw one is skipped
    Image.fromarray(np.full((2, 3), 7, dtype=np.uint8)).save(src / "000000000139_labelTrainIds.png")
    out = convert_coco_stuff_to_object(src, tmp_path / "out")
    assert [p.name for p in out] == ["000000000139_instanceTrainIds.png"]
    assert np.asarray(Image.open(out[0])).tolist() == [[1, 24, 25], [0, 0, 0]]

    assert main([str(src), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli/000000000139_instanceTrainIds.png").is_file()


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is not a folder" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), str(tmp_path / "o")]) == 1
    assert "no stuffthingmaps .png" in capsys.readouterr().err
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(rgb / "x.png")
    assert main([str(rgb), str(tmp_path / "o")]) == 1
    assert "mode RGB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@pytest.mark.slow
def test_cli_as_module_fails_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lposs_lab.lab.data.coco_object"]
    cmd += [str(tmp_path / "nope"), str(tmp_path / "o")]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
