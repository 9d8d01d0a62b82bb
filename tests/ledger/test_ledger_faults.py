"""The ledger's faults of issue 14 with every part a real process: `gateway serve` (its ledger
on through GATEWAY_POSTGRES_URL) in front of the mock upstream, a long-running `gateway ledger
export`, redis-server and PostgreSQL of our own, traffic from httpx. After each fault: one row
per request answered 200 (each is one settled request), `gateway ledger reconcile` exits 0,
and the exporter's gauge says nothing is left.

Faults: the exporter SIGKILLed again and again under traffic; PostgreSQL stopped for a few
seconds (issue 14 says a minute; the exporter's behaviour is the same after its first
backoffs, and a minute would cost the suite a minute); Redis (AOF) restarted; the gateway's
settlement retry queue replaying settlements that Redis missed (stopped) or answered too late
(SIGSTOP), which must append nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.settings import Settings
from gateway.ledger import db
from gateway.store import Names, Store, connect
from tests.conftest import RedisServer, bearer, free_port, new_key
from tests.processes import Process, gateway_serve, mock_upstream
from tests.redis_inspect import redis_of

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
WORKERS = 6


# ---------------------------------------------------------------------------- processes


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra or {})
    return env


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {sample name: value} (label-less samples; labelled ones by
    name{k=v,...})."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


class ExporterProcess:
    """`gateway ledger export` as an operator runs it, its log kept in a file."""

    def __init__(self, redis_url: str, postgres_url: str, log: Path,
                 consumer: str = "exporter-a", *extra: str) -> None:
        self.redis_url, self.postgres_url, self.log_path = redis_url, postgres_url, log
        self.consumer = consumer
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_url = ""
        self.starts = 0

    def start(self, consumer: str | None = None, *extra: str) -> None:
        assert self.process is None
        port = free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        args = [sys.executable, "-m", "gateway", "ledger", "export", "--redis", self.redis_url,
                "--postgres", self.postgres_url, "--interval", "0.05", "--lag-interval", "0.1",
                "--metrics-port", str(port), "--consumer", consumer or self.consumer,
                *(extra or self.extra)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=_env(), stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the exporter exited at start:\n{self.log()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if "gateway_ledger_lag_entries" in httpx.get(self.metrics_url, timeout=1).text:
                    break
            assert time.monotonic() < deadline, "the exporter's metrics never answered"
            time.sleep(0.02)
        self.starts += 1

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no shutdown, whatever batch it held is abandoned
        self.process.wait(timeout=10)
        self.process = None

    def terminate(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        finally:
            self.process = None

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def reconcile_process(redis_url: str, postgres_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ledger", "reconcile", "--redis", redis_url,
         "--postgres", postgres_url], env=_env(), capture_output=True, text=True, timeout=60,
        check=False)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Process]:
    process = mock_upstream(chunk_delay=0.02)  # a stream: 8 chunks over ~0.16 s
    yield process
    process.terminate()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """An append-only redis-server of this test's own (some tests stop or stall it)."""
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
async def admin(redis: RedisServer) -> AsyncIterator[Store]:
    store = connect(redis.url, 5.0)
    yield store
    await store.close()


@pytest.fixture
async def ledger(postgres_url: str) -> str:
    async with db.connection(postgres_url) as conn:
        await db.migrate(conn)
    return postgres_url


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Processes a test starts, stopped after it whatever happened."""
    made: list[Any] = []
    yield made
    for process in reversed(made):
        with contextlib.suppress(Exception):
            process.terminate()


def serve(upstream: Process, redis: RedisServer, postgres_url: str, started: list[Any],
          redis_timeout: str = "2") -> tuple[Process, str]:
    """`gateway serve` with the ledger on; returns it and its metrics URL."""
    port = free_port()
    [process] = gateway_serve(upstream.url, redis.url, "--metrics-port", str(port),
                              env={"GATEWAY_POSTGRES_URL": postgres_url,
                                   "GATEWAY_REDIS_TIMEOUT": redis_timeout})
    started.append(process)
    return process, f"http://127.0.0.1:{port}/metrics"


# ---------------------------------------------------------------------------- traffic


class Traffic:
    """WORKERS clients posting chats and streams to the gateway until stopped; counts the
    statuses they saw."""

    def __init__(self, url: str, secrets: list[str]) -> None:
        self.url, self.secrets = url, secrets
        self.statuses: Counter[int] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.ensure_future(self._worker(n)) for n in range(WORKERS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, n: int) -> None:
        rng = random.Random(n)
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                body = STREAM if rng.random() < 0.5 else CHAT
                response = await client.post("/v1/chat/completions", json=body,
                                             headers=bearer(rng.choice(self.secrets)))
                self.statuses[response.status_code] += 1
                if response.status_code == 200 and body is STREAM:
                    assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
                elif response.status_code != 200:
                    assert response.status_code == 503, response.text  # Redis away
                    await asyncio.sleep(0.02)

    async def until(self, answered: int, seconds: float = 20) -> None:
        """Until `answered` more requests got a 200."""
        target = self.statuses[200] + answered
        await until(lambda: self.statuses[200] >= target, seconds)


async def until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def keys(admin: Store) -> list[str]:
    """Four keys over two accounts, with limits no traffic here reaches."""
    made = []
    for account in ("acme", "globex"):
        account_id = (await admin.create_account(account)).id
        for _ in range(2):
            secret, _, _ = await new_key(admin, Settings(), account=account_id,
                                         rpm=1_000_000, tpm=100_000_000)
            made.append(secret)
    return made


async def rows(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT count(*), count(DISTINCT request_id) FROM "
                                 "ledger_entries")
        total, distinct = await cur.fetchone()  # type: ignore[misc]
    assert total == distinct
    return int(total)


async def entries_appended(admin: Store) -> int:
    """Σ over the account streams of the entries ever appended (XINFO's entries-added):
    a settlement replayed into a second entry would show here, though PostgreSQL keeps one."""
    total = 0
    for account in await admin.list_accounts():
        info = await redis_of(admin).xinfo_stream(Names.ledger(account.id))
        total += int(info["entries-added"])
    return total


async def settled_everything(admin: Store, gateway_metrics: str) -> None:
    """The gateway's retry queue is empty and no reservation waits for its settlement."""
    await until(lambda: scrape(gateway_metrics).get("gateway_settlements_pending", 0) == 0)

    async def leftovers() -> list[Any]:
        return [k async for k in redis_of(admin).scan_iter(match="*:res:*", count=1000)]

    deadline = time.monotonic() + 20
    while await leftovers():
        assert time.monotonic() < deadline, await leftovers()
        await asyncio.sleep(0.05)


async def exported_all(exporter: ExporterProcess, url: str, expected: int) -> None:
    """Every settled request is a row; the running exporter's gauge shows no lag."""
    deadline = time.monotonic() + 30
    while (count := await rows(url)) < expected:
        assert time.monotonic() < deadline, f"{count} rows of {expected}:\n{exporter.log()}"
        await asyncio.sleep(0.05)
    assert count == expected
    await until(lambda: exporter.metrics()["gateway_ledger_lag_entries"] == 0)
    metrics = exporter.metrics()
    assert metrics["gateway_ledger_oldest_unexported_seconds"] == 0
    assert metrics["gateway_ledger_dropped_entries_total"] == 0


async def reconciles(redis: RedisServer, url: str) -> None:
    result = await asyncio.to_thread(reconcile_process, redis.url, url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith(": the ledger matches Redis"), result.stdout


# ---------------------------------------------------------------------------- the faults


class TableLock:
    """LOCK TABLE ledger_entries IN SHARE MODE in a transaction of our own: the exporter's
    next INSERT waits for it, holding the batch it read (delivered, not committed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> TableLock:
        self.conn = await psycopg.AsyncConnection.connect(self.url)
        await self.conn.execute("LOCK TABLE ledger_entries IN SHARE MODE")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        await self.conn.rollback()
        await self.conn.close()

    async def exporter_waits(self) -> None:
        # From a connection of its own: inside a transaction pg_stat_activity is a snapshot.
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%INSERT INTO ledger_entries%%' AND pid <> %s",
                    (self.conn.info.backend_pid if self.conn else 0,))
                row = await cur.fetchone()
                if row and row[0]:
                    return
                assert time.monotonic() < deadline, "the exporter never tried to insert"
                await asyncio.sleep(0.02)


async def held_by(admin: Store, consumer: str) -> dict[str, list[str]]:
    """account id -> the stream ids delivered to `consumer` and not acknowledged."""
    held = {}
    for account in await admin.list_accounts():
        pending = await redis_of(admin).xpending_range(
            Names.ledger(account.id), Names.LEDGER_GROUP, "-", "+", 100_000, consumer)
        if pending:
            held[account.id] = [p["message_id"].decode() for p in pending]
    return held


async def still_in_redis(admin: Store, held: dict[str, list[str]]) -> int:
    """How many of `held` are still in their streams (an acknowledged entry is deleted)."""
    left = 0
    for account_id, ids in held.items():
        for stream_id in ids:
            left += len(await redis_of(admin).xrange(Names.ledger(account_id), stream_id,
                                                     stream_id))
    return left


async def test_exporter_sigkilled_under_traffic_loses_and_doubles_nothing(
        upstream: Process, redis: RedisServer, admin: Store, ledger: str, tmp_path: Path,
        started: list[Any]) -> None:
    """SIGKILLed at random moments, then at the two that matter, made to happen: holding a
    batch it read and had not committed (the restart must read it again: it is pending for
    its consumer name, which nobody else reads), and between commit and acknowledgement (the
    restart delivers the batch again: stored once)."""
    secrets = await keys(admin)
    gateway, gateway_metrics = serve(upstream, redis, ledger, started)
    exporter = ExporterProcess(redis.url, ledger, tmp_path / "exporter.log")
    started.append(exporter)
    exporter.start()
    rng = random.Random(14)
    async with Traffic(gateway.url, secrets) as traffic:
        for _ in range(3):  # anywhere: in a batch, or between two
            await traffic.until(20)
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            exporter.kill()
            await traffic.until(10)  # entries pile up while it is dead
            await asyncio.to_thread(exporter.start)

        # Killed with a batch read and not committed.
        await traffic.until(10)
        async with TableLock(ledger) as lock:
            await lock.exporter_waits()
            exporter.kill()
        held = await held_by(admin, "exporter-a")
        assert sum(map(len, held.values())) > 0
        await asyncio.to_thread(exporter.start)  # claims only after 60 s: it reads its own
        deadline = time.monotonic() + 10
        while await still_in_redis(admin, held):
            assert time.monotonic() < deadline, "the restarted exporter left its batch"
            await asyncio.sleep(0.05)

        # Killed after its commit, before its acknowledgement (Redis refuses writes until
        # the kill: CLIENT PAUSE WRITE; the gateway's requests just wait a moment).
        await traffic.until(10)
        async with TableLock(ledger) as lock:
            await lock.exporter_waits()
            stored = await rows(ledger)
            await redis_of(admin).execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        try:
            deadline = time.monotonic() + 5
            while await rows(ledger) == stored:
                assert time.monotonic() < deadline, "the exporter never committed"
                await asyncio.sleep(0.01)
            exporter.kill()
        finally:
            await redis_of(admin).execute_command("CLIENT", "UNPAUSE")
        committed = await rows(ledger) - stored
        await asyncio.to_thread(exporter.start)
        await until(lambda: exporter.metrics()["gateway_ledger_duplicates_total"] >= committed)

        # The last one comes back under another name: what the dead one held unacknowledged
        # is claimed once it has been idle --claim-after seconds.
        await traffic.until(10)
        exporter.kill()
        await traffic.until(10)
        await asyncio.to_thread(exporter.start, "exporter-b", "--claim-after", "0.5")
        await traffic.until(20)
    await settled_everything(admin, gateway_metrics)
    assert set(traffic.statuses) == {200}, traffic.statuses
    answered = traffic.statuses[200]
    assert answered >= 100
    await exported_all(exporter, ledger, answered)
    assert await held_by(admin, "exporter-a") == {}
    assert await entries_appended(admin) == answered
    await reconciles(redis, ledger)
    assert exporter.terminate() == 0
    assert exporter.starts == 7 and "ledger export stopped" in exporter.log()


async def test_postgres_stopped_under_traffic_then_back(
        upstream: Process, redis: RedisServer, admin: Store, ledger: str, tmp_path: Path,
        postgres_server: Any, started: list[Any]) -> None:
    secrets = await keys(admin)
    gateway, gateway_metrics = serve(upstream, redis, ledger, started)
    exporter = ExporterProcess(redis.url, ledger, tmp_path / "exporter.log")
    started.append(exporter)
    exporter.start()
    lag_seen: list[float] = []
    try:
        async with Traffic(gateway.url, secrets) as traffic:
            await traffic.until(30)
            await asyncio.to_thread(postgres_server.stop, "fast")
            before = traffic.statuses[200]
            outage_ends = time.monotonic() + 3.0  # a few seconds, not a minute (see above)
            while time.monotonic() < outage_ends:
                lag_seen.append(exporter.metrics()["gateway_ledger_lag_entries"])
                await asyncio.sleep(0.1)
            during = traffic.statuses[200] - before
            oldest = exporter.metrics()["gateway_ledger_oldest_unexported_seconds"]
            await asyncio.to_thread(postgres_server.ensure_running)
            await traffic.until(30)
    finally:
        postgres_server.ensure_running()
    assert set(traffic.statuses) == {200}, traffic.statuses  # the gateway never noticed
    await settled_everything(admin, gateway_metrics)
    await exported_all(exporter, ledger, traffic.statuses[200])
    await reconciles(redis, ledger)
    log = exporter.log()
    assert log.count("ledger export paused: PostgreSQL failed") == 1, log
    assert log.count("ledger export resumed after PostgreSQL failed") == 1, log
    assert exporter.metrics()["gateway_ledger_export_errors_total{stage=postgres}"] >= 1
    assert "Traceback" not in log
    # While PostgreSQL was away the gauges the alerts watch kept being measured: the lag grew
    # by (nearly) every request answered meanwhile, the oldest entry aged; then back to 0.
    assert during > 20
    assert lag_seen[-1] >= during // 2, (during, lag_seen)
    assert oldest >= 1.5, oldest


async def test_redis_restarted_under_traffic_with_the_exporter_running(
        upstream: Process, redis: RedisServer, admin: Store, ledger: str, tmp_path: Path,
        started: list[Any]) -> None:
    secrets = await keys(admin)
    gateway, gateway_metrics = serve(upstream, redis, ledger, started)
    exporter = ExporterProcess(redis.url, ledger, tmp_path / "exporter.log")
    started.append(exporter)
    exporter.start()
    async with Traffic(gateway.url, secrets) as traffic:
        await traffic.until(40)
        await asyncio.to_thread(redis.stop)  # SIGTERM: the AOF is flushed
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis.start)  # the same port and socket, from the AOF
        await traffic.until(40)
    assert traffic.statuses[503] > 0, traffic.statuses  # the outage was seen
    await settled_everything(admin, gateway_metrics)
    await exported_all(exporter, ledger, traffic.statuses[200])
    assert await entries_appended(admin) == traffic.statuses[200]
    await reconciles(redis, ledger)
    log = exporter.log()
    assert log.count("ledger export paused: Redis failed") == 1, log
    assert log.count("ledger export resumed after Redis failed") == 1, log
    assert "Traceback" not in log


async def test_settlements_replayed_by_the_retry_queue_append_once(
        upstream: Process, redis: RedisServer, admin: Store, ledger: str, tmp_path: Path,
        started: list[Any]) -> None:
    """Streams in flight when Redis goes away: their settlements fail and the retry queue
    replays them once it is back (each appends its entry then). Then Redis stalled (SIGSTOP)
    for longer than the gateway's timeout: the settlements written meanwhile run when it
    wakes, and the queue's replays of them must append nothing (the reservation is gone)."""
    secrets = await keys(admin)
    gateway, gateway_metrics = serve(upstream, redis, ledger, started, redis_timeout="0.25")
    exporter = ExporterProcess(redis.url, ledger, tmp_path / "exporter.log")
    started.append(exporter)
    exporter.start()
    assert redis.process is not None
    async with Traffic(gateway.url, secrets) as traffic:
        await traffic.until(20)
        await asyncio.to_thread(redis.stop)  # streams in flight lose their settlements
        await asyncio.sleep(0.4)
        await asyncio.to_thread(redis.start)
        await traffic.until(20)
        await until(lambda: scrape(gateway_metrics)["gateway_settlements_pending"] == 0)
        pending = scrape(gateway_metrics)
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # answers come after the timeout
        try:
            await asyncio.sleep(1.0)
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        await traffic.until(20)
    await settled_everything(admin, gateway_metrics)
    after = scrape(gateway_metrics)
    retried = "gateway_settlements_total{outcome=retried}"
    failed_writes = "gateway_store_errors_total{op=settle}"
    # Both faults failed settlements the queue then replayed; none fell back to the estimate.
    assert pending.get(retried, 0) > 0 and pending[failed_writes] > 0, pending
    assert after[retried] > pending[retried], after
    assert after[failed_writes] > pending[failed_writes], after
    assert after.get("gateway_settlements_total{outcome=failed}", 0) == 0
    answered = traffic.statuses[200]
    await exported_all(exporter, ledger, answered)
    assert await entries_appended(admin) == answered  # no settlement appended twice
    assert exporter.metrics()["gateway_ledger_duplicates_total"] == 0
    await reconciles(redis, ledger)
