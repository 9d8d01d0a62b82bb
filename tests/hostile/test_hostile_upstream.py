"""Sick upstreams and clients that give up, against `gateway serve` (its own server
protocol): deadlines, cancellation, never an inference twice, bodies never held whole."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.store import Names, Store, connect
from tests.conftest import bearer, new_key
from tests.processes import Process, gateway_serve
from tests.redis_inspect import redis_of
from tests.upstream.test_upstream_client import CHUNKED_HEAD, Server, chunk, response

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
STREAM = {**CHAT, "stream": True}
TIMEOUTS = {"GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "1", "GATEWAY_UPSTREAM_IDLE_TIMEOUT": "0.5"}


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = connect(redis_url, timeout_seconds=5.0)
    yield store
    await store.close()


@contextlib.contextmanager
def serve(upstream_url: str, redis_url: str,
          env: dict[str, str] | None = None) -> Iterator[Process]:
    (process,) = gateway_serve(upstream_url, redis_url, env={**TIMEOUTS, **(env or {})})
    try:
        yield process
    finally:
        process.terminate()


def stderr_of(process: Process) -> str:
    """Stops the gateway and returns what it logged."""
    process.process.send_signal(signal.SIGTERM)
    _, err = process.process.communicate(timeout=30)
    return err.decode(errors="replace")


async def reservations(store: Store, account_id: str) -> list[bytes]:
    return [k async for k in redis_of(store).scan_iter(match=Names.reservation(account_id, "*"))]


async def test_an_upstream_that_never_answers_is_a_504_in_time(
        redis_url: str, redis_store: Store) -> None:
    secret, key_id, account_id = await new_key(redis_store, Settings(api_plan_keys=True))

    async def silent(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        await server.wait_eof(reader)  # accepts, reads, answers nothing

    async with Server(silent) as upstream:
        with serve(upstream.url, redis_url) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                started = time.monotonic()
                answer = await client.post("/v1/chat/completions", json=CHAT,
                                           headers=bearer(secret))
                elapsed = time.monotonic() - started
            await asyncio.wait_for(upstream.eof.wait(), 5)  # the upstream socket was closed
            log = stderr_of(gateway)
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert 0.9 < elapsed < 3
    assert await reservations(redis_store, account_id) == []  # settled at once
    assert (await redis_store.get_key(key_id)).spent == 0
    assert "Traceback" not in log


async def test_a_body_that_stalls_is_cut_short_and_settled(
        redis_url: str, redis_store: Store) -> None:
    secret, _, account_id = await new_key(redis_store, Settings(api_plan_keys=True))

    async def stalls(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"x" * 10)  # 10 of 1000 bytes
        await server.wait_eof(reader)

    async with Server(stalls) as upstream:
        with serve(upstream.url, redis_url) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                with pytest.raises(httpx.RemoteProtocolError):  # incomplete, and says so
                    await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))
            await asyncio.wait_for(upstream.eof.wait(), 5)
            await asyncio.sleep(0.2)
            log = stderr_of(gateway)
    assert await reservations(redis_store, account_id) == []
    assert "Traceback" not in log and "without completing response" not in log


async def test_a_stream_that_stalls_ends_cleanly_billed_what_was_delivered(
        redis_url: str, redis_store: Store) -> None:
    secret, key_id, account_id = await new_key(redis_store, Settings(api_plan_keys=True))
    token = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'

    async def stalls(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(token) + chunk(token))
        await server.wait_eof(reader)

    async with Server(stalls) as upstream:
        with serve(upstream.url, redis_url) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                answer = await client.post("/v1/chat/completions", json=STREAM,
                                           headers=bearer(secret))
            log = stderr_of(gateway)
    assert answer.status_code == 200
    assert answer.content == token * 2  # ended cleanly after what came
    assert await reservations(redis_store, account_id) == []
    spent = (await redis_store.get_key(key_id)).spent
    price = Settings().default_price
    assert spent <= price.cost_micro(4096, 2)  # the prompt's bound and 2 tokens, not 8
    assert "Traceback" not in log


async def test_a_client_that_gives_up_on_a_non_streamed_request_cancels_the_upstream(
        redis_url: str, redis_store: Store) -> None:
    secret, _, account_id = await new_key(redis_store, Settings(api_plan_keys=True))

    async def slow(server: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        await server.wait_eof(reader)  # "generating" until the gateway hangs up

    async with Server(slow) as upstream:
        with serve(upstream.url, redis_url, {"GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "60"}) \
                as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=0.5) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))
            started = time.monotonic()
            await asyncio.wait_for(upstream.eof.wait(), 5)  # vLLM would abort now
            noticed = time.monotonic() - started
            await asyncio.sleep(0.2)
    assert noticed < 1
    assert await reservations(redis_store, account_id) == []


async def test_a_post_the_upstream_read_is_never_run_twice(
        redis_url: str, redis_store: Store) -> None:
    secret, _key_id, _ = await new_key(redis_store, Settings(api_plan_keys=True))

    async def drops_second(server: Server, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        writer.write(response(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'))
        await writer.drain()
        if index == 0:
            await server.read_request(reader)  # read the next one, close without answering
            writer.transport.abort()

    async with Server(drops_second) as upstream:
        with serve(upstream.url, redis_url) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                first = await client.post("/v1/chat/completions", json=CHAT,
                                          headers=bearer(secret))
                second = await client.post("/v1/chat/completions", json=CHAT,
                                           headers=bearer(secret))
    assert first.status_code == 200
    assert second.status_code == 502
    assert len(upstream.requests) == 2  # not 3: the second was not sent again


async def test_a_300_mb_answer_passes_through_in_bounded_memory(
        redis_url: str, redis_store: Store, tmp_path: Path) -> None:
    secret, key_id, _ = await new_key(redis_store, Settings(api_plan_keys=True))
    size = 300 * 1024 * 1024
    piece = b"[" + b"0.125," * 10922 + b"0.5]"  # ~64 KiB of embedding numbers
    usage = b'{"usage":{"prompt_tokens":7,"total_tokens":7},"data":['

    async def huge(server: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        count = size // (len(piece) + 1)
        body_len = len(usage) + count * (len(piece) + 1) - 1 + 2
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % body_len + usage)
        for i in range(count):
            writer.write(piece + (b"," if i < count - 1 else b""))
            await writer.drain()
        writer.write(b"]}")
        await writer.drain()

    async with Server(huge) as upstream:
        with serve(upstream.url, redis_url) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
                idle = _peak_rss_mb(gateway)
                received = 0
                async with client.stream("POST", "/v1/embeddings",
                                         json={"model": "e", "input": "x"},
                                         headers=bearer(secret)) as answer:
                    async for data in answer.aiter_raw():
                        received += len(data)
                peak = _peak_rss_mb(gateway)
    assert answer.status_code == 200 and received > size * 0.99
    print(f"gateway peak RSS: {idle:.1f} MB idle, {peak:.1f} MB after 300 MB")
    assert peak - idle < 32, (idle, peak)
    # usage came first (llama.cpp's embeddings): found all the same, in bounded state
    assert (await redis_store.get_key(key_id)).spent == Settings().default_price.cost_micro(
        7, 0)


def _peak_rss_mb(process: Process) -> float:
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_sigterm_with_hung_upstreams_ends_in_time_with_503s_not_500s(
        redis_url: str, redis_store: Store) -> None:
    secret, _, account_id = await new_key(redis_store, Settings(api_plan_keys=True),
                                          rpm=100_000)

    async def hangs(server: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, index: int) -> None:
        await server.read_request(reader)
        await server.wait_eof(reader)

    async with Server(hangs) as upstream:
        with serve(upstream.url, redis_url, {"GATEWAY_UPSTREAM_FIRST_BYTE_TIMEOUT": "300",
                                             "GATEWAY_SHUTDOWN_TIMEOUT": "2"}) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                pending = [asyncio.ensure_future(client.post(
                    "/v1/chat/completions", json=CHAT, headers=bearer(secret)))
                    for _ in range(5)]
                await asyncio.sleep(0.5)
                started = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*pending)
                elapsed = time.monotonic() - started
                _, err = await asyncio.to_thread(gateway.process.communicate, timeout=30)
    assert [a.status_code for a in answers] == [503] * 5
    assert {a.json()["error"]["code"] for a in answers} == {"shutting_down"}
    assert elapsed < 5
    log = err.decode(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log
    assert await reservations(redis_store, account_id) == []
