"""The HTTP app behind `captioner serve` (Starlette; run by uvicorn).

    GET  /          a page: drop or pick photos, see each caption with its n-best and scores
    POST /caption   multipart/form-data, field `image` (a photo), optional `beam_size`, `n_best` (they
                    replace those of the server's Decoding, captioner.model.decoding)
                    -> {"caption": "...", "n_best": [{"caption": "...", "score": -4.2}, ...]}
    GET  /health    {"status": "ok", "device": ..., "batches": ..., "images": ...}

Uploads are read into memory and never written to disk: the body is streamed through python-multipart's
parser with a running byte count, so an upload over the size limit is refused (413) as soon as it
passes the limit, or at once when its Content-Length says so. Instead of `image`, a form may send `url`
(an http(s) address): the server downloads it with a timeout and the same size limit. Every refusal is
a 4xx answer with {"error": "..."}; nothing a client sends stops the server.

Memory is bounded at each stage, and a request that finds a stage full is answered 503 with Retry-After
rather than queued without end:

- bodies: the bytes of the bodies being read at once are reserved from a budget (a request's
  Content-Length, or the upload limit when it is chunked); a body must arrive within `request_timeout`
  seconds (408 otherwise);
- decoding: each image's header is read first, and the memory its decoding takes (captioner.vision.images
  .decoded_bytes) is reserved from a second budget before a pixel is decoded; large images are decoded
  straight to about twice the encoder's size (`Image.draft`, `Image.reduce`), so what waits is small;
- the batch queue holds at most `max_queue` images (captioner.serve.batching).

A client that hangs up is noticed while its request waits, and its image is dropped from its batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import os
import re
from dataclasses import replace

import anyio
import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner.errors import CaptionerError
from captioner.model.decoding import Decoding
from captioner.serve.batching import Batcher, Busy
from captioner.serve.budget import Budget
from captioner.serve.origins import OriginGuard, SecurityHeaders, allowed_hosts
from captioner.serve.page import PAGE
from captioner.vision.download import download, is_url
from captioner.vision.images import MAX_PIXELS, decode_image, decoded_bytes, peek_image

MAX_BEAM = 10  # a request may not ask for more work per image than this
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and the small fields, beyond the photo itself
# Memory for decoding images at once: one image at the pixel limit (90 MP, 360 MB decoded) fits, with room
# for smaller ones beside it; a larger reservation (a palette image at the limit) runs alone.
DECODE_BUDGET_BYTES = 512_000_000


class Refused(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The client disconnected while its request waited."""


def create_app(captioner, max_batch: int = 16, max_wait_ms: float = 10.0, max_upload_bytes: int = 20_000_000,
               decoding: Decoding | None = None, max_pixels: int = MAX_PIXELS, max_queue: int = 64,
               request_timeout: float = 60.0, download_timeout: float = 30.0, host: str = "127.0.0.1",
               allow_hosts: list[str] = (), allow_origins: list[str] = (),
               decode_budget_bytes: int = DECODE_BUDGET_BYTES, body_budget_bytes: int | None = None,
               ) -> Starlette:
    """The app; `decoding` (default: Decoding()) is how a request is captioned unless its form asks for
    another beam_size or n_best; `host` (the address the server is bound to) and `allow_hosts` name the
    Host headers it answers, `allow_origins` the other web origins whose pages may use it
    (captioner.serve.origins)."""
    decoding = decoding if decoding is not None else Decoding()
    batcher = Batcher(captioner, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    # Decoding uploads runs on worker threads; no more at once than there are cores, so decoding and
    # the model's torch threads do not pile up on the CPU.
    decoders = anyio.CapacityLimiter(max(1, len(os.sched_getaffinity(0))))
    # Downloads (the `url` field) wait on the network, not the CPU: their own few threads, so a slow site
    # never holds up decoding.
    fetchers = anyio.CapacityLimiter(4)
    decode_budget = Budget(decode_budget_bytes)
    body_limit = max_upload_bytes + _FORM_OVERHEAD
    bodies = Budget(body_budget_bytes or max(8 * body_limit, 64_000_000))
    min_side = captioner.encoder.spec.resize  # images are decoded to at least twice this short side
    page_html = (PAGE.replace("{{BEAM}}", str(decoding.beam_size)).replace("{{MAX_BEAM}}", str(MAX_BEAM))
                 .replace("{{MAX_MB}}", f"{max_upload_bytes / 1e6:g}"))
    counts = {"gone": 0}  # requests whose client hung up while they waited
    page_headers = {"Content-Security-Policy": _content_security_policy(page_html),
                    "Referrer-Policy": "no-referrer"}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    async def page(request: Request):
        return HTMLResponse(page_html, headers=page_headers)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "device": str(captioner.device), "max_batch": max_batch,
                             "max_wait_ms": max_wait_ms, "max_upload_bytes": max_upload_bytes,
                             "max_queue": max_queue, "batches": batcher.batches, "images": batcher.images,
                             "waiting": batcher.waiting, "gone": counts["gone"], "dropped": batcher.dropped,
                             "decode_bytes_peak": decode_budget.peak})

    def retry_after() -> str:  # seconds: about the time the queue ahead takes, at ~1 s a batch
        return str(max(1, math.ceil(batcher.waiting / max_batch)))

    async def image_of(fields) -> object:
        """The decoded image of a form's `image` or `url` field (Refused on anything bad)."""
        if "image" in fields:
            filename, data = fields["image"]
            name = filename or "upload"
        elif "url" in fields:
            name = bytes(fields["url"][1]).decode(errors="replace").strip()
            if not is_url(name):
                raise Refused(400, f"url must start with http:// or https://, got {name[:80]!r}")
            data = await _checked(anyio.to_thread.run_sync(download, name, download_timeout, max_upload_bytes,
                                                           limiter=fetchers))
        else:
            raise Refused(400, "no `image` field in the form (send the photo as multipart field `image`, "
                               "or its address as field `url`)")
        width, height, mode = await _checked(anyio.to_thread.run_sync(peek_image, data, name, max_pixels,
                                                                      limiter=decoders))
        async with decode_budget.hold(decoded_bytes(width, height, mode, min_side)):
            return await _checked(anyio.to_thread.run_sync(decode_image, data, name, max_pixels, min_side,
                                                           limiter=decoders))

    async def answer(fields, release_body):
        try:  # the form's beam_size and n_best in the server's decoding, checked by it
            asked = replace(decoding, beam_size=_int_field(fields, "beam_size", decoding.beam_size, 1, MAX_BEAM),
                            n_best=_int_field(fields, "n_best", decoding.n_best))
        except CaptionerError as err:
            raise Refused(400, str(err)) from None
        image = await image_of(fields)
        del fields  # the upload's bytes are no longer needed while the image waits for its batch
        release_body()
        hyps = await batcher.caption(image, asked)
        best = [captioner.as_dict(h) for h in hyps]
        confidence = {"confidence": best[0]["confidence"]} if "confidence" in best[0] else {}
        return JSONResponse({"caption": best[0]["caption"], **confidence, "n_best": best})

    async def caption(request: Request):
        reserved = [0]  # the body's bytes, held from the body budget until the image is decoded

        def release_body():
            if reserved[0]:
                bodies.release(reserved[0])
                reserved[0] = 0

        try:
            wanted = _body_reservation(request, max_upload_bytes, body_limit)
            if not bodies.try_reserve(wanted):
                raise Busy("too many uploads are being received")
            reserved[0] = wanted
            try:
                with anyio.fail_after(request_timeout):
                    fields = await _read_form(request, max_upload_bytes)
            except TimeoutError:
                raise Refused(408, f"the request's body took longer than {request_timeout:g} s to arrive") from None
            work = answer(fields, release_body)
            del fields
            return await _unless_gone(request, work)
        except Refused as refused:
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        except Busy as busy:
            return JSONResponse({"error": f"the server is busy ({busy}); try again shortly"}, status_code=503,
                                headers={"Retry-After": retry_after()})
        except ClientGone:
            counts["gone"] += 1
            return JSONResponse({"error": "client gone"}, status_code=499)
        finally:
            release_body()

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail or "error"}, status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    routes = [Route("/", page, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/caption", caption, methods=["POST"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host, list(allow_hosts))),
                  Middleware(SecurityHeaders), Middleware(OriginGuard, allowed=list(allow_origins))]
    if allow_origins:  # their pages may read the answers too
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"]))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.batcher = batcher
    return app


async def _checked(work):
    """Await `work` (reading an image); its CaptionerError becomes a 4xx answer."""
    try:
        return await work
    except CaptionerError as err:
        raise Refused(415 if "not an image" in str(err) else 400, str(err)) from None


async def _unless_gone(request: Request, work):
    """The result of the coroutine `work`, unless the client disconnects first: then `work` is cancelled
    (an image waiting for its batch is dropped from it) and ClientGone is raised."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


def _body_reservation(request: Request, max_upload_bytes: int, limit: int) -> int:
    """The bytes to reserve for the body: its Content-Length, or the limit when it has none (chunked);
    413 when it declares more than the limit."""
    declared = request.headers.get("content-length")
    if declared is None:
        return limit
    try:
        declared_bytes = int(declared)
    except ValueError:
        raise Refused(400, f"bad Content-Length {declared[:40]!r}") from None
    if declared_bytes > limit:
        raise Refused(413, f"upload of {declared_bytes:,} bytes is over the {max_upload_bytes:,}-byte limit")
    return max(declared_bytes, 1)


def _content_security_policy(page: str) -> str:
    """The page may run its own inline script and style (by hash), show the photos it was given (blob:
    URLs) and talk to this server; nothing else: no other scripts, frames, plugins or form targets."""
    def hashes(tag):
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S))
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _int_field(fields: dict, name: str, default: int, low: int | None = None, high: int | None = None) -> int:
    """A whole-number form field, within [low, high] when they are given (the server's own limits; the
    decoding's rules are the Decoding's)."""
    if name not in fields:
        return default
    text = fields[name][1].decode(errors="replace").strip()
    try:
        value = int(text)
    except ValueError:
        raise Refused(400, f"{name} must be a whole number, got {text[:40]!r}") from None
    if low is not None and not low <= value <= high:
        raise Refused(400, f"{name} must be between {low} and {high}, got {value}")
    return value


async def _read_form(request: Request, max_upload_bytes: int) -> dict[str, tuple[str | None, bytearray]]:
    """The multipart form's fields, {name: (filename or None, bytes)}, read into memory with a limit
    (the Content-Length was checked by _body_reservation)."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise Refused(415, "send the photo as multipart/form-data with a field `image`")
    limit = max_upload_bytes + _FORM_OVERHEAD

    fields: dict[str, tuple[str | None, bytearray]] = {}
    part: dict = {}

    def on_part_begin():
        part.clear()
        part.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def on_part_data(data, start, end):
        part["data"] += data[start:end]

    def on_part_end():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        filename = disposition.get(b"filename")
        if name and name not in fields:
            fields[name] = (filename.decode(errors="replace") if filename is not None else None, part["data"])

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Refused(413, f"upload is over the {max_upload_bytes:,}-byte limit")
            parser.write(chunk)
        parser.finalize()
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several kinds on a malformed body
        raise Refused(400, f"malformed multipart body ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
                      ) from None
    if "image" in fields and len(fields["image"][1]) > max_upload_bytes:
        raise Refused(413, f"upload is over the {max_upload_bytes:,}-byte limit")
    return fields
