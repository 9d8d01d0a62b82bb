"""Short queueing instead of a 429 (issue 16, item 6): a plan's max_queue_wait lets a request
refused for RPM, TPM or a slot wait for its room and be admitted, on Redis and the cluster.

Timings carry slack: they tell a request that waited (about a second a turn at rpm = 60)
from one refused at once (well under half a second), never how fast anything is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.http.queueing import AdmissionQueue
from gateway.obs.metrics import Metrics
from gateway.store import Ask, Decision, Store, connect
from gateway.types import Message
from tests.conftest import bearer, client_for, gateway, new_key, post_scope, serving

PLANS = {
    "max_output_tokens": 12_000,
    "plans": {
        # rpm = 60: once the minute's 60 are spent, one request a second.
        "queued": {"rpm": 60, "tpm": 10_000_000, "max_queue_wait": "2s"},
        "plain": {"rpm": 60, "tpm": 10_000_000},
        # tpm = 12 000: 200 tokens a second.
        "tokens": {"rpm": 100_000, "tpm": 12_000, "max_queue_wait": "5s"},
    }}
CHAT = "/v1/chat/completions"
AT_ONCE = 0.5  # a refusal "at once" comes back well within this; a turn takes ~1 s


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True)


def chat(max_tokens: int = 4) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def samples(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value(
        "gateway_queue_seconds_count", {"outcome": outcome}) or 0.0


def queued_now(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("gateway_queued_requests") or 0.0


async def drain(client: httpx.AsyncClient, secret: str, count: int) -> None:
    """Spends `count` of the key's requests at once (the bucket's burst)."""
    answers = await asyncio.gather(*(client.post(CHAT, json=chat(), headers=bearer(secret))
                                     for _ in range(count)))
    assert [a.status_code for a in answers] == [200] * count


async def timed(client: httpx.AsyncClient, secret: str, t0: float, delay: float = 0.0,
                body: dict[str, Any] | None = None) -> tuple[int, float, str]:
    """(status, seconds from t0 to the answer, error code and Retry-After) of one request
    sent after `delay`: staggered starts make the arrival order certain."""
    await asyncio.sleep(delay)
    response = await client.post(CHAT, json=body or chat(), headers=bearer(secret))
    code = ""
    if response.status_code != 200:
        code = f"{response.json()['error']['code']} {response.headers.get('retry-after')}"
    return response.status_code, time.monotonic() - t0, code


async def until(condition: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_queued_requests_are_admitted_in_turn(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    upstream = MockUpstream()
    secret, _, _ = await new_key(store, settings, plan="queued")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        await drain(client, secret, 59)  # one left: the first of the three goes at once
        t0 = time.monotonic()
        got = await asyncio.gather(*(timed(client, secret, t0, 0.05 * i) for i in range(3)))
    assert [status for status, _, _ in got] == [200, 200, 200]
    first, second, third = (at for _, at, _ in got)
    assert first < AT_ONCE < second < third, got
    assert 0.5 < second - first < 1.5 and 0.5 < third - second < 1.5, got
    assert samples(metrics, "admitted") == 2 and samples(metrics, "refused") == 0
    assert queued_now(metrics) == 0
    assert upstream.requests == 62


async def test_waits_beyond_max_queue_wait_are_refused_at_once(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    upstream = MockUpstream()
    secret, _, _ = await new_key(store, settings, plan="queued")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        await drain(client, secret, 59)
        t0 = time.monotonic()
        got = await asyncio.gather(*(timed(client, secret, t0, 0.05 * i) for i in range(5)))
    # Waits of ~0, ~1, ~2, ~3 and ~4 s: the last two exceed 2 s and are told so at once,
    # with the Retry-After admission computed.
    assert [status for status, _, _ in got] == [200, 200, 200, 429, 429], got
    assert all(at < AT_ONCE for _, at, _ in got[3:]), got
    # Retry-After counts the turns of the two waiting ahead (~2.x s in all, not admission's
    # ~1 s); a refused request holds no turn, so the fifth is told the same.
    assert [code for _, _, code in got[3:]] == ["rate_limit_exceeded 3"] * 2, got
    assert got[2][1] > 1.5
    assert samples(metrics, "admitted") == 2 and samples(metrics, "refused") == 2
    assert metrics.registry.get_sample_value(
        "gateway_queue_seconds_sum", {"outcome": "refused"}) == 0.0
    assert upstream.requests == 62


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_without_max_queue_wait_refusals_are_at_once(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, plan="plain")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        await drain(client, secret, 60)
        t0 = time.monotonic()
        status, at, code = await timed(client, secret, t0)
    assert (status, code) == (429, "rate_limit_exceeded 1") and at < AT_ONCE
    assert samples(metrics, "refused") == samples(metrics, "admitted") == 0


async def test_a_later_request_never_overtakes_an_earlier_one(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """TPM makes overtaking possible: the later request asks far fewer tokens, so its own
    wait is shorter; it still goes after the earlier one."""
    upstream = MockUpstream(max_words=12_000)
    secret, _, _ = await new_key(store, settings, plan="tokens")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        # The whole bucket, really used (settlement gives back only what was not).
        response = await client.post(CHAT, json=chat(11_990), headers=bearer(secret))
        assert response.status_code == 200
        t0 = time.monotonic()
        big, small = await asyncio.gather(
            timed(client, secret, t0, body=chat(400)),  # ~480 tokens: ~2.4 s
            timed(client, secret, t0, 0.1, body=chat(1)))  # ~80 tokens: ~0.4 s alone
    assert big[0] == small[0] == 200, (big, small)
    assert big[1] > 1.5 and small[1] > big[1], (big, small)
    assert samples(metrics, "admitted") == 2


async def test_a_client_that_leaves_while_queued_is_cancelled(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    upstream = MockUpstream()
    secret, key_id, _ = await new_key(store, settings, plan="queued")
    gw = gateway(upstream, store, settings, metrics)
    async with client_for(gw) as client:
        await drain(client, secret, 60)
    spent = (await store.get_key(key_id)).spent
    body = httpx.Request("POST", "http://gw", json=chat()).content
    left = asyncio.Event()
    sent: list[Message] = []
    replayed = False

    async def receive() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    request = asyncio.ensure_future(gw(post_scope(CHAT, secret, body), receive, send))
    await until(lambda: gw.queue.queued == 1)
    assert queued_now(metrics) == 1
    left.set()
    t0 = time.monotonic()
    await asyncio.wait_for(request, 2)
    assert time.monotonic() - t0 < AT_ONCE  # at once, not when its turn would have come
    assert sent == [] and upstream.requests == 60
    assert samples(metrics, "cancelled") == 1 and queued_now(metrics) == 0
    assert gw.queue.queued == 0 and not gw.queue._lines
    await asyncio.sleep(1.1)  # its turn passes: still nothing charged, nothing admitted
    record = await store.get_key(key_id)
    assert record.spent == spent


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_a_client_that_drops_its_connection_is_cancelled_over_uvicorn(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    upstream = MockUpstream()
    secret, key_id, _ = await new_key(store, settings, plan="queued")
    gw = gateway(upstream, store, settings, metrics)
    async with client_for(gw) as client:
        await drain(client, secret, 60)
    spent = (await store.get_key(key_id)).spent
    body = httpx.Request("POST", "http://gw", json=chat()).content
    async with serving(gw) as url:
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
                     b"Authorization: Bearer " + secret.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        await until(lambda: gw.queue.queued == 1)
        writer.close()
        await writer.wait_closed()
        await until(lambda: gw.queue.queued == 0, 1.0)
    assert samples(metrics, "cancelled") == 1 and upstream.requests == 60
    assert (await store.get_key(key_id)).spent == spent


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_the_per_process_bound_refuses_beyond_it(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, plan="queued")
    other, _, _ = await new_key(store, settings, plan="queued")
    gw = gateway(MockUpstream(), store, settings, metrics)
    gw.queue.max_queued = 1
    async with client_for(gw) as client:
        await drain(client, secret, 60)
        await drain(client, other, 60)
        t0 = time.monotonic()
        waiting = asyncio.ensure_future(timed(client, secret, t0))
        await until(lambda: gw.queue.queued == 1)
        beyond = await timed(client, other, t0)  # another key: only the bound refuses it
        first = await waiting
    assert beyond[0] == 429 and beyond[1] < AT_ONCE, beyond
    assert first[0] == 200 and first[1] > 0.3, first
    assert samples(metrics, "refused") == 1 and samples(metrics, "admitted") == 1


async def test_budget_refusals_never_wait(store: Store, settings: Settings,
                                          metrics: Metrics) -> None:
    # A micro-dollar: not even the prompt fits.
    secret, _, _ = await new_key(store, settings, plan="queued", budget_usd="0.000001")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        status, at, code = await timed(client, secret, time.monotonic())
    assert status == 429 and code.startswith("budget_exceeded") and at < AT_ONCE
    assert samples(metrics, "refused") == samples(metrics, "admitted") == 0


async def test_two_replicas_never_let_more_through_than_the_rpm(
        store: Store, settings: Settings, metrics: Metrics, store_kind: str,
        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url")
    second_store = connect(url, timeout_seconds=5.0)
    upstreams = MockUpstream(), MockUpstream()
    secret, _, _ = await new_key(store, settings, plan="queued")
    replicas = (gateway(upstreams[0], store, settings, metrics),
                gateway(upstreams[1], second_store, settings,
                        Metrics.create(type(metrics.registry)())))
    try:
        async with client_for(replicas[0]) as one, client_for(replicas[1]) as two:
            t0 = time.monotonic()
            got = await asyncio.gather(*(timed(one if i % 2 else two, secret, t0)
                                         for i in range(70)))
            elapsed = time.monotonic() - t0
    finally:
        await second_store.close()
    admitted = sum(status == 200 for status, _, _ in got)
    assert {status for status, _, _ in got} == {200, 429}
    # The burst of 60, then one a second: never more, whoever queues where.
    assert 61 <= admitted <= 60 + int(elapsed) + 1, (admitted, elapsed)
    assert upstreams[0].requests + upstreams[1].requests == admitted
    assert all(gw.queue.queued == 0 for gw in replicas)


def refused(retry_us: int, code: int = 4) -> Decision:
    return Decision(code, 60, 0, 60_000_000, 1000, 1000, 0, retry_us, "queued", "subscription")


async def test_a_message_that_is_not_a_disconnect_is_handed_over(metrics: Metrics) -> None:
    """Unit level: while a request waits, the client's channel is read for a disconnect;
    anything else read meanwhile reaches whoever reads next, in order."""
    settings = Settings.from_mapping(PLANS)

    class Gone(Exception):
        pass

    queue = AdmissionQueue(settings.plans.values(), metrics, Gone)
    messages: asyncio.Queue[Message] = asyncio.Queue()
    await messages.put({"type": "http.request", "body": b"late", "more_body": False})
    answers = iter([refused(0, 0)])

    async def admit() -> Decision:
        return next(answers)

    decision, receive = await queue.wait(refused(100_000), "key", messages.get,
                                         Ask(1, 1, 1, 0, 0, 0), admit)
    assert decision.code == 0
    assert (await asyncio.wait_for(receive(), 1))["body"] == b"late"
    await messages.put({"type": "http.disconnect"})
    assert (await asyncio.wait_for(receive(), 1))["type"] == "http.disconnect"


async def test_a_plan_without_max_queue_wait_is_not_in_the_table(metrics: Metrics) -> None:
    """The hot path's only cost is a lookup on a refusal, in a table of opted-in plans."""
    gw = GatewayMiddleware(MockUpstream(), settings=Settings(), metrics=metrics)
    assert gw.queue.waits == {}
    queued = GatewayMiddleware(MockUpstream(), settings=Settings.from_mapping(PLANS),
                               metrics=Metrics.create(type(metrics.registry)()))
    assert queued.queue.waits == {"queued": 2.0, "tokens": 5.0}


async def test_a_request_waits_for_a_slot(store: Store, metrics: Metrics) -> None:
    """max_concurrent = 1: the second request polls for the slot the first one's stream
    holds, and is admitted once it is freed."""
    settings = Settings.from_mapping({"plans": {"slots": {
        "rpm": 100_000, "tpm": 10_000_000, "max_concurrent": 1, "max_queue_wait": "2s"}}})
    upstream = MockUpstream(max_words=8, chunk_delay=0.05)  # a stream of ~0.4 s
    secret, _, _ = await new_key(store, settings, plan="slots")
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        t0 = time.monotonic()
        got = await asyncio.gather(
            timed(client, secret, t0, body={**chat(8), "stream": True}),
            timed(client, secret, t0, 0.1))
    assert [status for status, _, _ in got] == [200, 200], got
    assert got[1][1] > 0.3, got  # it waited for the stream to end
    assert samples(metrics, "admitted") == 1 and queued_now(metrics) == 0


async def test_a_store_failure_while_queued_keeps_the_refusal_and_undoes_the_debit(
        store: Store, settings: Settings, metrics: Metrics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission asked again applies but its reply is lost: the client gets the 429 it had
    (not a 503 for a request Redis had already judged), and the debit is released."""
    from gateway.errors import StoreAmbiguous

    secret, key_id, _ = await new_key(store, settings, plan="queued")
    gw = gateway(MockUpstream(), store, settings, metrics)
    async with client_for(gw) as client:
        await drain(client, secret, 60)
        spent = (await store.get_key(key_id)).spent
        real = store.admit
        calls = 0

        async def admit(*args: Any) -> Decision:
            nonlocal calls
            calls += 1
            decision = await real(*args)
            if calls == 2:  # the second is the one asked again after the wait
                assert decision.code == 0
                raise StoreAmbiguous("the reply was lost")
            return decision

        monkeypatch.setattr(store, "admit", admit)
        status, at, code = await timed(client, secret, time.monotonic())
    assert (status, code) == (429, "rate_limit_exceeded 1") and at > AT_ONCE
    assert samples(metrics, "refused") == 1
    assert metrics.registry.get_sample_value("gateway_store_errors_total", {"op": "admit"}) == 1
    await gw.drain()
    assert (await store.get_key(key_id)).spent == spent
