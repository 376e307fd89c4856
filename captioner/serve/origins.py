"""Who may talk to the server: the names it answers to (Host) and the web pages it answers (Origin).

A server on 127.0.0.1 is still reachable from any web page the user opens: the page can POST to it
(a form upload needs no CORS preflight), and a DNS-rebinding page can even read the answers under a
name of its own that resolves to 127.0.0.1. So:

- the Host header must name the server: 127.0.0.1, localhost, ::1 or the --host it was given, or a name
  given with --allow-host (Starlette's TrustedHostMiddleware; anything else gets 400);
- a request that carries an Origin header (browsers send one with every cross-origin request and with
  same-origin POSTs) must come from the server's own origin or from one named with --allow-origin;
  anything else gets 403 before any of its body is read (OriginGuard). Clients that are not browsers
  (curl, scripts) send no Origin and are served. Allowed origins get CORS headers (CORSMiddleware), so
  their pages may read the answers.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(bound_host: str, extra: list[str] = ()) -> list[str]:
    """The Host header values (without port) a server bound to `bound_host` answers to."""
    hosts = [*LOOPBACK_NAMES, *extra]
    try:
        address = ipaddress.ip_address(bound_host)
    except ValueError:
        hosts.append(bound_host)  # a name: the one the user chose
    else:
        if not address.is_unspecified:  # 0.0.0.0 / ::: only the loopback names and --allow-host
            hosts.append(f"[{address}]" if address.version == 6 else str(address))
    return list(dict.fromkeys(h.lower() for h in hosts))


class OriginGuard:
    """ASGI middleware: 403 for a request whose Origin is neither the server's own nor in `allowed`."""

    def __init__(self, app: ASGIApp, allowed: list[str] = ()):
        self.app = app
        self.allowed = {origin.rstrip("/").lower() for origin in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self._allows(origin, scope, headers):
                body = json.dumps({"error": f"requests from the web page at {origin[:100]} are refused; "
                                            f"start the server with --allow-origin {origin[:100]} to allow it"})
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body.encode())).encode()),
                                        (b"x-content-type-options", b"nosniff")]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)

    def _allows(self, origin: str, scope: Scope, headers: Headers) -> bool:
        origin = origin.rstrip("/").lower()
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
        return origin == own or origin in self.allowed or "*" in self.allowed


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every answer (the page adds its own CSP)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
