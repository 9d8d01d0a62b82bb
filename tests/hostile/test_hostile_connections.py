"""Slowloris and oversized heads against `gateway serve`: every connection is bounded in
bytes and time, and half-open connections cannot crowd out real requests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.store import Store, connect
from tests.conftest import bearer, new_key
from tests.processes import Process, gateway_serve, mock_upstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = connect(redis_url, timeout_seconds=5.0)
    yield store
    await store.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Process]:
    process = mock_upstream()
    yield process
    process.terminate()


@contextlib.contextmanager
def serve(upstream: Process, redis_url: str, tmp_path: Path,
          config: str = "") -> Iterator[Process]:
    path = tmp_path / "gateway.toml"
    path.write_text(config or "header_timeout = 1\nbody_timeout = 1\n")
    (process,) = gateway_serve(upstream.url, redis_url, "--config", str(path))
    try:
        yield process
    finally:
        process.terminate()


def raw(port: int, data: bytes, read: bool = True, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if not read:
            return b""
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def rss_mb(process: Process) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_head_over_the_cap_is_a_431_before_it_is_kept(
        upstream: Process, redis_url: str, tmp_path: Path) -> None:
    with serve(upstream, redis_url, tmp_path) as gateway:
        huge = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 200_000 + b"\r\n\r\n"
        answer = raw(gateway.port, huge)
        before = rss_mb(gateway)
        sockets = []
        for _ in range(100):  # 100 unfinished 4 MB heads: refused at 64 KiB each
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            with contextlib.suppress(OSError):
                sock.sendall(b"GET / HTTP/1.1\r\nx-pad: " + b"a" * (4 * 1024 * 1024))
            sockets.append(sock)
        time.sleep(0.3)
        grown = rss_mb(gateway) - before
        for sock in sockets:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"headers_too_large" in answer
    assert grown < 40, grown  # it was 388 MB


async def test_a_head_or_body_sent_too_slowly_is_a_408(
        upstream: Process, redis_url: str, redis_store: Store, tmp_path: Path) -> None:
    secret, _, _ = await new_key(redis_store, Settings(api_plan_keys=True))
    with serve(upstream, redis_url, tmp_path) as gateway:
        started = time.monotonic()
        slow_head = raw(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        head_seconds = time.monotonic() - started
        started = time.monotonic()
        slow_body = raw(gateway.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                        b"authorization: Bearer " + secret.encode() + b"\r\n"
                        b"content-length: 100\r\n\r\n{\"model\"")
        body_seconds = time.monotonic() - started
        idle = raw(gateway.port, b"")  # connected, says nothing
    assert slow_head.startswith(b"HTTP/1.1 408 ") and 0.9 < head_seconds < 3
    assert slow_body.startswith(b"HTTP/1.1 408 ") and 0.9 < body_seconds < 3
    assert idle.startswith(b"HTTP/1.1 408 ")


async def test_half_open_connections_cannot_crowd_out_real_requests(
        upstream: Process, redis_url: str, redis_store: Store, tmp_path: Path) -> None:
    """At the connection cap (500 here), 1 500 half-open connections make room for real
    clients: the ones that waited longest for their head are closed."""
    secret, _, _ = await new_key(redis_store, Settings(api_plan_keys=True), rpm=100_000)
    with serve(upstream, redis_url, tmp_path, "max_connections = 500\n"
               "header_timeout = 60\n") as gateway:
        half_open = []
        for _ in range(1500):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", gateway.port))
            half_open.append(sock)
        await asyncio.sleep(0.5)
        for sock in half_open:
            with contextlib.suppress(OSError):
                sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        statuses = []
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for _ in range(20):
                response = await client.post("/v1/chat/completions", json=CHAT,
                                             headers=bearer(secret))
                statuses.append(response.status_code)
        for sock in half_open:
            sock.close()
    assert statuses == [200] * 20


async def test_a_long_body_sent_with_its_head_in_one_write_is_no_oversized_head(
        upstream: Process, redis_url: str, redis_store: Store, tmp_path: Path) -> None:
    """Only the head counts against max_header_bytes: a 200 KB prompt sent in the same
    write as its head (as curl sends it) is a request, not a 431."""
    secret, _, _ = await new_key(redis_store, Settings(api_plan_keys=True), tpm=10_000_000)
    body = ('{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "'
            + "hello " * 35_000 + '"}]}').encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
            b"content-type: application/json\r\nauthorization: Bearer " + secret.encode()
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    with serve(upstream, redis_url, tmp_path) as gateway:
        answer = raw(gateway.port, head + body)
        # the head's end split across two writes, the body's 200 KB with the second
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(head[:-2])
            time.sleep(0.2)
            sock.sendall(head[-2:] + body)
            split = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    split += chunk
        padded = head.replace(b"host: x", b"host: x\r\nx-pad: " + b"a" * 70_000)
        too_large = raw(gateway.port, padded + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert split.startswith(b"HTTP/1.1 200 "), split[:200]
    assert too_large.startswith(b"HTTP/1.1 431 ")
