"""gateway.upstream_client against real local servers speaking hand-written HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import pytest

from gateway.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse
from gateway.upstream.connection import _HIGH_WATER


class Request(NamedTuple):
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Server:
    """asyncio.start_server on a free loopback port, running `handler` per connection (with
    the connection's index) and counting connections, requests and client EOFs. It is also a
    watchdog: a test hanging inside `async with Server(...)` fails with TimeoutError."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.accepted = 0
        self.requests: list[Request] = []
        self.eofs = 0
        self.eof = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._deadline = asyncio.timeout(20)
        await self._deadline.__aenter__()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await self._deadline.__aexit__(exc_type, exc, tb)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.accepted
        self.accepted += 1
        try:
            await self.handler(self, reader, writer, index)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.saw_eof()
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].split(b" ")
        assert version == b"HTTP/1.1"
        headers = [(name.lower(), value.strip())
                   for name, value in (line.split(b":", 1) for line in lines[1:])]
        body = await reader.readexactly(int(dict(headers).get(b"content-length", b"0")))
        request = Request(method, target, headers, body)
        self.requests.append(request)
        return request

    async def wait_eof(self, reader: asyncio.StreamReader) -> None:
        """Read until the client closes its side, then count that EOF."""
        while await reader.read(65536):
            pass
        self.saw_eof()

    def saw_eof(self) -> None:
        self.eofs += 1
        self.eof.set()


def response(body: bytes = b'{"ok":true}', status: str = "200 OK",
             headers: tuple[bytes, ...] = (b"Content-Type: application/json",)) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"HTTP/1.1 " + status.encode() + b"\r\n" + head
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


async def keep_answering(server: Server, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, index: int) -> None:
    """A well-behaved keep-alive server; the body names the connection that answered."""
    while await server.read_request(reader) is not None:
        writer.write(response(b"connection %d" % index))
        await writer.drain()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def client_for(url: str, **options: Any) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(url, **options)
    try:
        yield client
    finally:
        await client.close()


async def get(client: UpstreamClient, target: str = "/") -> bytes:
    async with await client.request("GET", target, [], b"") as resp:
        return await resp.read()


# --- 1. request and response as on the wire ---

async def test_content_length_response_and_the_request_as_sent() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: Application/JSON; charset=utf-8\r\n"
                     b"X-Custom: MiXed Case\r\nx-custom: second\r\nContent-Length: 11\r\n\r\n"
                     b'{"id":"x1"}')
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url + "/base/") as client:
        resp = await client.request(
            "POST", "/v1/chat/completions?a=1%20b",
            [(b"authorization", b"Bearer k"), (b"x-one", b"1"), (b"X-Two", b"Two")],
            b'{"model":"m"}')
        assert resp.status == 201
        assert resp.headers == [(b"content-type", b"Application/JSON; charset=utf-8"),
                                (b"x-custom", b"MiXed Case"), (b"x-custom", b"second"),
                                (b"content-length", b"11")]
        assert resp.content_type == b"application/json"
        assert await resp.read() == b'{"id":"x1"}'
        resp.release()  # again: harmless
    [request] = server.requests
    assert request.method == b"POST"
    assert request.target == b"/base/v1/chat/completions?a=1%20b"
    assert request.headers == [(b"host", b"127.0.0.1:%d" % server.port),
                               (b"authorization", b"Bearer k"), (b"x-one", b"1"),
                               (b"x-two", b"Two"), (b"content-length", b"13")]
    assert request.body == b'{"model":"m"}'


async def test_content_length_only_for_body_methods_or_a_body() -> None:
    async with Server(keep_answering) as server, client_for(server.url) as client:
        for method, body in (("GET", b""), ("POST", b""), ("DELETE", b"x"), ("PUT", b"")):
            async with await client.request(method, "/x", [], body) as resp:
                await resp.read()
    lengths = [dict(r.headers).get(b"content-length") for r in server.requests]
    assert lengths == [None, b"0", b"1", b"0"]
    assert server.accepted == 1


def test_base_url_gives_host_header_and_prefix() -> None:
    cases = {
        "http://example.com:80/p/": b"GET /p/x HTTP/1.1\r\nhost: example.com\r\n",
        "https://Example.com:443": b"GET /x HTTP/1.1\r\nhost: example.com\r\n",
        "https://example.com:8443/a/b//": b"GET /a/b/x HTTP/1.1\r\nhost: example.com:8443\r\n",
        "http://[::1]:8000": b"GET /x HTTP/1.1\r\nhost: [::1]:8000\r\n",
    }
    for url, head in cases.items():
        assert UpstreamClient(url)._encode("GET", "/x", [], b"") == head + b"\r\n"
    with pytest.raises(ValueError, match="quoted"):
        UpstreamClient("http://h")._encode("GET", "/a b\r\nx: y", [], b"")


# --- 2. chunked bodies ---

async def test_chunked_body_is_streamed_piece_by_piece() -> None:
    go = asyncio.Event()

    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(b"data: first\n\n"))
        await go.wait()
        writer.write(chunk(b"data: second\n\n") + b"0\r\n\r\n")
        await keep_answering(server, reader, writer, index)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("POST", "/v1/chat/completions", [], b"{}")
        assert resp.content_type == b"text/event-stream"
        pieces = resp.chunks()
        assert await asyncio.wait_for(anext(pieces), 2) == b"data: first\n\n"
        assert not go.is_set()
        go.set()
        assert [piece async for piece in pieces] == [b"data: second\n\n"]
        resp.release()
        assert await get(client) == b"connection 0"  # the chunked exchange kept it alive
    assert server.accepted == 1


async def test_chunked_body_is_read_whole() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        for part in (b"ab", b"c" * 70000, b"d"):
            writer.write((CHUNKED_HEAD if part == b"ab" else b"") + chunk(part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        assert await resp.read() == b"ab" + b"c" * 70000 + b"d"
        assert resp.headers == [(b"content-type", b"text/event-stream"),
                                (b"transfer-encoding", b"chunked")]  # no trailer


# --- 3. keep-alive and the pool ---

def nodelay(client: UpstreamClient) -> int:
    [conn] = client._idle
    assert conn._transport is not None
    sock = conn._transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_keep_alive_reuses_one_connection() -> None:
    async with Server(keep_answering) as server, client_for(server.url) as client:
        for _ in range(3):
            assert await get(client) == b"connection 0"
        assert nodelay(client)
        async with await client.request("GET", "/", [], b"") as resp:
            assert b"".join([piece async for piece in resp.chunks()]) == b"connection 0"
    assert server.accepted == 1
    assert len(server.requests) == 4


async def test_pool_is_lifo_and_bounded_by_max_idle() -> None:
    async with Server(keep_answering) as server, \
            client_for(server.url, max_idle=2) as client:
        responses = await asyncio.gather(*(client.request("GET", "/", [], b"")
                                           for _ in range(3)))
        assert server.accepted == 3
        bodies = [await r.read() for r in responses]  # released in this order
        assert sorted(bodies) == [b"connection 0", b"connection 1", b"connection 2"]
        await until(lambda: server.eofs == 1)  # the oldest idle one was closed
        assert len(client._idle) == 2
        assert await get(client) == bodies[2]  # the most recently used comes first
        assert await get(client) == bodies[2]
    assert server.accepted == 3


async def test_max_idle_zero_keeps_nothing() -> None:
    async with Server(keep_answering) as server, client_for(server.url, max_idle=0) as client:
        assert await get(client) == b"connection 0"
        assert await get(client) == b"connection 1"
        assert not client._idle
        await until(lambda: server.eofs == 2)


async def test_idle_timeout_closes_and_replaces_connections() -> None:
    async with Server(keep_answering) as server, \
            client_for(server.url, idle_timeout=0.05) as client:
        assert await get(client) == b"connection 0"
        await until(lambda: server.eofs == 1)  # closed by the client with no request pending
        assert not client._idle
        assert await get(client) == b"connection 1"


async def test_idle_connection_too_old_is_not_reused() -> None:
    async with Server(keep_answering) as server, \
            client_for(server.url, idle_timeout=0.05) as client:
        assert await get(client) == b"connection 0"
        client._sweeper.cancel()  # type: ignore[union-attr]  # leave it to the lookup
        client._sweeper = None
        await asyncio.sleep(0.1)
        assert await get(client) == b"connection 1"
        await until(lambda: server.eofs == 1)


async def test_close_closes_idle_connections_and_the_client_reopens() -> None:
    async with Server(keep_answering) as server, client_for(server.url) as client:
        await get(client)
        await client.close()
        await until(lambda: server.eofs == 1)
        assert await get(client) == b"connection 1"


# --- 4. responses that end the connection ---

@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
                                  b"HTTP/1.0 200 OK\r\n\r\n"])
async def test_body_until_close_then_a_new_connection(head: bytes) -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        if index == 0:
            await server.read_request(reader)
            writer.write(head + b"first part, ")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"last part")
        else:
            await keep_answering(server, reader, writer, index)

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"first part, last part"
        assert await get(client) == b"connection 1"
    assert server.accepted == 2


async def test_connection_close_with_a_length_is_not_reused() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(response(b"bye", headers=(b"Connection: close",)))
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"bye"
        await until(lambda: server.eofs == 1)  # the client closed it
        assert await get(client) == b"bye"
    assert server.accepted == 2


# --- 5. stale keep-alive connections and the single retry ---

async def test_server_closing_an_idle_connection_is_noticed() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(response(b"connection %d" % index))  # no Connection: close, yet closes

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"connection 0"
        await until(lambda: not client._idle)  # dropped from the pool as soon as it closed
        assert await get(client) == b"connection 1"
        assert await get(client) == b"connection 2"  # right after the answer: retry or not


async def test_a_post_read_on_a_reused_connection_is_never_sent_twice() -> None:
    """The upstream read it and closed without answering: it may be running the
    inference, so the client says so (a 502 upstream) instead of running it again."""
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        if index == 0:
            await server.read_request(reader)
            writer.write(response(b"connection 0"))
            await server.read_request(reader)  # the second request: read, never answered
            writer.transport.abort()
        else:
            await keep_answering(server, reader, writer, index)

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"connection 0"
        with pytest.raises(UpstreamError, match="before answering"):
            await client.request("POST", "/v1/completions", [], b'{"n":2}')
        await asyncio.sleep(0.05)
    assert server.accepted == 1
    assert [r.body for r in server.requests] == [b"", b'{"n":2}']


async def test_an_idempotent_request_read_on_a_reused_connection_is_retried_once() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        if index == 0:
            await server.read_request(reader)
            writer.write(response(b"connection 0"))
            await server.read_request(reader)
            writer.transport.abort()
        else:
            await keep_answering(server, reader, writer, index)

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"connection 0"
        assert await get(client) == b"connection 1"
    assert server.accepted == 2


async def test_retry_happens_only_once() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        if index == 0:
            await server.read_request(reader)
            writer.write(response(b"connection 0"))
        await server.read_request(reader)
        writer.transport.abort()

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"connection 0"
        with pytest.raises(UpstreamError, match="before answering"):
            await client.request("GET", "/", [], b"")
        await asyncio.sleep(0.05)
    assert server.accepted == 2
    assert len(server.requests) == 3


async def test_no_retry_on_a_new_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.transport.abort()

    async with Server(handler) as server, client_for(server.url) as client:
        with pytest.raises(UpstreamError):
            await client.request("POST", "/", [], b"{}")
        await asyncio.sleep(0.05)
    assert server.accepted == 1


async def test_no_retry_once_part_of_the_answer_arrived() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(response(b"connection %d" % index))
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()
        await asyncio.sleep(0.02)

    async with Server(handler) as server, client_for(server.url) as client:
        await get(client)
        with pytest.raises(UpstreamError):
            await client.request("POST", "/", [], b"{}")
        await asyncio.sleep(0.05)
    assert server.accepted == 1


# --- 6. an upstream that dies mid-body ---

async def dies_mid_body(server: Server, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, index: int) -> None:
    await server.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    await writer.drain()
    await asyncio.sleep(0.02)


async def dies_mid_chunked(server: Server, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, index: int) -> None:
    await server.read_request(reader)
    writer.write(CHUNKED_HEAD + chunk(b"x" * 10) + b"20\r\nonly part of it")
    await writer.drain()
    await asyncio.sleep(0.02)


@pytest.mark.parametrize("handler", [dies_mid_body, dies_mid_chunked])
async def test_read_raises_when_the_upstream_dies_mid_body(handler: Handler) -> None:
    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        with pytest.raises(UpstreamError, match="while sending the body"):
            await resp.read()
        assert not client._idle


@pytest.mark.parametrize("handler", [dies_mid_body, dies_mid_chunked])
async def test_chunks_raises_when_the_upstream_dies_mid_body(handler: Handler) -> None:
    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        received = []
        with pytest.raises(UpstreamError, match="while sending the body"):
            async for piece in resp.chunks():
                received.append(piece)
        assert b"".join(received).startswith(b"x" * 10)
        assert not client._idle


# --- 7. leaving early ---

async def test_release_before_the_body_closes_the_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        resp.release()
        resp.release()
        await asyncio.wait_for(server.eof.wait(), 2)
        assert not client._idle
        with pytest.raises(UpstreamError, match="released"):
            await resp.read()


async def test_stream_consumer_leaving_closes_the_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        reading = asyncio.ensure_future(server.wait_eof(reader))
        writer.write(CHUNKED_HEAD)
        with contextlib.suppress(ConnectionError):
            while not server.eof.is_set():  # an endless stream, until the client leaves
                writer.write(chunk(b"data: token\n\n"))
                await writer.drain()
                await asyncio.sleep(0.005)
        await reading

    async with Server(handler) as server, client_for(server.url) as client:
        async with await client.request("POST", "/", [], b"{}") as resp:
            async for _ in resp.chunks():
                break
        await asyncio.wait_for(server.eof.wait(), 2)
        assert not client._idle


# --- 8. unreachable upstreams ---

async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    async with client_for(f"http://127.0.0.1:{port}") as client:
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.request("GET", "/", [], b"")
        assert time.monotonic() - started < 1


async def test_connect_timeout() -> None:
    # A listening socket whose accept queue is full: the kernel drops further SYNs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        with socket.socket() as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                pass
            else:
                pytest.skip("this kernel accepts connections beyond a full backlog")
        async with client_for(f"http://127.0.0.1:{port}", connect_timeout=0.2) as client:
            started = time.monotonic()
            with pytest.raises(UpstreamError, match="timed out"):
                async with asyncio.timeout(5):
                    await client.request("GET", "/", [], b"")
            assert 0.15 < time.monotonic() - started < 1.5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- 9. backpressure ---

async def test_slow_consumer_pauses_reading() -> None:
    size = 4 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for start in range(0, size, 65536):
            writer.write(payload[start:start + 65536])
            await writer.drain()
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        conn = resp._conn
        assert conn is not None
        received = []
        peak = 0
        paused = False
        async for piece in resp.chunks():
            received.append(piece)
            await asyncio.sleep(0.005)  # a slow consumer: data piles up meanwhile
            peak = max(peak, conn._buffered)
            paused = paused or conn._paused
        assert b"".join(received) == payload
        assert paused
        # At most one socket read (256 KiB for asyncio) beyond the high-water mark.
        assert peak <= _HIGH_WATER + 256 * 1024
        assert len(client._idle) == 1  # and the connection is reusable afterwards


# --- 10. cancellation ---

async def test_cancelled_read_closes_the_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(b"data: first\n\n"))
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("POST", "/", [], b"{}")
        reading = asyncio.ensure_future(resp.read())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await asyncio.wait_for(server.eof.wait(), 2)
        resp.release()
        assert not client._idle


async def test_cancelled_request_closes_the_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        await server.wait_eof(reader)  # never answers

    async with Server(handler) as server, client_for(server.url) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.request("POST", "/", [], b"{}")
        await asyncio.wait_for(server.eof.wait(), 2)
        assert not client._idle


# --- 11. configuration ---

@pytest.mark.parametrize("url", ["ftp://x", "http://", "x", "//host/p", "http://h:port",
                                 "http://user:pw@h", "http://h/?q=1"])
def test_bad_base_urls(url: str) -> None:
    with pytest.raises(ValueError):
        UpstreamClient(url)


# --- 12. TLS ---

async def test_https_with_a_private_ca(tmp_path: Path) -> None:
    from tests.tls import Certificates

    certs = Certificates(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs.path("server.crt"), certs.path("server.key"))
    async with Server(keep_answering, server_context) as server:
        trusting = ssl.create_default_context(cafile=certs.path("ca.crt"))
        async with client_for(server.url, ssl_context=trusting) as client:
            assert await get(client) == b"connection 0"
            assert await get(client) == b"connection 0"
        wrong = ssl.create_default_context(cafile=certs.path("other-ca.crt"))
        for context in (wrong, None):  # None: the system CAs, which do not know ours
            async with client_for(server.url, ssl_context=context) as client:
                with pytest.raises(UpstreamError, match="cannot connect"):
                    await client.request("GET", "/", [], b"")
    assert len(server.requests) == 2


async def test_tls_handshake_counts_toward_the_connect_timeout() -> None:
    async def silent(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, index: int) -> None:
        await server.wait_eof(reader)  # plain TCP, never answers the ClientHello

    async with Server(silent) as server:
        url = server.url.replace("http://", "https://")
        async with client_for(url, connect_timeout=0.1) as client:
            with pytest.raises(UpstreamError, match="timed out"):
                await client.request("GET", "/", [], b"")


# --- responses without a body, interim responses, protocol errors ---

@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
async def test_responses_without_body_complete_at_once(status: str) -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 " + status.encode() + b"\r\nETag: x\r\n\r\n")

    async with Server(handler) as server, client_for(server.url) as client:
        for _ in range(2):
            resp = await client.request("GET", "/", [], b"")
            assert await asyncio.wait_for(resp.read(), 1) == b""
    assert server.accepted == 1


async def test_head_response_has_no_body() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("HEAD", "/", [], b"")
        assert dict(resp.headers)[b"content-length"] == b"1234"
        assert await asyncio.wait_for(resp.read(), 1) == b""


async def test_interim_100_continue_is_skipped() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
            await writer.drain()
            writer.write(response(b"final"))

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("POST", "/", [], b"{}")
        assert resp.status == 200
        assert (b"x-interim", b"1") not in resp.headers
        assert await resp.read() == b"final"
        assert await get(client) == b"final"
    assert server.accepted == 1


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                                    b"Connection: upgrade\r\n\r\n"])
async def test_unparseable_response(answer: bytes) -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        with pytest.raises(UpstreamError):
            await client.request("GET", "/", [], b"")
        await asyncio.wait_for(server.eof.wait(), 2)
    assert server.accepted == 1


async def test_unsolicited_data_closes_an_idle_connection() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await keep_answering_once(server, reader, writer, index)
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # nobody asked
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        assert await get(client) == b"connection 0"
        await asyncio.wait_for(server.eof.wait(), 2)
        assert not client._idle


async def test_data_after_the_response_is_not_taken_for_the_next_one() -> None:
    async def handler(server: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(response(b"one") + response(b"surprise"))
        await server.wait_eof(reader)

    async with Server(handler) as server, client_for(server.url) as client:
        resp = await client.request("GET", "/", [], b"")
        assert await resp.read() == b"one"
        assert resp.headers[-1] == (b"content-length", b"3")
        await asyncio.wait_for(server.eof.wait(), 2)
        assert not client._idle


async def keep_answering_once(server: Server, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter, index: int) -> None:
    await server.read_request(reader)
    writer.write(response(b"connection %d" % index))
    await writer.drain()


# --- a real server, and the production event loop ---

async def test_against_uvicorn() -> None:
    uvicorn = pytest.importorskip("uvicorn")

    async def app(scope: dict[str, object], receive: Callable[[], Awaitable[dict[str, object]]],
                  send: Callable[[dict[str, object]], Awaitable[None]]) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")  # type: ignore[operator]
            if not message.get("more_body"):
                break
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(3):
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                            "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"echo " + body})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off",
                            http="httptools", ws="none", loop="none")
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    try:
        await until(lambda: server.started, timeout=5)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with client_for(f"http://127.0.0.1:{port}") as client:
            for _ in range(3):
                async with await client.request("POST", "/echo", [], b"{}") as resp:
                    assert await resp.read() == b"echo {}"
                async with await client.request("POST", "/stream", [], b"{}") as resp:
                    assert resp.content_type == b"text/event-stream"
                    assert b"".join([p async for p in resp.chunks()]) == \
                        b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert len(client._idle) == 1
            assert len(server.server_state.connections) == 1
    finally:
        server.should_exit = True
        await serving


def test_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with Server(keep_answering) as server, client_for(server.url) as client:
            for _ in range(3):
                assert await get(client) == b"connection 0"
            assert nodelay(client)
        async with Server(dies_mid_chunked) as server, client_for(server.url) as client:
            resp = await client.request("GET", "/", [], b"")
            with pytest.raises(UpstreamError):
                await resp.read()

        async def handler(server: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, index: int) -> None:
            await server.read_request(reader)
            writer.write(response(b"connection %d" % index))
            if index == 0:
                await server.read_request(reader)
                writer.transport.abort()

        async with Server(handler) as server, client_for(server.url) as client:
            assert await get(client) == b"connection 0"
            assert await get(client) == b"connection 1"  # retried on a new connection

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_response_is_an_async_context_manager() -> None:
    async with Server(keep_answering) as server, client_for(server.url) as client:
        async with await client.request("GET", "/", [], b"") as resp:
            assert isinstance(resp, UpstreamResponse)
        assert resp._conn is None
        # The body had fully arrived with the head: unread, it does not cost the connection.
        assert len(client._idle) == 1
        assert await get(client) == b"connection 0"
    assert server.accepted == 1


async def test_a_target_with_control_characters_is_refused_before_sending() -> None:
    async with Server(keep_answering) as server, client_for(server.url) as client:
        for target in ("/v1/models\r\nx-injected: 1", "/v1/models\nx: 1", "/a b", "/a\x00"):
            with pytest.raises(ValueError, match="quoted"):
                await client.request("GET", target, [], b"")
        assert await get(client) == b"connection 0"  # the one request that was valid
    assert len(server.requests) == 1
