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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config.limits import ServerLimits
from gateway.hooks import HOOKS, RequestHooks


def _refusal(status: bytes, message: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(message) + message)


_TOO_LARGE = _refusal(b"431 Request Header Fields Too Large", b'{"error":{"message":'
                      b'"Request headers too large.","type":"invalid_request_error",'
                      b'"code":"headers_too_large"}}')
_TIMEOUT = _refusal(b"408 Request Timeout", b'{"error":{"message":"The request was not '
                    b'received in time.","type":"invalid_request_error","code":'
                    b'"request_timeout"}}')
_BUSY = _refusal(b"503 Service Unavailable", b'{"error":{"message":"Too many connections.",'
                 b'"type":"api_error","code":"too_many_connections"}}')


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


_limits: ServerLimits | None = None
# Connections waiting for a request head, the longest-waiting first (one event loop per
# worker, so one registry per process).
_waiting: OrderedDict[CoalescingHttpToolsProtocol, None] = OrderedDict()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        global _limits
        if _limits is None:
            _limits = ServerLimits.from_env()
        self._limits = _limits
        self._coalescing = _CoalescingTransport(transport, self.loop)
        self._hooks: list[RequestHooks] = []  # of the requests not yet answered
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes of the head so far (its end may straddle reads)
        self._deadline: asyncio.TimerHandle | None = None
        self._last_body = 0.0
        wrapped: Any = self._coalescing
        super().connection_made(wrapped)
        if len(self.connections) > self._limits.connections and not self._make_room():
            self._refuse(_BUSY)
            return
        self._await_head()

    def _make_room(self) -> bool:
        """Closes the connection that has waited longest for its head (a slowloris holds
        many such), so that one more client can be served."""
        for oldest in _waiting:
            if oldest is not self:
                oldest._refuse(_TIMEOUT)
                return True
        return False

    def _await_head(self) -> None:
        self._head_bytes = 0
        self._head_tail = b""
        _waiting[self] = None
        self._set_deadline(self._limits.header_timeout, self._head_too_slow)

    def _set_deadline(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(seconds, callback)

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            self._refuse(_TIMEOUT)

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return
        silent = self.loop.time() - self._last_body
        if silent < self._limits.body_timeout:
            self._set_deadline(self._limits.body_timeout - silent, self._body_too_slow)
        elif not cycle.response_started:
            self._refuse(_TIMEOUT)
        else:
            self.transport.close()

    def _refuse(self, response: bytes) -> None:
        _waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self in _waiting:
            before = self._head_bytes
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.header_bytes and not self._head_ends_within(
                    data, self._limits.header_bytes - before):
                self._refuse(_TOO_LARGE)  # before the parser keeps any of it
                return
            self._head_tail = data[-3:]
        super().data_received(data)

    def _head_ends_within(self, data: bytes, allowed: int) -> bool:
        """Does the head end in the first `allowed` bytes of `data`? Clients send the head
        and the start of the body in one write: only the head counts against its cap."""
        return b"\r\n\r\n" in self._head_tail + data[:max(0, allowed)]

    def on_body(self, body: bytes) -> None:
        self._last_body = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().on_message_complete()

    def on_headers_complete(self) -> None:
        _waiting.pop(self, None)
        self._last_body = self.loop.time()
        self._set_deadline(self._limits.body_timeout, self._body_too_slow)
        scope = self.scope
        super().on_headers_complete()
        hooks = RequestHooks(self._abort_response)
        self._hooks.append(hooks)
        extensions: dict[str, Any] = scope.setdefault("extensions", {})
        extensions[HOOKS] = hooks  # the app's task has not started: it will see this

    def _abort_response(self) -> None:
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True  # uvicorn then expects no more of this response
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        _waiting.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
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
        if not self.transport.is_closing():
            self._await_head()  # the next request's head (uvicorn's keep-alive timer too)
