"""Streams through a real uvicorn server: usage injection, stripping, and disconnects."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store, connect
from gateway.types import Message
from tests.burst import CHAT
from tests.conftest import (
    bearer,
    gateway,
    new_key,
    post_scope,
    prompt_bound_of,
    serving,
    stream_then_leave,
)
from tests.redis_inspect import redis_of

STREAM = {"model": "m", "stream": True, "max_tokens": 12,
          "messages": [{"role": "user", "content": "y" * 80}]}


def events(raw: bytes) -> list[dict[str, object]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: ") and block != b"data: [DONE]":
            out.append(orjson.loads(block[6:]))
    return out


async def spent_micro(session: aiohttp.ClientSession, base: str, secret: str) -> int:
    async with session.get(f"{base}/v1/usage", headers=bearer(secret)) as response:
        return round((await response.json())["budget"]["spent"] * 1_000_000)


async def test_stream_is_billed_when_the_client_did_not_ask_for_usage(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    async with serving(gateway(MockUpstream(), store, settings, metrics)) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=STREAM,
                                headers=bearer(secret)) as response:
            assert response.status == 200
            assert response.headers["x-ratelimit-limit-requests"] == "60"
            raw = await response.read()
        chunks = events(raw)
        assert raw.endswith(b"data: [DONE]\n\n")
        assert len(chunks) == 12
        assert all("usage" not in c for c in chunks)  # our injected chunk is removed
        # spend is visible as soon as the stream has ended (read-your-writes)
        assert await spent_micro(session, base, secret) == settings.default_price.cost_micro(
            20, 12)


async def test_stream_keeps_the_usage_chunk_the_client_asked_for(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    body = {**STREAM, "stream_options": {"include_usage": True}}
    async with serving(gateway(MockUpstream(), store, settings, metrics)) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body,
                                headers=bearer(secret)) as response:
            chunks = events(await response.read())
        assert chunks[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 12,
                                       "total_tokens": 32}
        assert await spent_micro(session, base, secret) == settings.default_price.cost_micro(
            20, 12)


async def test_disconnect_mid_stream_is_billed_and_frees_the_key(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, account_id = await new_key(store, settings, rpm=2)
    upstream = MockUpstream(max_words=200, chunk_delay=0.02)
    body = {**STREAM, "max_tokens": 200}
    async with serving(gateway(upstream, store, settings, metrics)) as base, \
            aiohttp.ClientSession() as session:
        streamed = await stream_then_leave(session, f"{base}/v1/chat/completions", body,
                                           bearer(secret), 5)
        # Admission debited the estimate; settlement runs as soon as the server notices,
        # deletes the reservation and replaces the estimate with what was streamed.
        reservations = Names.reservation(account_id, "*")
        for _ in range(200):
            if not [k async for k in redis_of(store).scan_iter(match=reservations)]:
                break
            await asyncio.sleep(0.02)
        spent = await spent_micro(session, base, secret)
        price = settings.default_price
        prompt = prompt_bound_of(body)  # no usage reached the gateway: the prompt's bound
        assert price.cost_micro(prompt, streamed) <= spent \
            <= price.cost_micro(prompt, streamed + 10)
        assert [k async for k in redis_of(store).scan_iter(match=reservations)] == []
        # the reservation of the prompt's bound + 200 was returned: the next goes through
        async with session.post(f"{base}/v1/chat/completions",
                                json={**STREAM, "stream": False},
                                headers=bearer(secret)) as response:
            assert response.status == 200
            remaining = int(response.headers["x-ratelimit-remaining-tokens"])
            next_bound = prompt_bound_of({**STREAM, "stream": False}) + 12
            assert remaining >= 3333 - prompt - (streamed + 10) - next_bound - 20


async def test_running_usage_chunks_do_not_settle_early(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """vLLM's continuous_usage_stats puts a running count on every chunk: bill the last."""
    secret, _, _ = await new_key(store, settings)

    async def upstream(scope, receive, send):  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(1, 11):
            chunk = {"choices": [{"index": 0, "delta": {"content": "tok "}}],
                     "usage": {"prompt_tokens": 20, "completion_tokens": i}}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(chunk) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    body = {**STREAM, "stream_options": {"include_usage": True,
                                          "continuous_usage_stats": True}}
    async with serving(gateway(upstream, store, settings, metrics)) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body,
                                headers=bearer(secret)) as response:
            await response.read()
        assert await spent_micro(session, base, secret) == settings.default_price.cost_micro(
            20, 10)


async def test_an_oversized_event_does_not_stop_usage_parsing(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    big = {"choices": [{"index": 0, "text": "x" * (2 * 1024 * 1024)}]}

    async def upstream(scope, receive, send):  # type: ignore[no-untyped-def]
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        data = b"data: " + orjson.dumps(big) + b"\n\n"
        for start in range(0, len(data), 65536):  # as an upstream client hands it over
            await send({"type": "http.response.body", "more_body": True,
                        "body": data[start:start + 65536]})
        usage = {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 500}}
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + orjson.dumps(usage) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async with serving(gateway(upstream, store, settings, metrics)) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions",
                                json={**STREAM, "max_tokens": 500},
                                headers=bearer(secret)) as response:
            raw = await response.read()
        assert b'"usage"' not in raw  # the injected usage chunk is still removed
        assert len(raw) > 2 * 1024 * 1024  # the big event passed through whole
        assert await spent_micro(session, base, secret) == settings.default_price.cost_micro(
            20, 500)


async def whole_stream_at_once(scope, receive, send):  # type: ignore[no-untyped-def]
    """An upstream whose last token, usage event and [DONE] arrive in one piece, as they do
    from a real server through the upstream client: the end and the usage come together."""
    while (await receive()).get("more_body"):
        pass
    token = {"choices": [{"index": 0, "delta": {"content": "w "}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3}}
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in (token, token, token, usage))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": data + b"data: [DONE]\n\n"})


@pytest.mark.parametrize("body,upstream", [
    (CHAT, MockUpstream(max_words=3)),
    (STREAM, MockUpstream(max_words=3)),
    ({**STREAM, "stream_options": {"include_usage": True}}, MockUpstream(max_words=3)),
    (STREAM, whole_stream_at_once),
], ids=["json", "stream", "stream-with-usage", "stream-in-one-piece"])
async def test_spend_is_visible_to_the_next_request_on_another_replica(
        redis_url: str, settings: Settings, body: dict[str, object], upstream: ASGIApp) -> None:
    """The settlement is written to Redis before the client can see the end of the answer
    (without waiting its round trip): a usage question sent to another replica right after
    it, over another connection, already sees the spend; also right after the scripts were
    flushed."""
    first, second = connect(redis_url, 5.0), connect(redis_url, 5.0)
    # The upstream answers 3 words, fewer than max_tokens: until the settlement lands,
    # `spent` still holds the admission's larger estimate.
    prompt = 10 if body is CHAT else 20
    cost = settings.default_price.cost_micro(prompt, 3)
    try:
        secret, _, _ = await new_key(first, settings, rpm=1000, tpm=1_000_000)
        replica_a = gateway(upstream, first, settings, Metrics.create(CollectorRegistry()))
        replica_b = gateway(MockUpstream(), second, settings,
                            Metrics.create(CollectorRegistry()))
        async with serving(replica_a) as base_a, serving(replica_b) as base_b, \
                aiohttp.ClientSession() as session:
            for done in range(1, 41):
                if done == 20:  # after SCRIPT FLUSH, the admission reloads the scripts
                    await redis_of(first).script_flush()
                async with session.post(f"{base_a}/v1/chat/completions", json=body,
                                        headers=bearer(secret)) as response:
                    assert response.status == 200
                    await response.read()
                assert await spent_micro(session, base_b, secret) == done * cost
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("body,upstream", [
    (CHAT, MockUpstream(max_words=3)),
    (STREAM, MockUpstream(max_words=3)),
    (STREAM, whole_stream_at_once),
], ids=["json", "stream", "stream-in-one-piece"])
async def test_spend_is_in_redis_when_the_end_of_the_answer_leaves(
        redis_url: str, settings: Settings, metrics: Metrics, body: dict[str, object],
        upstream: ASGIApp) -> None:
    """At the moment the gateway hands the server the end of the answer, the settlement is
    already written to Redis, not just queued: a blocking read made right then (as another
    process, e.g. a replica, could make it) sees the spend. The replica test above runs
    everything in one event loop, which writes the queued settlement before the next
    request can be read anyway, so it cannot tell the two apart."""
    store = connect(redis_url, 5.0)
    observer = redis.Redis.from_url(redis_url)  # blocking: the event loop does not turn
    try:
        secret, key_id, account_id = await new_key(store, settings, rpm=1000, tpm=1_000_000)
        record = Names.key(account_id, key_id)
        prompt = 10 if body is CHAT else 20
        assert int(observer.hget(record, "spent") or 0) == 0
        seen: list[int] = []
        request = orjson.dumps(body)
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request, "more_body": False}
            await asyncio.Event().wait()  # the client stays until the answer ends
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                seen.append(int(observer.hget(record, "spent") or 0))

        scope = post_scope("/v1/chat/completions", secret, request)
        await gateway(upstream, store, settings, metrics)(scope, receive, send)
        assert seen == [settings.default_price.cost_micro(prompt, 3)]
    finally:
        observer.close()
        await store.close()
