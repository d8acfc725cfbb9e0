import os

import numpy as np
import pytest
import torch
from PIL import Image

from lposs_lab.files import atomic_write
from lposs_lab.image_io import ImageError, load_image, to_rgb_uint8


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK", "LA", "1"])
def test_pil_modes_decode_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    img.save(tmp_path / f"x{suffix}")
    for src in (img, tmp_path / f"x{suffix}"):
        out = to_rgb_uint8(src)
        assert out.shape == (7, 9, 3) and out.dtype == np.uint8
    if mode == "RGB":
        assert np.array_equal(to_rgb_uint8(img), np.asarray(rgb))


def test_16bit_grey_keeps_high_byte(tmp_path):
    arr = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 0, 1, 255]


def test_arrays_and_tensors():
    chw = torch.rand(3, 5, 6)
    out = to_rgb_uint8(chw)
    assert out.shape == (5, 6, 3)
    assert np.array_equal(out, (chw.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    assert to_rgb_uint8(np.zeros((4, 4), np.uint16)).shape == (4, 4, 3)
    with pytest.raises(ImageError, match="NaN"):
        to_rgb_uint8(np.full((2, 2, 3), np.nan, np.float32))
    with pytest.raises(ImageError, match="empty"):
        to_rgb_uint8(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="unsupported image type"):
        to_rgb_uint8(3.0)


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "text.jpg")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png"):
        load_image(tmp_path / "trunc.png")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "a.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    with atomic_write(target) as fh:
        fh.write(b"ok")
    assert target.read_bytes() == b"ok" and len(list((tmp_path / "out").iterdir())) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
