"""The coalescing uvicorn protocol of `gateway serve`: one write per loop turn, nothing
lost or reordered, streams still incremental."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from gateway.serve.server_protocol import CoalescingHttpToolsProtocol, _CoalescingTransport
from gateway.types import Receive, Scope, Send
from tests.conftest import free_port


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)  # even when closing: the tests check nothing comes then

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return f"info:{name}" if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_writes_of_one_turn_leave_in_one_call_in_order() -> None:
    raw = RecordingTransport()
    transport = _CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"head ")
    transport.write(b"body")
    assert raw.writes == []
    await asyncio.sleep(0)
    assert raw.writes == [b"head body"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert raw.writes == [b"head body", b"next"]
    assert transport.get_extra_info("peername") == "info:peername"  # the rest is forwarded


async def test_close_sends_what_was_written_first() -> None:
    raw = RecordingTransport()
    transport = _CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"last words")
    transport.close()
    assert raw.writes == [b"last words"] and raw.closed
    transport.write(b"too late")
    await asyncio.sleep(0)
    assert raw.writes == [b"last words"]  # a closing transport is not written to


async def test_a_complete_response_leaves_at_once_not_at_the_end_of_the_turn() -> None:
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = CoalescingHttpToolsProtocol(config=config, server_state=ServerState(),
                                           app_state={})
    raw = RecordingTransport()
    protocol.connection_made(raw)  # type: ignore[arg-type]
    protocol.transport.write(b"HTTP/1.1 200 OK\r\n")
    protocol.transport.write(b"content-length: 0\r\n\r\n")
    assert raw.writes == []
    protocol.on_response_complete()
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                        "more_body": True})
            await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"x" * 100_000 if scope["path"] == "/big" else b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if scope["path"] == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def coalescing_server() -> AsyncIterator[int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           http=CoalescingHttpToolsProtocol,
                                           log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   path: str) -> dict[str, Any]:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return {"head": head, "body": await reader.readexactly(length)}


async def test_responses_keep_alive_and_close_over_a_real_server() -> None:
    async with coalescing_server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path, size in (("/", 11), ("/big", 100_000), ("/", 11)):
            got = await exchange(reader, writer, path)
            assert got["head"].startswith(b"HTTP/1.1 200 OK") and len(got["body"]) == size
        got = await exchange(reader, writer, "/close")
        assert got["body"] == b'{"ok":true}'
        assert await reader.read() == b""  # the server closed after the full response
        writer.close()
        await writer.wait_closed()


async def test_stream_events_leave_as_they_are_sent() -> None:
    async with coalescing_server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        loop = asyncio.get_running_loop()
        arrivals = []
        received = b""
        while received.count(b"data: ") < 3:
            received += await reader.read(1024)
            arrivals.append(loop.time())
        assert arrivals[-1] - arrivals[0] > 0.3  # not held back until the end
        writer.close()
        await writer.wait_closed()
