"""A bounded soak: mixed traffic through two gateway replicas while Redis restarts once.

Two GatewayMiddleware instances, each with its own Redis client and metrics, are served by
uvicorn on loopback in front of the mock upstream. Clients drive chats, streams, completions,
embeddings, unknown keys, rate-limit rejections and mid-stream disconnects over many keys and
accounts; the append-only redis-server is stopped and started again in the middle. Then the
invariants of DESIGN.md are checked against what the clients saw.

The replicas keep the spend ledger (issue 14): an exporter runs beside them all along, across
the restart, into a PostgreSQL of the test's own; at the end every settled request is one
row, per key, and reconcile finds no difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry

from gateway.config.ledger import LedgerSettings
from gateway.config.settings import Price, Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.ledger import db
from gateway.ledger.exporter import Exporter
from gateway.ledger.reconcile import reconcile
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store, connect
from gateway.store.ledger import LedgerStreams
from tests.conftest import RedisServer, bearer, new_key, serving
from tests.redis_inspect import redis_of

SECONDS = 6.0
RESTART_AT = 2.0
CLIENTS = 16
SETTINGS = Settings(model_prices={"big": Price(3_000_000, 9_000_000)},
                    redis_timeout_seconds=0.5)


@dataclass
class Key:
    secret: str
    id: str
    account: str
    rpm: int
    budget: int | None = None
    credit: bool = False
    disconnects: bool = False
    admitted: int = 0
    billed: int = 0  # Σ reported usage x price of the requests that succeeded
    max_cost: int = 0


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _body(kind: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    model = rng.choice(["m", "big"])
    text = "w" * rng.randrange(4, 200)
    if kind == "embeddings":
        return "/v1/embeddings", {"model": model, "input": [text, text[:10]]}
    if kind == "completion":
        return "/v1/completions", {"model": model, "prompt": text, "max_tokens": 6}
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}],
                            "max_tokens": rng.randrange(1, 20)}
    if kind in ("stream", "disconnect"):
        body.update(stream=True, stream_options={"include_usage": True})
    return "/v1/chat/completions", body


def _stream_usage(text: str) -> dict[str, int]:
    for line in text.splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            usage = orjson.loads(line[6:]).get("usage")
            if usage:
                return dict(usage)
    raise AssertionError("a completed stream carried no usage")


async def _one(client: httpx.AsyncClient, key: Key, rng: random.Random, tally: Tally) -> None:
    kind = "disconnect" if key.disconnects else rng.choice(
        ["chat", "chat", "stream", "completion", "embeddings", "unknown"])
    path, body = _body(kind, rng)
    tally.kinds[kind] += 1
    secret = "sk_live_" + "z" * 40 if kind == "unknown" else key.secret
    if kind == "disconnect":
        async with client.stream("POST", path, json=body, headers=bearer(secret)) as response:
            tally.statuses[response.status_code] += 1
            if response.status_code == 200:
                key.admitted += 1
                async for _ in response.aiter_raw():
                    break  # leave mid-stream
        return
    response = await client.post(path, json=body, headers=bearer(secret))
    tally.statuses[response.status_code] += 1
    if kind == "unknown":
        assert response.status_code in (401, 503)
        return
    assert response.status_code in (200, 429, 503), response.text
    if response.status_code != 200:
        return
    key.admitted += 1
    usage = _stream_usage(response.text) if kind == "stream" else response.json()["usage"]
    price = SETTINGS.price_for(body["model"])
    cost = price.cost_micro(usage["prompt_tokens"], usage.get("completion_tokens", 0))
    key.billed += cost
    key.max_cost = max(key.max_cost, cost)


async def _make_keys(store: Store) -> list[Key]:
    keys: list[Key] = []
    for a in range(6):
        account = (await store.create_account(f"soak-{a}")).id
        await store.add_credits(account, 3_000)
        specs: list[dict[str, Any]] = [
            {"rpm": 600, "tpm": 1_000_000},
            {"rpm": 30, "tpm": 1_000_000},  # rate-limit rejections
            {"rpm": 600, "tpm": 1_000_000, "budget_usd": "0.002"},  # budget rejections
            {"rpm": 600, "tpm": 1_000_000, "credit": True},  # credit rejections
        ]
        for spec in specs:
            secret, key_id, _ = await new_key(store, SETTINGS, account=account, **spec)
            budget = None if "budget_usd" not in spec else 2_000
            keys.append(Key(secret, key_id, account, spec["rpm"], budget,
                            spec.get("credit", False)))
    for _ in range(3):
        secret, key_id, account = await new_key(store, SETTINGS, rpm=600, tpm=1_000_000)
        keys.append(Key(secret, key_id, account, 600, disconnects=True))
    return keys


async def test_soak_with_a_redis_restart(tmp_path: Path, postgres_url: str) -> None:
    async with db.connection(postgres_url) as conn:
        await db.migrate(conn)
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    admin = connect(server.url, 5.0)
    registries = [CollectorRegistry(), CollectorRegistry()]
    upstream = MockUpstream(chunk_delay=0.005)
    settings = dataclasses.replace(SETTINGS, ledger=LedgerSettings(postgres_url))
    gateways = [GatewayMiddleware(upstream, settings=settings, store=connect(server.url, 0.5),
                                  metrics=Metrics.create(r)) for r in registries]
    exporter_store = connect(server.url, 0.5)
    exporter = Exporter(LedgerStreams(exporter_store), postgres_url)
    stop_exporting = asyncio.Event()
    exporting = asyncio.ensure_future(exporter.run(stop_exporting, interval=0.05,
                                                   lag_interval=0.5, max_backoff=0.2))
    try:
        keys = await _make_keys(admin)
        tally = Tally()
        async with contextlib.AsyncExitStack() as stack:
            urls = [await stack.enter_async_context(serving(g)) for g in gateways]
            clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=30))
                       for u in urls]
            started = time.monotonic()
            restarted = False

            async def driver(n: int) -> None:
                rng = random.Random(n)
                while time.monotonic() - started < SECONDS:
                    await _one(clients[n % 2], rng.choice(keys), rng, tally)

            async def restart() -> None:
                nonlocal restarted
                await asyncio.sleep(RESTART_AT)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, server.stop)
                await asyncio.sleep(0.2)
                await loop.run_in_executor(None, server.start)
                restarted = True

            await asyncio.gather(restart(), *(driver(n) for n in range(CLIENTS)))
            elapsed = time.monotonic() - started
            assert restarted
            for gateway in gateways:
                await gateway.drain()
        stop_exporting.set()
        await exporting
        # It exported all along (the restart in the middle paused it, no more).
        assert exporter.totals.exported > 100, exporter.totals
        await _check(admin, keys, tally, registries, elapsed)
        await _check_ledger(admin, exporter, postgres_url, keys, registries)
    finally:
        stop_exporting.set()
        await exporting
        await exporter.close()
        await exporter_store.close()
        for gateway in gateways:
            await gateway.store.close()
        await admin.close()
        server.stop()


def _metric(registries: list[CollectorRegistry], name: str, **labels: str) -> float:
    return sum(r.get_sample_value(name, labels) or 0.0 for r in registries)


async def _check(store: Store, keys: list[Key], tally: Tally,
                 registries: list[CollectorRegistry], elapsed: float) -> None:
    # The traffic really was mixed, and the outage was seen.
    assert tally.statuses[200] > 200, tally.statuses
    assert tally.statuses[429] > 0 and tally.statuses[401] > 0, tally.statuses
    assert tally.statuses[503] > 0, tally.statuses  # requests during the restart
    assert min(tally.kinds.values()) > 0 and len(tally.kinds) == 6, tally.kinds

    fell_back = _metric(registries, "gateway_settlements_total", outcome="failed")
    assert fell_back == 0  # every failed settlement was retried into Redis
    # Settled exactly once: no reservation is left over.
    leftovers = [k async for k in redis_of(store).scan_iter(match="*:res:*", count=1000)]
    assert leftovers == []
    credits: dict[str, int] = defaultdict(int)
    for key in keys:
        record = await store.get_key(key.id)
        # RPM: never more than the bucket plus what refilled during the run.
        assert key.admitted <= key.rpm + int(elapsed * key.rpm / 60) + 1
        if key.disconnects:
            assert record.spent == record.total_spent > 0
            continue
        assert record.spent == record.total_spent == key.billed, key
        if key.budget is not None:
            assert record.spent <= key.budget + key.max_cost
        if key.credit:
            credits[key.account] += key.billed
    for account_id, spent in credits.items():
        balance = (await store.get_account(account_id)).credits
        assert balance == 3_000 - spent
        assert balance > -max(k.max_cost for k in keys)


async def _check_ledger(store: Store, exporter: Exporter, url: str, keys: list[Key],
                        registries: list[CollectorRegistry]) -> None:
    """Each settled request is one row: every request answered 200 was admitted and settled
    (with its actual usage, or for a client gone mid-stream with what it was sent), and none
    fell back to the admission-time estimate (that one would have no entry: _check asserts
    there were none). Releases of admissions whose answer was lost append nothing."""
    deadline = time.monotonic() + 30
    while True:
        await exporter.export_pending()
        if await exporter.observe_lag() == 0:
            break
        assert time.monotonic() < deadline, "the ledger's lag never reached 0"
    fell_back = _metric(registries, "gateway_settlements_total", outcome="failed")
    settled = sum(k.admitted for k in keys) - int(fell_back)
    async with db.connection(url) as conn:
        cur = await conn.execute("SELECT key_id, count(*), count(DISTINCT request_id) "
                                 "FROM ledger_entries GROUP BY key_id")
        per_key = {str(k): (int(n), int(d)) for k, n, d in await cur.fetchall()}  # type: ignore[call-overload]
        reports = await reconcile(LedgerStreams(store), conn)
    assert sum(n for n, _ in per_key.values()) == settled
    assert {k: n for k, (n, d) in per_key.items() if n != d} == {}
    assert {k.id: per_key.get(k.id, (0, 0))[0] for k in keys} == {
        k.id: k.admitted for k in keys}
    # Nothing appended twice to Redis either (a replayed settlement would append a second
    # entry with the same request id, which PostgreSQL would then keep once).
    appended = 0
    for account_id in {k.account for k in keys}:
        info = await redis_of(store).xinfo_stream(Names.ledger(account_id))
        appended += int(info["entries-added"])
    assert appended == settled
    assert [d for r in reports for d in r.differences] == []
    assert len(reports) == len({k.account for k in keys})
