"""In-flight limits with real processes (issue 16, item 2): two `gateway serve` replicas
sharing one Redis (and the 3-master cluster), a plan with max_concurrent = 8, and an
upstream of its own process that counts the completions it is serving at once
(tests/counting_upstream.py). Proven: 200 concurrent streams never put more than 8 in flight
at the upstream; after 1 000 cancelled streams, a SIGKILLed replica and Redis blips (a stall
and a restart) the slots held return to 0 and the limit still holds."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config.settings import Settings
from gateway.store import Names, Store, connect
from tests.conftest import RedisServer, bearer, new_key
from tests.processes import Process, gateway_serve

LIMIT = 8
PLAN = {"rpm": 100_000, "tpm": 100_000_000, "max_concurrent": LIMIT}
SETTINGS = Settings.from_mapping({"plans": {"gpu": PLAN}})
CHUNK_DELAY = 0.1  # the upstream's pause between words: a stream of n tokens lasts n/10 s
# A 200-connection burst on a busy 2-core runner can take longer than the 0.25 s default.
ENV = {"GATEWAY_REDIS_TIMEOUT": "2"}
ROOT = Path(__file__).resolve().parent.parent.parent  # where `tests` imports from


def write_config(path: Path, lease: float) -> Path:
    plan = "\n".join(f"{name} = {value}" for name, value in PLAN.items())
    path.write_text(f"concurrency_lease = {lease}\n\n[plans.gpu]\n{plan}\n")
    return path


@dataclasses.dataclass
class Outcome:
    status: int
    code: str = ""
    retry_after: str | None = None
    complete: bool = False  # a 200 whose stream ended with data: [DONE]


class Upstream:
    """The counting upstream's process and its counters."""

    def __init__(self) -> None:
        self.process = Process(["-m", "tests.counting_upstream", "--chunk-delay",
                                str(CHUNK_DELAY)], env={"PYTHONPATH": str(ROOT)})
        self.process.wait_ready("/v1/models")
        self.url = self.process.url

    async def counts(self, session: aiohttp.ClientSession) -> dict[str, int]:
        async with session.get(self.url + "/counts") as response:
            return dict(await response.json())

    async def reset(self, session: aiohttp.ClientSession) -> None:
        async with session.post(self.url + "/reset") as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    counting = Upstream()
    yield counting
    counting.process.terminate()


@pytest.fixture(scope="module")
def steady_pairs(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Callable[[str], list[Process]]]:
    """Two replicas per store URL, with a 30 s lease: a slot that settlement did not free
    would stay taken for the whole test, not lapse while we look."""
    config = write_config(tmp_path_factory.mktemp("steady") / "gateway.toml", 30)
    started: dict[str, list[Process]] = {}

    def pair(url: str) -> list[Process]:
        if url not in started:
            started[url] = gateway_serve(upstream.url, url, "--config", str(config),
                                         replicas=2, env=ENV)
        return started[url]

    yield pair
    for replicas in started.values():
        for replica in replicas:
            replica.terminate()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        yield client


def chat(tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": True}


async def refusal(response: aiohttp.ClientResponse) -> Outcome:
    body = await response.read()
    code = ""
    try:
        code = str((await response.json(content_type=None))["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = body[:200].decode(errors="replace")
    return Outcome(response.status, code, response.headers.get("Retry-After"))


async def stream(session: aiohttp.ClientSession, url: str, secret: str,
                 tokens: int) -> Outcome:
    """One streamed completion of `tokens` words, read to its end."""
    async with session.post(url + "/v1/chat/completions", json=chat(tokens),
                            headers=bearer(secret)) as response:
        if response.status != 200:
            return await refusal(response)
        text = await response.read()
    return Outcome(200, complete=text.rstrip().endswith(b"data: [DONE]"))


async def stream_then_leave(session: aiohttp.ClientSession, url: str, secret: str,
                            tokens: int) -> Outcome:
    """Reads the first event of an admitted stream, then drops the connection (a client
    pressing Ctrl-C); a refusal is read whole."""
    async with session.post(url + "/v1/chat/completions", json=chat(tokens),
                            headers=bearer(secret)) as response:
        if response.status != 200:
            return await refusal(response)
        received = b""
        while b"\n\n" not in received:
            chunk = await response.content.readany()
            assert chunk, "the stream ended before its first event"
            received += chunk
        response.close()
    return Outcome(200)


def is_concurrency_refusal(outcome: Outcome) -> bool:
    return (outcome.status, outcome.code, outcome.retry_after) == (
        429, "concurrency_limit_exceeded", "1")


async def slots(store: Store, account_id: str, key_id: str) -> tuple[int, int]:
    """(members of the key's slots set, those whose lease has not ended by Redis's clock).
    An ended lease stays a member until the next admission on the key prunes it."""
    name = Names.key_slots(account_id, key_id)
    seconds, micros = await store.client.call_any("TIME")
    now = int(seconds) * 1_000_000 + int(micros)
    total = int(await store.client.call("ZCARD", name))
    live = int(await store.client.call("ZCOUNT", name, f"({now}", "+inf"))
    return total, live


async def account_slots(store: Store, account_id: str) -> int:
    return int(await store.client.call("ZCARD", Names.account_slots(account_id)))


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Polls `check` until it holds; returns how long that took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n  [concurrency] {line}")


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if store_kind == "redis"
                                       else "cluster_url"))


async def test_200_concurrent_streams_over_two_replicas_never_exceed_8_in_flight(
        store: Store, store_kind: str, request: pytest.FixtureRequest, upstream: Upstream,
        steady_pairs: Callable[[str], list[Process]], session: aiohttp.ClientSession,
        capsys: pytest.CaptureFixture[str]) -> None:
    replicas = steady_pairs(store_url(store_kind, request))
    secret, key_id, account_id = await new_key(store, SETTINGS, plan="gpu")
    await upstream.reset(session)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0

    async def client(i: int) -> list[tuple[int, Outcome]]:
        """All 200 at once; a refused client retries (jittered) until served or time's up."""
        replica = i % 2
        outcomes = []
        while True:
            outcome = await stream(session, replicas[replica].url, secret, tokens=5)
            outcomes.append((replica, outcome))
            if outcome.status == 200 or loop.time() > deadline:
                return outcomes
            await asyncio.sleep(random.uniform(0.2, 0.6))

    results = [o for os_ in await asyncio.gather(*(client(i) for i in range(200)))
               for o in os_]
    counts = await upstream.counts(session)
    admitted = [(replica, o) for replica, o in results if o.status == 200]
    refused = [o for _, o in results if o.status != 200]
    report(capsys, f"{store_kind}: 200 clients, {len(results)} attempts, {len(admitted)} "
                   f"streams served, {len(refused)} refused, upstream peak {counts['peak']}")
    assert counts["peak"] == LIMIT  # never more than 8 at once, and 8 reached
    assert counts["served"] == len(admitted)
    assert all(o.complete for _, o in admitted)
    assert {replica for replica, _ in admitted} == {0, 1}  # both replicas admitted streams
    bad = [o for o in refused if not is_concurrency_refusal(o)]
    assert not bad, bad[:5]
    assert len(refused) >= 200 - LIMIT
    # Settlement frees the slot before the client sees [DONE]: nothing is left taken.
    assert await slots(store, account_id, key_id) == (0, 0)
    assert await account_slots(store, account_id) == 0
    assert counts["now"] == 0


async def test_1000_cancelled_streams_leave_no_slot_taken(
        store: Store, store_kind: str, request: pytest.FixtureRequest, upstream: Upstream,
        steady_pairs: Callable[[str], list[Process]], session: aiohttp.ClientSession,
        capsys: pytest.CaptureFixture[str]) -> None:
    replicas = steady_pairs(store_url(store_kind, request))
    secret, key_id, account_id = await new_key(store, SETTINGS, plan="gpu")
    await upstream.reset(session)
    cancelled, refusals = 0, []
    started = time.monotonic()

    async def worker(i: int) -> None:
        nonlocal cancelled
        while cancelled < 1000:
            # 5 s streams: every client leaves long before the end.
            outcome = await stream_then_leave(session, replicas[i % 2].url, secret, 50)
            if outcome.status == 200:
                cancelled += 1
            else:
                refusals.append(outcome)
                await asyncio.sleep(0.02)

    # 12 clients for 8 slots: refusals interleave with the cancellations.
    await asyncio.gather(*(worker(i) for i in range(12)))
    churn = time.monotonic() - started

    async def freed() -> bool:
        return (await slots(store, account_id, key_id))[0] == 0

    # The lease is 30 s: only settlement on the disconnect can empty the set this soon.
    seconds = await until(freed, 10.0, "the cancelled streams' slots freed")
    counts = await upstream.counts(session)
    report(capsys, f"{store_kind}: {cancelled} streams cancelled in {churn:.1f} s "
                   f"({len(refusals)} refused meanwhile), slots back to 0 after "
                   f"{seconds:.2f} s; upstream peak {counts['peak']}, left early "
                   f"{counts['gone']}")
    assert cancelled >= 1000
    assert counts["served"] >= 1000
    bad = [o for o in refusals if not is_concurrency_refusal(o)]
    assert not bad, bad[:5]
    assert await account_slots(store, account_id) == 0

    async def upstream_idle() -> bool:
        return (await upstream.counts(session))["now"] == 0

    await until(upstream_idle, 10.0, "the upstream's cancelled streams ended")
    # No slot was given back before the upstream saw its client leave. (The referee counts a
    # cancelled stream until its handler sees the disconnect, a loop turn after the close.)
    assert counts["peak"] <= LIMIT
    # The limit still holds, with every slot back.
    await upstream.reset(session)
    outcomes = await asyncio.gather(*(stream(session, replicas[i % 2].url, secret, 10)
                                      for i in range(16)))
    assert sum(o.status == 200 for o in outcomes) == LIMIT
    assert all(is_concurrency_refusal(o) for o in outcomes if o.status != 200)
    assert (await upstream.counts(session))["peak"] == LIMIT
    assert await slots(store, account_id, key_id) == (0, 0)


async def test_a_sigkilled_replica_frees_its_slots_within_a_lease(
        store: Store, store_kind: str, request: pytest.FixtureRequest, upstream: Upstream,
        session: aiohttp.ClientSession, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    lease = 2.0
    config = write_config(tmp_path / "gateway.toml", lease)
    victim, survivor = gateway_serve(upstream.url, store_url(store_kind, request),
                                     "--config", str(config), replicas=2, env=ENV)
    try:
        secret, key_id, account_id = await new_key(store, SETTINGS, plan="gpu")
        await upstream.reset(session)
        # 8 streams of 20 s through the victim: all 8 slots, held by one process.
        held = [asyncio.ensure_future(stream(session, victim.url, secret, 200))
                for _ in range(LIMIT)]

        async def all_in_flight() -> bool:
            return (await upstream.counts(session))["now"] == LIMIT

        await until(all_in_flight, 10.0, "8 streams in flight through the victim")
        assert await slots(store, account_id, key_id) == (LIMIT, LIMIT)
        # Longer than a lease: the victim renews its slots, so the survivor still refuses.
        await asyncio.sleep(lease * 1.5)
        assert is_concurrency_refusal(await stream(session, survivor.url, secret, 5))
        assert await slots(store, account_id, key_id) == (LIMIT, LIMIT)

        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        killed = time.monotonic()
        # The dead process's slots hold until their leases end (the last renewal was at
        # most a third of a lease ago), so at once the survivor still refuses.
        assert is_concurrency_refusal(await stream(session, survivor.url, secret, 5))
        # Their client connections died with the victim.
        cut = await asyncio.gather(*held, return_exceptions=True)
        assert all(isinstance(o, aiohttp.ClientError) for o in cut), cut

        async def lapsed() -> bool:
            return (await slots(store, account_id, key_id))[1] == 0

        await until(lapsed, lease + 3.0, "the dead replica's slots lapse")
        lapsed_after = time.monotonic() - killed
        assert (await upstream.counts(session))["now"] == 0  # the victim's streams are gone
        # The survivor admits up to 8 again (the dead members are pruned), not one more.
        await upstream.reset(session)
        outcomes = await asyncio.gather(*(stream(session, survivor.url, secret, 20)
                                          for _ in range(LIMIT + 4)))
        counts = await upstream.counts(session)
        report(capsys, f"{store_kind} SIGKILL: slots lapsed {lapsed_after:.2f} s after the kill "
                       f"(lease {lease} s); then the survivor admitted "
                       f"{sum(o.status == 200 for o in outcomes)} of {LIMIT + 4}, "
                       f"upstream peak {counts['peak']}")
        assert sum(o.status == 200 and o.complete for o in outcomes) == LIMIT
        assert all(is_concurrency_refusal(o) for o in outcomes if o.status != 200)
        assert counts["peak"] == LIMIT
        assert await slots(store, account_id, key_id) == (0, 0)
    finally:
        for replica in (victim, survivor):
            replica.terminate()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, append-only so a restart keeps the data."""
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


async def test_redis_blips_while_streams_run_leave_no_slot_and_the_limit_holds(
        private_redis: RedisServer, upstream: Upstream, session: aiohttp.ClientSession,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 0.8 s stall (SIGSTOP: commands wait, their replies come too late) and then a
    restart, both shorter than the 5 s lease, while 6 streams run. Attempts during the stall
    are run late, when Redis wakes (the admissions take the 2 free slots), their replies
    lost: the gateway answers 503 and releases them. 2 of the streams end while Redis is
    down: their settlement waits in the retry queue and frees their slots once it is back."""
    lease = 5.0
    config = write_config(tmp_path / "gateway.toml", lease)
    store = connect(private_redis.url, timeout_seconds=5.0)
    replicas = gateway_serve(upstream.url, private_redis.url, "--config", str(config),
                             replicas=2, env={"GATEWAY_REDIS_TIMEOUT": "0.5"})
    assert private_redis.process is not None
    try:
        secret, key_id, account_id = await new_key(store, SETTINGS, plan="gpu")
        await upstream.reset(session)

        def through(i: int, tokens: int) -> asyncio.Future[Outcome]:
            return asyncio.ensure_future(stream(session, replicas[i % 2].url, secret, tokens))

        # 2 streams of 2.5 s, 4 of 8 s: 6 of the 8 slots.
        running = [through(i, 25 if i < 2 else 80) for i in range(6)]

        async def six_in_flight() -> bool:
            return (await upstream.counts(session))["now"] == 6

        await until(six_in_flight, 10.0, "6 streams in flight")
        began = time.monotonic()
        during: list[Outcome] = []

        os.kill(private_redis.process.pid, signal.SIGSTOP)
        try:
            stalled = [through(i, 10) for i in range(6)]
            await asyncio.sleep(0.8)
        finally:
            os.kill(private_redis.process.pid, signal.SIGCONT)
        during += await asyncio.gather(*stalled)

        async def six_held() -> bool:  # the late admissions' slots released
            return await slots(store, account_id, key_id) == (6, 6)

        await until(six_held, 5.0, "the slots of the admissions whose replies were lost")
        private_redis.stop()
        down = [through(i, 10) for i in range(4)]
        # Redis stays down until the 2 short streams have ended (settlements queued).
        finished, _ = await asyncio.wait(running[:2], timeout=10)
        assert len(finished) == 2
        await asyncio.sleep(0.2)
        private_redis.start()
        during += await asyncio.gather(*down)
        blips = time.monotonic() - began

        async def short_ones_freed() -> bool:  # by the retry queue, the 4 long ones still on
            return (await slots(store, account_id, key_id))[0] <= 4

        retried = await until(short_ones_freed, 5.0, "the queued settlements' slots freed")

        outcomes = await asyncio.gather(*running)
        assert all(o.status == 200 and o.complete for o in outcomes), outcomes
        # No 500: an attempt in a blip is refused as the store being away, or by the limit
        # (or admitted, when its admission's reply came in time).
        statuses = sorted({(o.status, o.code) for o in during})
        assert {o.status for o in during} <= {200, 429, 503}, statuses
        assert all(o.code == "limiter_unavailable" for o in during if o.status == 503)
        assert all(is_concurrency_refusal(o) for o in during if o.status == 429)

        async def freed() -> bool:
            return (await slots(store, account_id, key_id))[0] == 0

        # Without an admission to prune lapsed members: only settlements empty the set.
        seconds = await until(freed, 15.0, "the slots freed after the blips")
        blip_peak = (await upstream.counts(session))["peak"]

        await upstream.reset(session)
        after = list(await asyncio.gather(*(stream(session, replicas[i % 2].url, secret, 15)
                                            for i in range(16))))
        counts = await upstream.counts(session)
        report(capsys, f"blips: stall + restart over {blips:.1f} s, attempts meanwhile "
                       f"{statuses}; the queued settlements freed their slots {retried:.2f} s "
                       f"after the restart; "
                       f"slots back to 0 {seconds:.2f} s after; upstream peak "
                       f"{blip_peak} during, {counts['peak']} after "
                       f"({sum(o.status == 200 for o in after)} of 16 admitted)")
        assert blip_peak <= LIMIT
        assert sum(o.status == 200 and o.complete for o in after) == LIMIT
        assert all(is_concurrency_refusal(o) for o in after if o.status != 200)
        assert counts["peak"] == LIMIT
        assert await slots(store, account_id, key_id) == (0, 0)
    finally:
        for replica in replicas:
            replica.terminate()
        await store.close()
