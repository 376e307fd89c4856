"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request's head.

uvicorn times out an idle keep-alive connection, but not one that sends its request line and headers a
byte at a time: such a client holds a connection (and a place under `limit_concurrency`) for as long as
it likes. Here a connection must finish each request's headers within `head_timeout` seconds of opening
(or of the previous answer); otherwise it is closed. The body's deadline is the app's (captioner.serve.app).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_head_timeout(head_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class that closes connections whose request head takes over `head_timeout` s."""

    class HeadTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            if not self.transport.is_closing():
                # A new request replaces self.cycle: if it is still the one seen now, no head has come.
                waiting_since = self.cycle
                self._head_deadline = self.loop.call_later(head_timeout, self._head_too_slow, waiting_since)

        def _disarm_head_deadline(self) -> None:
            handle = getattr(self, "_head_deadline", None)
            if handle is not None:
                handle.cancel()
                self._head_deadline = None

        def _head_too_slow(self, waiting_since) -> None:
            self._head_deadline = None
            if self.cycle is waiting_since and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol
