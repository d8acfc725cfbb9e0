"""``python -m lposs_lab.lab.data.prepare``: synthetic archives in the original formats, served on 127.0.0.1.

Every other connection fails (``guard_network``). Expected labels come from the generator
(``synthetic_archives``), computed there with numpy and sorted-id ranks, never with the package's tables.
Bad input (wrong archives, missing Cityscapes zips, no space, unsafe members): ``test_prepare_errors.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from http_server import FileServer, guard_network
from PIL import Image
from prepare_fixtures import manifest_file
from synthetic_archives import (
    H,
    W,
    assert_labels_equal,
    copy_cityscapes,
    encode_rle,
    make_archives,
    snapshot,
    write_manifest,
)

from lposs_lab.lab.data import DatasetError, get_benchmark
from lposs_lab.lab.data.prepare import RetryPolicy, load_manifest, prepare_datasets, resolve_names
from lposs_lab.lab.data.prepare.__main__ import main
from lposs_lab.lab.data.prepare.context import context_label, decode_counts, decode_rle

pytestmark = pytest.mark.usefixtures("offline")  # no connection but to 127.0.0.1

FAST = RetryPolicy(attempts=3, delay=0.0, factor=1.0, timeout=10.0)




# ------------------------------------------------------------------------------------------- pure parts


def test_rle_decoder_on_hand_encoded_strings():
    # 2x2 [[0,1],[1,1]] column-major = 0,1,1,1 -> runs [1, 3] -> "13"
    np.testing.assert_array_equal(decode_rle({"size": [2, 2], "counts": "13"}), [[0, 1], [1, 1]])
    # runs [0, 2, 5, 1]: the 4th is stored as 1 - 2 = -1 -> one group 0x1f (sign bit set) -> chr(79) "O"
    assert decode_counts("025O") == [0, 2, 5, 1]
    # 40 needs two groups: 40 = 0b01000 + 1 << 5 -> chr(48 + 8 + 0x20), chr(48 + 1)
    assert decode_counts(chr(48 + 8 + 0x20) + chr(49)) == [40]
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [2, 2], "counts": "12"})


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (24, 32), (37, 3)]:
        for p in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < p
            np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)
    mask = np.zeros((300, 400), bool)
    mask[10:290, 5:395] = True  # runs > 2**15 need several groups
    np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask)


def test_context_label_paints_in_order_and_refuses_other_categories():
    a = np.zeros((3, 4), bool)
    a[:2, :3] = True
    b = np.zeros((3, 4), bool)
    b[1:, 2:] = True
    lab = context_label("x", 3, 4, [(9, encode_rle(a)), (458, encode_rle(b))])
    want = np.zeros((3, 4), np.uint8)
    want[a] = 2  # id 9 is the 2nd of the 59
    want[b] = 59  # id 458 the last, painted over 9
    np.testing.assert_array_equal(lab, want)
    with pytest.raises(DatasetError, match=r"2008_000001 holds category id\(s\) \[3\]"):
        context_label("2008_000001", 3, 4, [(3, encode_rle(a))])
    with pytest.raises(DatasetError, match="is 3x4, the image is 4x4"):
        context_label("2008_000001", 4, 4, [(9, encode_rle(a))])


def test_names_and_manifest():
    assert resolve_names(["voc20", "context59", "coco_object"]) == ["voc", "context", "coco_stuff"]
    assert resolve_names(["all"]) == ["voc", "context", "coco_stuff", "ade20k", "cityscapes"]
    with pytest.raises(ValueError, match="valid: voc, context"):
        resolve_names(["pascal"])
    m = load_manifest()
    assert m.expected == {"voc": 1449, "context": 5104, "coco_stuff": 5000, "ade20k": 2000, "cityscapes": 500}
    voc = m.archives["VOCtrainval_11-May-2012.tar"]
    assert voc.size == 1999639040 and voc.hashes["md5"] == "6cd6e144f989b92b3379bac3b3de84fd"
    assert m.archives["gtFine_trainvaltest.zip"].urls == ()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def prepared(syn, tmp_path_factory):
    """``prepare all`` once over HTTP (Cityscapes zips placed in downloads/ as a user would)."""
    root = tmp_path_factory.mktemp("data")
    copy_cityscapes(syn, root / "downloads")
    mp = pytest.MonkeyPatch()
    guard_network(mp)
    try:
        with FileServer({f"/{n}": p for n, p in syn.archives.items()}) as srv:
            manifest = load_manifest(write_manifest(root.parent / "manifest_all.json", syn, srv.url))
            result = prepare_datasets(["all"], root, manifest=manifest, workers=1, policy=FAST)
            requests = list(srv.requests)
    finally:
        mp.undo()
    return root, manifest, result, requests


def test_prepare_all_writes_the_independently_computed_labels(prepared, syn):
    root, _, result, requests = prepared
    assert sorted(result) == ["ade20k", "cityscapes", "coco_stuff", "context", "voc"]
    assert sorted(p for p, _ in requests) == sorted(f"/{n}" for n in syn.archives if "trainvaltest" not in n)
    for name in ("voc", "voc20", "context", "context59", "coco_stuff", "coco_object", "ade20k", "cityscapes"):
        assert_labels_equal(root, name, syn.labels[name])
    # only the val split was taken: no train member, and the split lists as the lab expects
    assert not list(root.rglob("*train*.jpg")) and not list(root.rglob("aachen*"))
    assert not (root / "VOCdevkit/VOC2012/JPEGImages/2007_999999.jpg").exists()
    ctx = root / "VOCdevkit/VOC2010/ImageSets/SegmentationContext"
    assert (ctx / "val.txt").read_text().split() == sorted(syn.labels["context"])
    assert (ctx / "train.txt").read_text().split() == ["2008_100000"]
    stamp = json.loads((root / "coco_stuff164k/lposs_prepare.json").read_text())
    assert stamp["counts"] == {"coco_stuff": 4, "coco_object": 4}
    assert stamp["inputs"]["val2017.zip"]["sha256"] == load_manifest(
        root.parent / "manifest_all.json").archives["val2017.zip"].hashes["sha256"]  # fmt: skip
    assert all(not p.name.endswith(".part") for p in (root / "downloads").iterdir())


def test_rerun_rewrites_nothing_and_makes_no_request(prepared, syn, capsys):
    root, manifest, _, _ = prepared
    before = snapshot(root)
    with FileServer({f"/{n}": p for n, p in syn.archives.items()}) as srv:
        result = prepare_datasets(["all"], root, manifest=manifest, workers=1, policy=FAST)
        assert srv.requests == []
    assert snapshot(root) == before
    assert all("counts" in s for s in result.values())
    assert "voc: up to date (voc 4 images)" in capsys.readouterr().err


def test_interrupted_run_resumes_file_by_file(syn, server, tmp_path):
    root = tmp_path / "data"
    manifest = load_manifest(manifest_file(tmp_path, syn, server))
    prepare_datasets(["voc"], root, manifest=manifest, workers=1, policy=FAST)
    base = root / "VOCdevkit/VOC2012"
    (base / "lposs_prepare.json").unlink()  # as if killed before the end
    victim = base / "SegmentationClass/2007_000002.png"
    victim.unlink()
    before = snapshot(root)
    server.requests.clear()
    prepare_datasets(["voc"], root, manifest=manifest, workers=1, policy=FAST)
    after = snapshot(root)
    assert server.requests == []  # the archive is in downloads/ already
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {str(victim), str(base / "lposs_prepare.json")}
    assert_labels_equal(root, "voc", syn.labels["voc"])


def test_dropped_connection_resumes_with_range(syn, server, tmp_path):
    name = "ADEChallengeData2016.zip"
    server.cut(f"/{name}", after=1000, times=2)
    root = tmp_path / "data"
    sleeps = []
    from lposs_lab.lab.data.prepare import download

    manifest = load_manifest(manifest_file(tmp_path, syn, server))
    backoff = RetryPolicy(attempts=3, delay=0.5, factor=2.0, timeout=10.0)
    path, _ = download.fetch(manifest.archive(name), root, backoff, sleep=sleeps.append)
    assert path.read_bytes() == syn.archives[name].read_bytes()
    assert server.requests == [(f"/{name}", None), (f"/{name}", "bytes=1000-"), (f"/{name}", "bytes=2000-")]
    assert sleeps == [0.5, 1.0]  # back-off between the attempts


def test_stopped_download_keeps_part_and_next_run_continues(syn, server, tmp_path, capsys):
    name = "ADEChallengeData2016.zip"
    server.cut(f"/{name}", after=1500, times=1)
    root = tmp_path / "data"
    mf = manifest_file(tmp_path, syn, server)
    once = RetryPolicy(attempts=1, delay=0.0)
    with pytest.raises(Exception, match=f"could not download {name}"):
        prepare_datasets(["ade20k"], root, manifest=load_manifest(mf), workers=1, policy=once)
    part = root / "downloads" / f"{name}.part"
    assert part.stat().st_size == 1500 and not (root / "ade").exists()
    assert main(["ade20k", "--root", str(root), "--manifest", str(mf), "--workers", "1"]) == 0
    assert server.requests[-1] == (f"/{name}", "bytes=1500-")
    assert not part.exists()
    assert_labels_equal(root, "ade20k", syn.labels["ade20k"])


def test_mirror_fallback(syn, server, tmp_path):
    name = "VOCtrainval_11-May-2012.tar"
    urls = [f"{server.url}/gone/{name}", f"{server.url}/{name}"]
    mf = manifest_file(tmp_path, syn, server, **{name: {"urls": urls}})
    assert main(["voc20", "--root", str(tmp_path / "data"), "--manifest", str(mf), "--workers", "1"]) == 0
    assert [p for p, _ in server.requests] == [f"/gone/{name}", f"/{name}"]
    assert_labels_equal(tmp_path / "data", "voc20", syn.labels["voc20"])


def test_archives_folder_makes_no_request(syn, server, tmp_path):
    archives = tmp_path / "mine"
    archives.mkdir()
    for p in syn.archives.values():
        shutil.copy(p, archives / p.name)
    mf = manifest_file(tmp_path, syn, server)
    root = tmp_path / "data"
    args = ["context", "coco_stuff", "cityscapes", "--root", str(root), "--manifest", str(mf)]
    assert main([*args, "--archives", str(archives), "--workers", "2"]) == 0
    assert server.requests == []
    for name in ("context59", "coco_stuff", "coco_object", "cityscapes"):
        assert_labels_equal(root, name, syn.labels[name])
    assert not any((root / "downloads").glob("*.zip"))  # used in place, not copied


def test_cityscapes_from_polygons(syn, tmp_path):
    root = tmp_path / "data"
    copy_cityscapes(syn, root / "downloads")
    mf = write_manifest(tmp_path / "m.json", syn, None)
    args = ["cityscapes", "--root", str(root), "--manifest", str(mf), "--workers", "1"]
    assert main([*args, "--cityscapes-from-polygons"]) == 0
    assert_labels_equal(root, "cityscapes", syn.polygon_labels)
    assert main(args) == 0  # the other route: the stamp no longer fits, every map is redone
    assert_labels_equal(root, "cityscapes", syn.labels["cityscapes"])


def test_force_redoes_everything(syn, tmp_path):
    root = tmp_path / "data"
    mf = write_manifest(tmp_path / "m.json", syn, None)
    args = [
        "voc",
        "--root",
        str(root),
        "--manifest",
        str(mf),
        "--archives",
        str(syn.archives["val2017.zip"].parent),
    ]
    assert main(args) == 0
    before = snapshot(root / "VOCdevkit")
    assert main([*args, "--force"]) == 0
    after = snapshot(root / "VOCdevkit")
    assert before.keys() == after.keys() and all(after[p] != before[p] for p in before)


def test_converted_labels_are_single_channel_pngs(prepared):
    root = prepared[0]
    info = get_benchmark("context")
    p = next((root / info.root / info.labels).glob("*.png"))
    with Image.open(p) as img:
        assert img.mode == "L" and img.size == (W, H)


def test_progress_lines_show_bytes_rate_and_eta():
    import io

    from lposs_lab.lab.data.prepare.download import Progress

    out = io.StringIO()  # not a terminal: plain lines
    p = Progress("x.tar", 4_000_000, 1_000_000, stream=out, every=0.0)
    p.update(1_000_000)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[-1].startswith("x.tar: 2.0 MB of 4.0 MB (50%), ") and "MB/s, ETA " in lines[-1]


def test_several_processes_write_the_same_labels(tmp_path):
    big = make_archives(tmp_path / "archives", n=9, seed=3)  # >= 4 tasks per worker: the pools are used
    mf = write_manifest(tmp_path / "m.json", big, None)
    root = tmp_path / "data"
    args = ["context", "coco_object", "--root", str(root), "--manifest", str(mf)]
    assert main([*args, "--archives", str(tmp_path / "archives"), "--workers", "2"]) == 0
    for name in ("context", "coco_stuff", "coco_object"):
        assert_labels_equal(root, name, big.labels[name])
