"""`captioner serve`: the batching queue on its own, then a real server on 127.0.0.1 (an ephemeral port)
answering real HTTP: 24 photos sent 8 at a time, each bad upload refused with a 4xx {"error": ...}, still
serving after, and the page in headless Chromium captioning a photo picked through its own form."""

import asyncio
import io
import os
import re
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import VISIBLE_JS, Browser

httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'captioner[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'captioner[serve]'")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))
UPLOAD_LIMIT_MB = 1.0


# ---- the batching queue, with a stand-in model -----------------------------------------------------------

class FakeCaptioner:
    def __init__(self):
        self.calls = []

    def caption_pil(self, images, decoding, batch_size):
        beam_size, n_best = decoding.beam_size, decoding.n_best
        self.calls.append((len(images), beam_size, n_best))
        return [[f"{img}/{beam_size}/{k}" for k in range(n_best)] for img in images]


def run_batcher(jobs, **kwargs):
    from captioner.serve.batching import Batcher

    fake = FakeCaptioner()

    async def main():
        batcher = Batcher(fake, **kwargs)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.caption(img, beam_size=b, n_best=n) for img, b, n in jobs))
        finally:
            await batcher.stop()

    return fake.calls, asyncio.run(main())


def test_requests_arriving_together_share_one_forward_pass():
    calls, results = run_batcher([(f"im{i}", 3, 1) for i in range(8)], max_batch=16, max_wait_ms=10)
    assert calls == [(8, 3, 1)]
    assert results == [[f"im{i}/3/0"] for i in range(8)]


def test_batches_are_capped_and_batching_can_be_turned_off():
    calls, _ = run_batcher([(f"im{i}", 3, 1) for i in range(10)], max_batch=4, max_wait_ms=10)
    assert [c[0] for c in calls] == [4, 4, 2]
    calls, results = run_batcher([(f"im{i}", 3, 1) for i in range(5)], max_batch=1, max_wait_ms=10)
    assert [c[0] for c in calls] == [1] * 5 and len(results) == 5


def test_beam_sizes_are_batched_apart_and_each_gets_its_n_best():
    jobs = [("a", 3, 1), ("b", 5, 2), ("c", 3, 3), ("d", 5, 1)]
    calls, results = run_batcher(jobs, max_batch=16, max_wait_ms=10)
    assert sorted(calls) == [(2, 3, 3), (2, 5, 2)]
    assert results == [["a/3/0"], ["b/5/0", "b/5/1"], ["c/3/0", "c/3/1", "c/3/2"], ["d/5/0"]]


# ---- a real server --------------------------------------------------------------------------------------

def jpeg_bytes(path: Path, variant: int) -> bytes:
    """24 different photos from the 3 examples: crops, mirrors, sizes."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        cut = 8 * (variant % 4)
        im = im.crop((cut, cut, w - cut, h - cut))
        if variant % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return buf.getvalue()


@pytest.fixture(scope="module")
def server_dirs(tmp_path_factory):
    """The server's working folder and its TMPDIR: both must stay empty (nothing written to disk)."""
    return tmp_path_factory.mktemp("serve-cwd"), tmp_path_factory.mktemp("serve-tmp")


@pytest.fixture(scope="module")
def server(server_dirs):
    cwd, tmp = server_dirs
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--device", "cpu", "--max-upload-mb", str(UPLOAD_LIMIT_MB)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, seen = None, []
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            seen.append(line)
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
    if url is None:
        proc.kill()
        pytest.fail(f"the server did not start: {''.join(seen)}")
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(100):  # bounded: the socket listens already, the app may still be starting
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            yield url, client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def post_image(client, data: bytes, name="photo.jpg", **fields):
    return client.post("/caption", files={"image": (name, data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def test_health(server):
    _, client = server
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"


def test_24_photos_8_at_a_time_are_all_captioned(server):
    _, client = server
    photos = [jpeg_bytes(EXAMPLES[i % 3], i // 3) for i in range(24)]
    before = client.get("/health").json()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda data: post_image(client, data), photos))
    assert [a.status_code for a in answers] == [200] * 24
    for answer in answers:
        body = answer.json()
        words = body["caption"].split()
        assert 3 <= len(words) <= 20 and "<unk>" not in words
        assert body["n_best"][0]["caption"] == body["caption"] and len(body["n_best"]) == 1
    after = client.get("/health").json()
    assert after["images"] - before["images"] == 24
    # the same photo gets the same caption however it was batched
    alone = post_image(client, photos[0]).json()["caption"]
    assert alone == answers[0].json()["caption"]


def test_n_best_and_beam_size_fields(server):
    _, client = server
    body = post_image(client, EXAMPLES[1].read_bytes(), beam_size=4, n_best=3).json()
    assert len(body["n_best"]) == 3
    scores = [h["score"] for h in body["n_best"]]
    assert scores == sorted(scores, reverse=True)
    assert body["caption"] == body["n_best"][0]["caption"]
    # the shipped model's neighbour index: a confidence for the caption and each of the n-best
    assert 0 <= body["confidence"] <= 1 and body["confidence"] == body["n_best"][0]["confidence"]


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # 144 megapixels in a few kilobytes
    return buf.getvalue()


BAD_UPLOADS = {
    "empty": (b"", 400, "empty"),
    "truncated": (None, 400, "truncated"),
    "not an image": (b"%PDF-1.4 this is no photo\n" * 20, 415, "not an image"),
    "decompression bomb": (None, 400, "decompression bomb"),
}


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_each_bad_upload_is_refused_and_the_server_goes_on(server, kind):
    _, client = server
    data, status, message = BAD_UPLOADS[kind]
    if kind == "truncated":
        whole = EXAMPLES[0].read_bytes()
        data = whole[: len(whole) // 2]
    elif kind == "decompression bomb":
        data = bomb_png()
    answer = post_image(client, data, name=f"{kind}.jpg")
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert post_image(client, EXAMPLES[2].read_bytes()).status_code == 200  # still serving


@pytest.mark.parametrize("request_kwargs,status,message", [
    ({"files": {"photo": ("a.jpg", b"x")}, "data": {"beam_size": "3"}}, 400, "no `image` field"),
    ({"data": {"beam_size": "3"}}, 415, "multipart"),
    ({"content": b"just bytes", "headers": {"content-type": "application/octet-stream"}}, 415, "multipart"),
    ({"files": {"image": ("a.jpg", b"x")}, "data": {"beam_size": "many"}}, 400, "beam_size must be a whole number"),
    ({"files": {"image": ("a.jpg", b"x")}, "data": {"beam_size": "500"}}, 400, "beam_size must be between"),
    ({"files": {"image": ("a.jpg", b"x")}, "data": {"beam_size": "2", "n_best": "3"}}, 400, "n_best must be between"),
])
def test_bad_forms_are_refused(server, request_kwargs, status, message):
    _, client = server
    answer = client.post("/caption", **request_kwargs)
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_unknown_paths_and_methods_answer_json(server):
    _, client = server
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
    answer = client.get("/caption")
    assert answer.status_code == 405 and "error" in answer.json()


def raw_request(url: str, head: bytes, body_chunks) -> bytes:
    """Send a request by hand on a socket, then read the whole answer (bounded by a timeout)."""
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            sock.sendall(chunk)
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer:
                head_part, _, rest = answer.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head_part, re.I)
                if length and len(rest) >= int(length.group(1)):
                    break
    return answer


def test_an_upload_declared_over_the_limit_is_refused_unread(server):
    url, client = server
    declared = 50_000_000  # far over the 1 MB limit; only a few bytes of it are ever sent
    head = (b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: " + str(declared).encode() + b"\r\n\r\n")
    answer = raw_request(url, head, [b"--XyZ\r\n"])
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer[:300]
    assert b"over the 1,000,000-byte limit" in answer
    assert client.get("/health").status_code == 200


def test_a_streamed_upload_over_the_limit_is_refused_as_it_passes_it(server):
    url, client = server
    # chunked, so no Content-Length to go by: the running count refuses it
    head = (b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    block = b"\xff" * 65536
    chunks = [part] + [block] * int(UPLOAD_LIMIT_MB * 1e6 / len(block) + 3)
    answer = raw_request(url, head, [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks])
    assert b" 413 " in answer.partition(b"\r\n")[0], answer[:300]
    assert post_image(client, EXAMPLES[0].read_bytes()).status_code == 200


def test_nothing_is_written_to_disk(server, server_dirs):
    """Uploads, large ones included (python-multipart's own form parsing spools big files to disk), add
    nothing to the server's working folder or its temporary folder."""
    _, client = server
    cwd, tmp = server_dirs

    def files():  # torch may leave a folder of its own in TMPDIR at start-up: only uploads matter here
        return sorted(p for folder in (cwd, tmp) for p in folder.rglob("*"))

    before = files()
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (760, 760, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=95)
    assert 500_000 < len(buf.getvalue()) < UPLOAD_LIMIT_MB * 1e6
    assert post_image(client, buf.getvalue()).status_code == 200
    assert post_image(client, b"").status_code == 400
    assert files() == before and list(cwd.iterdir()) == []


def test_the_page_captions_a_photo_picked_in_its_own_form(server, tmp_path):
    url, client = server
    expected = post_image(client, EXAMPLES[1].read_bytes(), n_best=3).json()
    with Browser(tmp_path / "profile") as browser:
        browser.open(url)
        assert browser.evaluate(f"({VISIBLE_JS})(document.getElementById('drop'))")
        browser.set_files("#image", [EXAMPLES[1]])  # the form's file input, as a person picks a file
        caption = browser.wait_for("(() => { const c = document.querySelector('#results .caption:not(.pending)');"
                                   " return c && c.textContent; })()", timeout=120)
        browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        shown = browser.evaluate(f"""(() => {{
            const card = document.querySelector('#results .result');
            return {{caption: ({VISIBLE_JS})(card.querySelector('.caption')),
                     photo: ({VISIBLE_JS})(card.querySelector('img')),
                     nbest: Array.from(card.querySelectorAll('.nbest li')).map(li => li.firstChild.textContent.trim()),
                     confidence: card.querySelector('.confidence').textContent}};
        }})()""")
        browser.screenshot(tmp_path / "serve-page.png")
    assert caption == expected["caption"]
    assert shown["caption"] and shown["photo"]
    assert shown["nbest"] == [h["caption"] for h in expected["n_best"]]
    assert shown["confidence"] == f"confidence {expected['confidence']:.2f}"
