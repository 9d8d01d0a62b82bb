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
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HOOKS = "gateway.connection"  # the scope["extensions"] key of a request's RequestHooks


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


class RequestHooks:
    """What the server tells an app about one request's connection, without a task per
    request: `lost` once the client is gone, `on_lost` called right then (the proxy hangs
    the abandoning of its upstream exchange there), and `abort()` to end a response whose
    body was cut short by closing the connection, so the client sees it incomplete."""

    __slots__ = ("_protocol", "lost", "on_lost")

    def __init__(self, protocol: CoalescingHttpToolsProtocol) -> None:
        self._protocol = protocol
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    def abort(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None:
            cycle.disconnected = True  # uvicorn then expects no more of this response
        self._protocol.transport.close()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = _CoalescingTransport(transport, self.loop)
        self._hooks: list[RequestHooks] = []  # of the requests not yet answered
        wrapped: Any = self._coalescing
        super().connection_made(wrapped)

    def on_headers_complete(self) -> None:
        scope = self.scope
        super().on_headers_complete()
        hooks = RequestHooks(self)
        self._hooks.append(hooks)
        extensions: dict[str, Any] = scope.setdefault("extensions", {})
        extensions[HOOKS] = hooks  # the app's task has not started: it will see this

    def connection_lost(self, exc: Exception | None) -> None:
        for hooks in self._hooks:
            hooks.lost = True
            if hooks.on_lost is not None:
                hooks.on_lost()
        self._hooks = []
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # The response is whole: send it now rather than at the end of the loop turn.
        self._coalescing.flush()
        if self._hooks:
            self._hooks.pop(0)
        super().on_response_complete()
