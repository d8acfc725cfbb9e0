"""``prepare`` on bad input: one ``error:`` line, exit status 2, nothing extracted, no needless request.

Synthetic archives in the original formats, served on 127.0.0.1; every other connection fails.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from http_server import FileServer
from prepare_fixtures import manifest_file
from synthetic_archives import error_lines, write_manifest

from lposs_lab.lab.data.prepare.__main__ import main

pytestmark = pytest.mark.usefixtures("offline")  # no connection but to 127.0.0.1


def test_bad_manifest_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text('{"archives": {"x.tar": {"urls": [], "size": -1}}}')
    assert main(["voc", "--root", str(tmp_path / "d"), "--manifest", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: manifest") and "size" in err[0]


def test_corrupted_download_is_refused_and_nothing_extracted(syn, tmp_path, capsys):
    name = "VOCtrainval_11-May-2012.tar"
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    data = bytearray(syn.archives[name].read_bytes())
    data[700] ^= 0xFF
    bad.write_bytes(bytes(data))
    with FileServer({f"/{name}": bad}) as srv:
        mf = write_manifest(tmp_path / "m.json", syn, srv.url)
        root = tmp_path / "data"
        assert main(["voc", "--root", str(root), "--manifest", str(mf)]) == 2
        assert len(srv.requests) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and name in err[0] and "sha256" in err[0]
    assert not (root / "VOCdevkit").exists()
    assert not (root / "downloads" / name).exists() and not (root / "downloads" / f"{name}.part").exists()


def test_corrupted_local_archive_and_wrong_size_are_refused(syn, tmp_path, capsys):
    archives = tmp_path / "mine"
    archives.mkdir()
    for name in ("val2017.zip", "stuffthingmaps_trainval2017.zip"):
        shutil.copy(syn.archives[name], archives / name)
    with open(archives / "val2017.zip", "ab") as fh:
        fh.write(b"junk")
    mf = write_manifest(tmp_path / "m.json", syn, None)
    root = tmp_path / "data"
    assert main(["coco_object", "--root", str(root), "--manifest", str(mf), "--archives", str(archives)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "val2017.zip" in err[0] and "bytes, the manifest says" in err[0]
    assert not (root / "coco_stuff164k").exists()


def test_archives_folder_missing_one_is_an_error_without_request(syn, server, tmp_path, capsys):
    archives = tmp_path / "mine"
    archives.mkdir()
    shutil.copy(syn.archives["val2017.zip"], archives / "val2017.zip")
    mf = manifest_file(tmp_path, syn, server)
    assert (
        main(
            ["coco_stuff", "--root", str(tmp_path / "d"), "--manifest", str(mf), "--archives", str(archives)]
        )
        == 2
    )
    assert "lacks stuffthingmaps_trainval2017.zip" in capsys.readouterr().err
    assert server.requests == []


@pytest.mark.parametrize("names", [["cityscapes"], ["all"]])
def test_cityscapes_without_zips_exits_2_with_zero_requests(syn, server, tmp_path, capsys, names):
    mf = manifest_file(tmp_path, syn, server)
    root = tmp_path / "data"
    assert main([*names, "--root", str(root), "--manifest", str(mf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cityscapes needs")  # nothing else was printed
    for text in (
        "gtFine_trainvaltest.zip",
        "leftImg8bit_trainvaltest.zip",
        "cityscapes-dataset.com",
        f"python -m lposs_lab.lab.data.prepare cityscapes --root {root}",
        str(root / "downloads"),
    ):
        assert text in err[0]
    assert server.requests == []
    # the packaged manifest gives the sizes a user needs to know
    assert main(["cityscapes", "--root", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err
    assert "241 MB" in err and "11 GB" in err


def test_unwritable_root_and_no_space_fail_before_any_request(syn, server, tmp_path, capsys, monkeypatch):
    mf = manifest_file(tmp_path, syn, server)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["voc", "--root", str(blocker / "data"), "--manifest", str(mf)]) == 2
    assert "cannot write to the data root" in capsys.readouterr().err
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 100, 100))
    assert main(["voc", "ade20k", "--root", str(tmp_path / "data"), "--manifest", str(mf)]) == 2
    err = capsys.readouterr().err
    assert "not enough free disk space" in err and "VOCtrainval_11-May-2012.tar" in err
    assert server.requests == []


def _rewrite_tar(src: Path, dst: Path, drop: str | None = None, link: str | None = None) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if m.name == drop:
                continue
            if m.name == link:
                m2 = tarfile.TarInfo(m.name)
                m2.type, m2.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tout.addfile(m2)
                continue
            tout.addfile(m, tin.extractfile(m))


def test_missing_member_and_unsafe_members_are_named(syn, tmp_path, capsys):
    name = "VOCtrainval_11-May-2012.tar"
    member = "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"
    for kind in ("drop", "link"):
        folder = tmp_path / kind
        folder.mkdir()
        _rewrite_tar(syn.archives[name], folder / name, **{kind: member})
        mf = write_manifest(
            tmp_path / f"{kind}.json", syn, None, **{name: {"size": None, "sha256": None, "md5": None}}
        )
        root = tmp_path / f"data_{kind}"
        assert main(["voc", "--root", str(root), "--manifest", str(mf), "--archives", str(folder)]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and member in err[0]
        assert not (root / "VOCdevkit").exists()
    # a zip name climbing out of the target
    zdir = tmp_path / "zip"
    zdir.mkdir()
    with (
        zipfile.ZipFile(syn.archives["val2017.zip"]) as zin,
        zipfile.ZipFile(zdir / "val2017.zip", "w") as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr("val2017/../../evil.jpg", b"x")
    shutil.copy(syn.archives["stuffthingmaps_trainval2017.zip"], zdir)
    mf = write_manifest(
        tmp_path / "z.json", syn, None, **{"val2017.zip": {"size": None, "sha256": None, "md5": None}}
    )
    root = tmp_path / "data_zip"
    assert main(["coco_stuff", "--root", str(root), "--manifest", str(mf), "--archives", str(zdir)]) == 2
    assert "evil.jpg" in capsys.readouterr().err
    assert not (root / "coco_stuff164k").exists() and not (tmp_path / "evil.jpg").exists()


def test_count_mismatch_names_the_numbers(syn, tmp_path, capsys):
    mf = write_manifest(tmp_path / "m.json", syn, None)
    raw = json.loads(mf.read_text())
    raw["expected"]["ade20k"] = 2000
    mf.write_text(json.dumps(raw))
    root = tmp_path / "data"
    args = [
        "ade20k",
        "--root",
        str(root),
        "--manifest",
        str(mf),
        "--archives",
        str(syn.archives["val2017.zip"].parent),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ade20k: 4 validation images" in err and "expected 2000" in err
    assert not (root / "ade/ADEChallengeData2016/lposs_prepare.json").exists()
