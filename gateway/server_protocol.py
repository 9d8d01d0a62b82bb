"""uvicorn's httptools protocol, writing each loop iteration's output in one system call.

uvicorn writes a response's head when the app sends `http.response.start` and its body
when the app sends `http.response.body`: two `write` calls, and on a TCP socket each one
pushes a segment through the network stack (on loopback, the receiver's side too). For a
proxied JSON response both come in the same turn of the event loop, so buffering writes
until the turn ends (or the response is complete) sends head and body together: one
system call and one segment instead of two; measured here, about a tenth of the CPU of
`gateway serve` per request (docs/performance.md). Streams are unaffected but for that
same-turn grouping.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """Forwards to a transport, except that writes made in one loop turn leave together."""

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # what was written before close() is sent, as with a plain transport
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport, self.loop)
        wrapped: Any = self._coalescing
        super().connection_made(wrapped)

    def on_response_complete(self) -> None:
        # The response is whole: send it now rather than at the end of the loop turn.
        self._coalescing.flush()
        super().on_response_complete()
