"""Images that would exhaust memory, and images named by URL.

A small file can describe a huge image: a 1 x 200000 PNG is 862 bytes, and the encoder's resize to a
256-pixel short side would make it 256 x 51,200,000. Such files are refused from their header in one line;
large photos are decoded at a reduced scale; an http(s) URL is downloaded with a size limit and a
timeout. Every fixture is made here with PIL (tiny files), and every URL points at a server on 127.0.0.1
started by the test.
"""

import http.server
import io
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.errors import CaptionerError
from captioner.vision.download import download
from captioner.vision.images import (MAX_ASPECT, as_image, decode_image, decoded_bytes, find_images, load_image,
                                     peek_image)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.jpg"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def strip_png(width=200_000, height=1) -> bytes:
    return png_bytes(Image.new("L", (width, height), 128))


def photo_like(w: int, h: int) -> Image.Image:
    """A smooth colour image (compresses well, so big sizes stay small files)."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


# ---- bounds checked from the header ---------------------------------------------------------------------

def test_a_long_strip_is_refused_in_one_line_before_decoding(tmp_path):
    data = strip_png()
    assert len(data) < 2000  # a few hundred bytes that would become a 39 GB intermediate image
    path = tmp_path / "strip.png"
    path.write_bytes(data)
    for call in (lambda: load_image(path), lambda: decode_image(data, "strip.png"),
                 lambda: peek_image(data, "strip.png")):
        with pytest.raises(CaptionerError, match="strip") as info:
            call()
        assert "strip.png" in str(info.value) and "\n" not in str(info.value)


def test_aspect_limit_in_both_directions_and_just_inside_it(tmp_path):
    with pytest.raises(CaptionerError, match="strip"):
        decode_image(strip_png(1, 5000), "tall")
    ok = decode_image(png_bytes(Image.new("RGB", (MAX_ASPECT * 10, 10))), "wide panorama")
    assert ok.size == (MAX_ASPECT * 10, 10)


def test_arrays_and_pil_images_from_python_are_held_to_the_same_bounds():
    with pytest.raises(CaptionerError, match="strip"):
        as_image(np.zeros((1, 200_000, 3), np.uint8), "images[0]")
    with pytest.raises(CaptionerError, match="strip"):
        as_image(Image.new("RGB", (100_000, 2)), "image")


def test_peek_reads_only_the_header():
    width, height, mode = peek_image(png_bytes(photo_like(640, 480)))
    assert (width, height, mode) == (640, 480, "RGB")
    # a shrunk decode holds the full image once; one decoded whole, twice (it is copied upright)
    assert decoded_bytes(9400, 9400, "RGB", min_side=256) == 9400 * 9400 * 4
    assert decoded_bytes(640, 480, "RGB", min_side=256) == 640 * 480 * 8


# ---- decoding to the encoder's size early ---------------------------------------------------------------

def test_a_large_png_is_reduced_to_at_least_twice_the_encoders_side():
    img = decode_image(png_bytes(photo_like(3000, 2000)), "big.png", min_side=256)
    assert img.mode == "RGB" and img.size == (1000, 667)  # reduced 3x: the short side stays >= 512
    assert decode_image(png_bytes(photo_like(3000, 2000)), "big.png").size == (3000, 2000)  # no min_side


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_stays_upright():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo_like(4000, 3000).save(buf, "JPEG", quality=90, exif=exif)
    img = decode_image(buf.getvalue(), "big.jpg", min_side=256)
    assert img.size == (750, 1000)  # DCT-scaled to 1/4 (1000 x 750), then turned upright


def test_reduced_decoding_feeds_the_encoder_nearly_the_same_pixels():
    """The encoder resizes the short side to 256 anyway: from the reduced decode or from the full one,
    its input differs by a grey level or two."""
    data = png_bytes(photo_like(2400, 1800))
    full = decode_image(data, "x").resize((341, 256), Image.Resampling.BICUBIC)
    reduced = decode_image(data, "x", min_side=256).resize((341, 256), Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(full, np.int16) - np.asarray(reduced, np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 4


def test_palette_bilevel_and_16_bit_images_are_reduced_too():
    """Modes whose pixels cannot be averaged as they are (palette indexes, 1-bit, 16-bit) are converted
    to RGB first, not reported as corrupt."""
    img = Image.new("P", (2400, 1800), 1)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    out = decode_image(png_bytes(img), "palette.png", min_side=256)
    assert out.size == (800, 600) and out.getpixel((5, 5)) == (200, 30, 30)
    assert decode_image(png_bytes(Image.new("1", (2400, 1800), 1)), "bw", min_side=256).getpixel((5, 5)) == (
        255, 255, 255)
    deep = Image.fromarray(np.full((1800, 2400), 65535, np.uint16))
    assert decode_image(png_bytes(deep), "deep", min_side=256).getpixel((5, 5)) == (255, 255, 255)


# ---- URLs -----------------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind, body, declared = route
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    """http://127.0.0.1:PORT serving a photo, a huge body, a page and a strip."""
    photo = EXAMPLE.read_bytes()
    Handler.routes = {
        "/photo.jpg": ("image/jpeg", photo, None),
        "/huge.jpg": ("image/jpeg", photo, 50_000_000),  # says 50 MB
        "/huge-undeclared.jpg": ("image/jpeg", b"\xff" * 3_000_000, None),
        "/page.html": ("text/html", b"<html>not a photo</html>", None),
        "/mislabelled.jpg": ("image/jpeg", b"%PDF-1.4 no photo\n" * 10, None),
        "/strip.png": ("image/png", strip_png(), None),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def one_line_error(call, match):
    with pytest.raises(CaptionerError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_download_and_load_a_url(web):
    assert download(f"{web}/photo.jpg") == EXAMPLE.read_bytes()
    img = load_image(f"{web}/photo.jpg")
    assert img.mode == "RGB" and img.size == Image.open(EXAMPLE).size


def test_url_failures_are_one_line_naming_the_url(web):
    message = one_line_error(lambda: load_image(f"{web}/huge.jpg"), "over the 20,000,000-byte limit")
    assert f"{web}/huge.jpg" in message  # both slashes of http:// kept
    one_line_error(lambda: download(f"{web}/huge-undeclared.jpg", max_bytes=1_000_000), "over the 1,000,000")
    one_line_error(lambda: load_image(f"{web}/page.html"), "text/html, not an image")
    one_line_error(lambda: load_image(f"{web}/mislabelled.jpg"), "not an image file")
    one_line_error(lambda: load_image(f"{web}/strip.png"), "strip")
    one_line_error(lambda: load_image(f"{web}/missing.jpg"), "404")


def test_a_server_that_never_answers_times_out():
    import socket

    with socket.socket() as listener:  # accepts connections (the kernel does) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.jpg"
        one_line_error(lambda: download(url, timeout=0.5), "longer than 0.5 s")


def test_find_images_keeps_urls_whole(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    found = find_images(["https://example.com/x/y.jpg", tmp_path / "a.jpg"])
    assert found == ["https://example.com/x/y.jpg", tmp_path / "a.jpg"]


@pytest.fixture(scope="module")
def captioner():
    from captioner.inference import Captioner

    return Captioner.from_pretrained("flickr8k", device="cpu")


@pytest.mark.slow
def test_the_python_api_captions_a_url(web, captioner):
    assert captioner(f"{web}/photo.jpg") == captioner(str(EXAMPLE))
    one_line_error(lambda: captioner(f"{web}/page.html"), "text/html")


@pytest.mark.slow
def test_the_cli_captions_the_good_ones_and_gives_one_line_per_bad_one(web, tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(strip_png())
    done = subprocess.run([sys.executable, "-m", "captioner", "caption", "--checkpoint", "flickr8k",
                           "--device", "cpu", strip, EXAMPLE, f"{web}/photo.jpg", f"{web}/huge.jpg",
                           f"{web}/page.html"], cwd=REPO, capture_output=True, text=True, timeout=300)
    captions = dict(line.split("\t") for line in done.stdout.splitlines())
    assert list(captions) == [str(EXAMPLE), f"{web}/photo.jpg"], done.stderr
    assert captions[str(EXAMPLE)] == captions[f"{web}/photo.jpg"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, done.stderr
    assert str(strip) in errors[0] and "strip" in errors[0]
    assert f"{web}/huge.jpg" in errors[1] and f"{web}/page.html" in errors[2]
    assert "Traceback" not in done.stderr and done.returncode == 1
