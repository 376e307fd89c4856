"""`captioner serve`: load the model once and caption uploads over HTTP (see captioner.serve)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import socket
import sys

from captioner import pretrained
from captioner.cli import decoding_of
from captioner.errors import CaptionerError

log = logging.getLogger("captioner")

SERVE_MODULES = ("starlette", "uvicorn", "python_multipart")


def missing_modules() -> list[str]:
    return [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise CaptionerError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    return sock


def run(args: argparse.Namespace) -> int:
    missing = missing_modules()
    if missing:
        raise CaptionerError(f"serving needs {', '.join(missing)}: pip install 'captioner[serve]'")
    decoding = decoding_of(args)
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise CaptionerError(f"{name} must be at least {low}, got {value}")
    for name, value, low in (("--max-queue", args.max_queue, 1), ("--max-connections", args.max_connections, 1)):
        if value < low:
            raise CaptionerError(f"{name} must be at least {low}, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.request_timeout <= 0:
        raise CaptionerError("--max-wait-ms must be 0 or more, --max-upload-mb and --request-timeout above 0")
    for origin in args.allow_origin:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin.rstrip("/")):
            raise CaptionerError(f"--allow-origin takes an origin such as https://example.com, got {origin!r}")
    if not 0 <= args.port <= 65535:
        raise CaptionerError(f"--port must be 0..65535, got {args.port}")
    pretrained.resolve(args.checkpoint)  # a wrong name or a missing file answers before torch loads

    import torch
    import uvicorn

    from captioner.inference import Captioner
    from captioner.serve.app import MAX_BEAM, create_app

    if decoding.beam_size > MAX_BEAM:
        raise CaptionerError(f"--beam-size must be at most {MAX_BEAM}, got {decoding.beam_size}")
    # One thread runs the model (see captioner.serve.batching); its torch math uses the cores this process
    # may run on, and no more: one intra-op pool, no inter-op pool fighting it.
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # raised once parallel work has started: harmless here
        torch.set_num_interop_threads(1)
    sock = bind(args.host, args.port)
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)
    captioner.encoder  # built now, not on the first request
    app = create_app(captioner, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_upload_bytes=int(args.max_upload_mb * 1e6), decoding=decoding,
                     max_queue=args.max_queue, request_timeout=args.request_timeout,
                     host=args.host, allow_hosts=args.allow_host, allow_origins=args.allow_origin)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"captioner serve: listening on http://{shown}:{port}/ (device {captioner.device}, "
          f"{threads} torch threads, batches of up to {args.max_batch} within {args.max_wait_ms:g} ms)",
          file=sys.stderr, flush=True)
    uvicorn.Server(server_config(app, args.max_connections, args.request_timeout)).run(sockets=[sock])
    return 0


def server_config(app, max_connections: int = 64, request_timeout: float = 60.0):
    """uvicorn's settings for `app`: at most `max_connections` connections and requests at once (more get
    503), idle keep-alive connections closed after 5 s, and a request's headers due within
    `request_timeout` s (captioner.serve.protocol; the body's deadline is the app's)."""
    import uvicorn

    from captioner.serve.protocol import with_head_timeout

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          http=with_head_timeout(request_timeout), limit_concurrency=max_connections,
                          timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)

