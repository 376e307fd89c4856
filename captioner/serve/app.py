"""The HTTP app behind `captioner serve` (Starlette; run by uvicorn).

    GET  /          a page: drop or pick photos, see each caption with its n-best and scores
    POST /caption   multipart/form-data, field `image` (a photo), optional `beam_size`, `n_best`
                    -> {"caption": "...", "n_best": [{"caption": "...", "score": -4.2}, ...]}
    GET  /health    {"status": "ok", "device": ..., "batches": ..., "images": ...}

Uploads are read into memory and never written to disk: the body is streamed through python-multipart's
parser with a running byte count, so an upload over the size limit is refused (413) as soon as it
passes the limit, or at once when its Content-Length says so. Every refusal is a 4xx answer with
{"error": "..."}; nothing a client sends stops the server.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner.errors import CaptionerError
from captioner.serve.batching import Batcher
from captioner.serve.page import PAGE
from captioner.vision.images import MAX_PIXELS, decode_image

MAX_BEAM = 10  # a request may not ask for more work per image than this
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries, headers and the small fields, beyond the photo itself


class Refused(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def create_app(captioner, max_batch: int = 16, max_wait_ms: float = 10.0, max_upload_bytes: int = 20_000_000,
               beam_size: int = 3, max_len: int = 20, max_pixels: int = MAX_PIXELS, rerank=None) -> Starlette:
    batcher = Batcher(captioner, max_batch=max_batch, max_wait_ms=max_wait_ms, rerank=rerank)
    # Decoding uploads runs on worker threads; no more at once than there are cores, so decoding and
    # the model's torch threads do not pile up on the CPU.
    decoders = anyio.CapacityLimiter(max(1, len(os.sched_getaffinity(0))))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    async def page(request: Request):
        return HTMLResponse(PAGE.replace("{{BEAM}}", str(beam_size)).replace("{{MAX_BEAM}}", str(MAX_BEAM))
                            .replace("{{MAX_MB}}", f"{max_upload_bytes / 1e6:g}"))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "device": str(captioner.device), "max_batch": max_batch,
                             "max_wait_ms": max_wait_ms, "max_upload_bytes": max_upload_bytes,
                             "batches": batcher.batches, "images": batcher.images})

    async def caption(request: Request):
        try:
            fields = await _read_form(request, max_upload_bytes)
            if "image" not in fields:
                raise Refused(400, "no `image` field in the form (send the photo as multipart field `image`)")
            filename, data = fields["image"]
            beam = _int_field(fields, "beam_size", beam_size, 1, MAX_BEAM)
            n_best = _int_field(fields, "n_best", 1, 1, beam)
            name = filename or "upload"
            try:
                image = await anyio.to_thread.run_sync(decode_image, data, name, max_pixels, limiter=decoders)
            except CaptionerError as err:
                raise Refused(415 if "not an image" in str(err) else 400, str(err)) from None
        except Refused as refused:
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        hyps = await batcher.caption(image, beam_size=beam, max_len=max_len, n_best=n_best)
        best = [captioner.as_dict(h) for h in hyps]
        confidence = {"confidence": best[0]["confidence"]} if "confidence" in best[0] else {}
        return JSONResponse({"caption": best[0]["caption"], **confidence, "n_best": best})

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail or "error"}, status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    routes = [Route("/", page, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/caption", caption, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.batcher = batcher
    return app


def _int_field(fields: dict, name: str, default: int, low: int, high: int) -> int:
    if name not in fields:
        return default
    text = fields[name][1].decode(errors="replace").strip()
    try:
        value = int(text)
    except ValueError:
        raise Refused(400, f"{name} must be a whole number, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise Refused(400, f"{name} must be between {low} and {high}, got {value}")
    return value


async def _read_form(request: Request, max_upload_bytes: int) -> dict[str, tuple[str | None, bytes]]:
    """The multipart form's fields, {name: (filename or None, bytes)}, read into memory with a limit."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise Refused(415, "send the photo as multipart/form-data with a field `image`")
    limit = max_upload_bytes + _FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise Refused(400, f"bad Content-Length {declared[:40]!r}") from None
        if declared_bytes > limit:
            raise Refused(413, f"upload of {declared_bytes:,} bytes is over the {max_upload_bytes:,}-byte limit")

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
    return {name: (filename, bytes(data)) for name, (filename, data) in fields.items()}
