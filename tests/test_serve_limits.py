"""The server's bounds, with a stand-in model behind a real uvicorn on 127.0.0.1 (fast: no weights).

What is bounded: the queue (a full one answers 503 with Retry-After), the bodies being received and the
images being decoded at once, how long a client may take over its headers and its body, and who may
talk to the server (Host, Origin). A client that hangs up has its image dropped from its batch; a batch
that fails is retried image by image. The real model behind the same app is tested in test_serve.py.
"""

import base64
import hashlib
import http.server
import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'captioner[serve]'")
pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'captioner[serve]'")

from captioner.commands.serve import bind, server_config  # noqa: E402
from captioner.serve.app import create_app  # noqa: E402
from captioner.vision.images import decoded_bytes  # noqa: E402

WAIT = 30  # seconds: a generous bound for anything that should happen at once (never a timing check)


class FakeCaptioner:
    """caption_pil records the sizes it was given, can be held closed by `gate`, and fails a batch that
    holds an image 17 pixels wide."""

    device = "cpu"
    encoder = SimpleNamespace(spec=SimpleNamespace(resize=256))

    def __init__(self):
        self.calls, self.gate, self.entered = [], threading.Event(), threading.Event()
        self.gate.set()

    def caption_pil(self, images, decoding, batch_size):
        n_best = decoding.n_best
        self.entered.set()
        assert self.gate.wait(WAIT)
        self.calls.append([img.size for img in images])
        if any(img.size[0] == 17 for img in images):
            raise MemoryError("a poisoned image")
        return [[SimpleNamespace(text=f"{img.size[0]}x{img.size[1]}", score=-1.0)] * n_best for img in images]

    def text(self, hypothesis):
        return hypothesis.text

    def as_dict(self, hypothesis):
        return {"caption": hypothesis.text, "score": hypothesis.score}


def png(w=40, h=30, color=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def serving(fake=None, max_connections=64, request_timeout=60.0, **app_kwargs):
    """(base url, fake model) of the app on a real uvicorn in a thread."""
    fake = fake or FakeCaptioner()
    app = create_app(fake, **{"max_wait_ms": 0, "request_timeout": request_timeout, **app_kwargs})
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, max_connections, request_timeout))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", fake
    finally:
        fake.gate.set()
        server.should_exit = True
        thread.join(WAIT)


def post(base, data=None, name="p.png", headers=None, **fields):
    """POST /caption as multipart/form-data: the photo as `image` (when given) and `fields` beside it."""
    files = {"image": (name, data, "image/png")} if data is not None else {}
    files.update({k: (None, str(v)) for k, v in fields.items()})
    return httpx.post(f"{base}/caption", files=files, headers=headers, timeout=WAIT)


def health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=WAIT).json()


def wait_until(condition):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.02)


def test_a_full_queue_answers_503_with_retry_after_and_the_queued_are_answered():
    with serving(max_batch=1, max_queue=1) as (url, fake), ThreadPoolExecutor(2) as pool:
        fake.gate.clear()
        first = pool.submit(post, url, png(41))
        assert fake.entered.wait(WAIT)  # the model is busy with the first image
        second = pool.submit(post, url, png(42))
        wait_until(lambda: health(url)["waiting"] == 1)  # the second fills the queue
        third = post(url, png(43))
        assert third.status_code == 503 and "busy" in third.json()["error"], third.text
        assert int(third.headers["retry-after"]) >= 1
        fake.gate.set()
        assert [first.result().status_code, second.result().status_code] == [200, 200]
        assert first.result().json()["caption"] == "41x30" and second.result().json()["caption"] == "42x30"
        assert post(url, png(44)).status_code == 200  # room again


def test_the_image_of_a_client_that_hung_up_is_dropped_before_its_batch():
    body = b"".join([b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="gone.png"\r\n',
                     b"Content-Type: image/png\r\n\r\n", png(45), b"\r\n--XyZ--\r\n"])
    with serving(max_batch=1) as (url, fake), ThreadPoolExecutor(1) as pool:
        fake.gate.clear()
        first = pool.submit(post, url, png(41))
        assert fake.entered.wait(WAIT)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                           b"boundary=XyZ\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: health(url)["waiting"] == 1)
        wait_until(lambda: health(url)["gone"] == 1)  # the server noticed while the image waited
        fake.gate.set()  # its image is dropped when the worker reaches it
        assert first.result().status_code == 200
        wait_until(lambda: health(url)["dropped"] == 1)
        assert fake.calls == [[(41, 30)]]


def test_one_bad_image_fails_its_own_request_not_its_batch():
    with serving(max_batch=8, max_wait_ms=300) as (url, fake), ThreadPoolExecutor(3) as pool:
        fake.gate.clear()
        answers = [pool.submit(post, url, png(w)) for w in (16, 17, 18)]
        wait_until(lambda: health(url)["waiting"] == 3 or fake.entered.is_set())
        fake.gate.set()
        status = [a.result().status_code for a in answers]
        assert status == [200, 500, 200], [a.result().text for a in answers]
        assert answers[0].result().json()["caption"] == "16x30"


def test_large_images_reach_the_model_reduced_and_strips_are_refused():
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (10, 120, 200)).save(buf, "PNG")
    with serving() as (url, fake):
        assert post(url, buf.getvalue()).json()["caption"] == "1000x667"
        strip = post(url, png(200_000, 1), name="strip.png")
        assert strip.status_code == 400 and "strip" in strip.json()["error"]
        assert fake.calls == [[(1000, 667)]]


def test_decoding_is_held_to_its_memory_budget():
    big = io.BytesIO()
    Image.new("RGB", (2000, 2000), (10, 120, 200)).save(big, "PNG")
    one = decoded_bytes(2000, 2000, "RGB", 256)
    with serving(decode_budget_bytes=one) as (url, fake), ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(url, big.getvalue()), range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert health(url)["decode_bytes_peak"] == one  # one at a time, never two


def raw(url: str, data: bytes, read_timeout=WAIT) -> bytes:
    """Send `data` on a fresh connection and stall; what the server sends before it closes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as client:
        client.sendall(data)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        return answer


def test_a_client_slow_to_send_its_headers_is_cut_off():
    with serving(request_timeout=1.0) as (url, _):
        # never finishes its headers; the server closes the connection (a recv timeout would raise)
        assert raw(url, b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ") == b""
        assert health(url)["status"] == "ok"


def test_a_client_slow_to_send_its_body_gets_408():
    with serving(request_timeout=1.0) as (url, fake):
        answer = raw(url, b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                          b"boundary=XyZ\r\nContent-Length: 5000\r\n\r\n--XyZ\r\n")
        assert b" 408 " in answer.partition(b"\r\n")[0] and b"took longer than 1 s" in answer, answer[:300]
        assert fake.calls == []


def test_bodies_being_received_are_held_to_their_budget():
    with serving(body_budget_bytes=10_000, request_timeout=5.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as slow:
            slow.sendall(b"POST /caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=XyZ\r\nContent-Length: 9800\r\n\r\n--XyZ\r\n")  # holds 9800 bytes
            wait_until(lambda: post(url, png()).status_code == 503)
            busy = post(url, png())
            assert busy.status_code == 503 and "retry-after" in busy.headers
        wait_until(lambda: post(url, png()).status_code == 200)  # the stalled one timed out: room again


def test_requests_from_other_web_pages_are_refused_unless_allowed():
    with serving(allow_origins=["https://good.example"]) as (url, fake):
        evil = post(url, png(), headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and "--allow-origin" in evil.json()["error"]
        assert fake.calls == []  # refused before anything was captioned
        assert post(url, png(), headers={"Origin": "null"}).status_code == 403
        assert post(url, png(), headers={"Origin": url}).status_code == 200  # the server's own page
        assert post(url, png()).status_code == 200  # no Origin: not a browser (curl, a script)
        good = post(url, png(), headers={"Origin": "https://good.example"})
        assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://good.example"


def test_the_host_header_must_name_the_server():
    with serving() as (url, fake):
        port = url.rsplit(":", 1)[1]
        rebound = post(url, png(), headers={"Host": f"evil.example:{port}"})  # a DNS-rebinding page's name
        assert rebound.status_code == 400 and fake.calls == []
        assert post(url, png(), headers={"Host": f"localhost:{port}"}).status_code == 200
    with serving(host="0.0.0.0", allow_hosts=["photos.lan"]) as (url, _):
        port = url.rsplit(":", 1)[1]
        assert post(url, png(), headers={"Host": f"photos.lan:{port}"}).status_code == 200
        assert post(url, png(), headers={"Host": f"other.lan:{port}"}).status_code == 400


def test_answers_say_nosniff_and_the_page_has_a_content_security_policy():
    with serving() as (url, _):
        page = httpx.get(url + "/", timeout=WAIT)
        assert page.headers["x-content-type-options"] == "nosniff"
        assert httpx.get(url + "/health").headers["x-content-type-options"] == "nosniff"
        assert post(url, b"").headers["x-content-type-options"] == "nosniff"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        script = re.search(r"<script>(.*?)</script>", page.text, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in policy  # the page's own script may run, no other


class PhotoHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body, kind = {"/a.png": (png(46), "image/png"), "/page": (b"<html></html>", "text/html")}.get(
            self.path, (b"\x00" * 5_000, "image/png"))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_form_may_send_a_url_instead_of_a_photo():
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PhotoHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        with serving(max_upload_bytes=4000) as (url, _):
            assert post(url, url=f"{base}/a.png").json()["caption"] == "46x30"
            too_big = post(url, url=f"{base}/big.png")
            assert too_big.status_code == 400 and "over the 4,000-byte limit" in too_big.json()["error"]
            page = post(url, url=f"{base}/page")
            assert page.status_code == 415 and "text/html, not an image" in page.json()["error"]
            assert post(url, url="file:///etc/passwd").status_code == 400
    finally:
        web.shutdown()
        web.server_close()


def test_the_memory_budget_lets_small_reservations_past_a_large_one_and_cancelled_ones_go():
    import asyncio

    from captioner.serve.budget import Budget

    async def main():
        budget = Budget(100)
        order = []

        async def hold(name, amount, gate):
            async with budget.hold(amount):
                order.append(name)
                await gate.wait()

        first, large, small, done = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(hold("first", 60, first))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(hold("large", 90, large)))  # must wait for "first"
        gone = asyncio.create_task(hold("cancelled", 80, done))
        tasks.append(asyncio.create_task(hold("small", 30, small)))  # fits beside "first": goes ahead
        await asyncio.sleep(0.01)
        assert order == ["first", "small"] and budget.used == 90
        gone.cancel()
        small.set()
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["first", "small", "large"] and budget.used == 90
        large.set()
        await asyncio.gather(*tasks)
        assert budget.used == 0 and budget.peak == 90
        assert budget.try_reserve(150) and not budget.try_reserve(1)  # too large for it: alone
        budget.release(150)

    asyncio.run(main())
