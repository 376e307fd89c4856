"""load_image: every odd or broken file becomes upright 8-bit RGB or a one-line CaptionerError naming it."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.errors import CaptionerError
from captioner.vision.images import find_images, load_image


def gradient(w=40, h=30) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)  # (H, W, 3)
    return Image.fromarray(x)


def assert_error_names(path, match=None):
    with pytest.raises(CaptionerError, match=match) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_plain_jpeg_path_with_spaces_and_non_ascii(tmp_path):
    path = tmp_path / "a folder" / "ünïcödé photo 犬.jpg"
    path.parent.mkdir()
    gradient().save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_text("this is not a picture\n"),
])
def test_empty_and_text_files_named_jpg(tmp_path, make):
    path = tmp_path / "bad.jpg"
    make(path)
    assert_error_names(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    gradient(200, 200).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_error_names(path, "truncated")


def test_missing_path_and_directory(tmp_path):
    assert_error_names(tmp_path / "nope.jpg", "no such file")
    assert_error_names(tmp_path, "directory")


def test_rgba_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(load_image(path))
    assert (out[:, :5] == (255, 0, 0)).all()
    assert (out[:, 5:] == 255).all()  # white, not black


def test_palette_gif_with_transparency(tmp_path):
    path = tmp_path / "p.gif"
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))  # left half blue, right half index 0 = transparent
    img.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert (out[:, :4] == (0, 0, 255)).all() and (out[:, 4:] == 255).all()


def test_16_bit_png_is_scaled_not_white(tmp_path):
    path = tmp_path / "deep.png"
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16)[None].repeat(8, 0)  # (8, 64) full 16-bit range
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))[..., 0]
    assert out[0, 0] == 0 and out[0, -1] == 255
    assert 120 < out[0, 32] < 135  # mid grey stays mid grey


def test_float_and_bilevel_modes(tmp_path):
    f = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    f.save(tmp_path / "f.tiff")
    assert np.asarray(load_image(tmp_path / "f.tiff")).mean() == pytest.approx(128, abs=1)
    Image.new("1", (5, 5), 1).save(tmp_path / "one.png")
    assert (np.asarray(load_image(tmp_path / "one.png")) == 255).all()


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK").save(path)
    out = np.asarray(load_image(path)).reshape(-1, 3).mean(0)
    assert out[0] > 150 and out[1] < 80 and out[2] < 80  # still red


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    gradient(40, 30).save(path, exif=exif)
    assert Image.open(path).size == (40, 30)
    assert load_image(path).size == (30, 40)


def test_one_pixel(tmp_path):
    Image.new("L", (1, 1), 7).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").size == (1, 1)


def test_decompression_bomb_refused_from_header(tmp_path):
    # A real 1x1 PNG whose IHDR is patched to claim 20000x20000 (with a valid CRC): a loader that decoded
    # first would try to allocate 1.2 GB.
    path = tmp_path / "bomb.png"
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", 20000, 20000)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    path.write_bytes(bytes(data))
    assert_error_names(path, "decompression bomb")


def test_find_images_expands_directories_sorted_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.JPG", "a.png", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path, tmp_path / "a.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "b.JPG", "sub/c.webp"]
    with pytest.raises(CaptionerError, match="missing"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="no images"):
        find_images([tmp_path / "empty"])
