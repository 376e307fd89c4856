"""`captioner serve`: load the model once and caption uploads over HTTP (see captioner.serve)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import socket
import sys

from captioner.commands import rerank_of
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
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--beam-size", args.beam_size, 1),
                             ("--max-len", args.max_len, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise CaptionerError(f"{name} must be at least {low}, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise CaptionerError("--max-wait-ms must be 0 or more and --max-upload-mb above 0")
    if not 0 <= args.port <= 65535:
        raise CaptionerError(f"--port must be 0..65535, got {args.port}")

    import torch
    import uvicorn

    from captioner.inference import Captioner
    from captioner.serve.app import MAX_BEAM, create_app

    if args.beam_size > MAX_BEAM:
        raise CaptionerError(f"--beam-size must be at most {MAX_BEAM}, got {args.beam_size}")
    # One thread runs the model (see captioner.serve.batching); its torch math uses the cores this process
    # may run on, and no more: one intra-op pool, no inter-op pool fighting it.
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # raised once parallel work has started: harmless here
        torch.set_num_interop_threads(1)
    sock = bind(args.host, args.port)
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    captioner.encoder  # built now, not on the first request
    app = create_app(captioner, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                     max_upload_bytes=int(args.max_upload_mb * 1e6), beam_size=args.beam_size,
                     max_len=args.max_len, rerank=rerank_of(args))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"captioner serve: listening on http://{shown}:{port}/ (device {captioner.device}, "
          f"{threads} torch threads, batches of up to {args.max_batch} within {args.max_wait_ms:g} ms)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0

