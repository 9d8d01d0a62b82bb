"""Metrics, health endpoints and request logs of GatewayMiddleware, in process, on both stores."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret
from gateway.core.request_id import request_id_from
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError
from gateway.http.auth import header
from gateway.http.settlement import Settlement, SettlementQueue
from gateway.obs.logs import (
    JsonFormatter,
    RequestRecord,
    TextFormatter,
    logging_config,
)
from gateway.obs.metrics import MULTIPROC_ENV, Metrics, exposition, multiprocess_dir
from gateway.serve.cli import main
from gateway.store import Ask, KeyRef, Store, connect
from gateway.types import Receive, Scope, Send
from tests.conftest import (
    METRICS_AUTH,
    PLAN_LIMITS,
    RedisServer,
    bearer,
    client_for,
    gateway,
    new_key,
)
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when it is absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


# --------------------------------------------------------------------------- metrics


async def test_metrics_endpoint_serves_this_gateways_registry(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer("sk_live_" + "z" * 40))).status_code == 401
        response = await client.get("/metrics", headers=METRICS_AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    allowed = {"decision": "allowed", "reason": "ok", "plan": "standard"}
    assert sample(text, "gateway_requests_total", **allowed) == 3
    assert sample(text, "gateway_requests_total", decision="rejected",
                  reason="invalid_api_key", plan="") == 1
    # "m" is not in [pricing.models]: its tokens and spend are the model label `other`'s
    assert sample(text, "gateway_tokens_total", kind="prompt", plan="standard",
                  model="other") == 30
    assert sample(text, "gateway_tokens_total", kind="completion", plan="standard",
                  model="other") == 24
    assert sample(text, "gateway_settlements_total", outcome="settled") == 3
    assert sample(text, "gateway_admission_duration_seconds_count") == 3
    assert sample(text, "gateway_upstream_duration_seconds_count", status_class="2xx") == 3
    assert sample(text, "gateway_spend_usd_total", plan="standard",
                  model="other") == pytest.approx(51e-6)
    assert sample(text, "gateway_fail_open_requests_total") == 0
    for secret_value in (secret, key_id, account_id, "z" * 40):
        assert secret_value not in text


async def test_each_request_is_counted_once_by_its_outcome(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, rpm=1)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT,
                                       headers=bearer(secret))).status_code for _ in range(3)]
        text = (await client.get("/metrics", headers=METRICS_AUTH)).text
    assert statuses == [200, 429, 429]
    assert sample(text, "gateway_requests_total", decision="allowed", reason="ok",
                  plan="standard") == 1
    assert sample(text, "gateway_requests_total", decision="rejected",
                  reason="rate_limit_exceeded_rpm", plan="standard") == 2


async def test_a_replayed_settlement_counts_its_tokens_and_spend_once(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    # A retry after a lost reply replays a settlement Redis had applied: settle.lua makes
    # the replay a no-op, and the metrics must not count it again either.
    secret, key_id, account_id = await new_key(store, settings)
    ref = KeyRef(account_id, key_id)
    assert (await store.admit(ref, hash_secret(secret), "r", Ask.flat(50, 100),
                              PLAN_LIMITS)).code == 0
    queue = SettlementQueue(store, metrics)
    item = Settlement(ref, "r", 10, 8, 17, "standard")
    await queue.settle(item)
    await queue.settle(item)
    text = exposition(metrics.registry)[0].decode()
    assert sample(text, "gateway_settlements_total", outcome="settled") == 2
    labels = {"plan": "standard", "model": "other"}
    assert sample(text, "gateway_tokens_total", kind="prompt", **labels) == 10
    assert sample(text, "gateway_tokens_total", kind="completion", **labels) == 8
    assert sample(text, "gateway_spend_usd_total", **labels) == pytest.approx(17e-6)
    assert (await store.get_key(key_id)).spent == 17


def _bump_script(allowed: int, plan: str) -> str:
    return textwrap.dedent(f"""
        from prometheus_client import CollectorRegistry
        from gateway.obs.metrics import Metrics
        m = Metrics.create(CollectorRegistry())
        m.requests.labels("allowed", "ok", {plan!r}).inc({allowed})
        m.admission_seconds.observe(0.001)
    """)


def bump_in_subprocess(directory: Path, allowed: int, plan: str = "standard") -> None:
    """Counts `allowed` requests in another process writing to the multiprocess dir."""
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    subprocess.run([sys.executable, "-c", _bump_script(allowed, plan)], env=env, check=True,
                   timeout=60)


def test_exposition_merges_every_process_in_multiprocess_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bump_in_subprocess(tmp_path, 3)
    bump_in_subprocess(tmp_path, 4)
    registry = CollectorRegistry()
    own = Metrics.create(registry)
    own.requests.labels("allowed", "ok", "standard").inc(100)  # this process: plain values
    assert sample(exposition(registry)[0].decode(), "gateway_requests_total",
                  decision="allowed", reason="ok", plan="standard") == 100
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    text = exposition(registry)[0].decode()
    assert sample(text, "gateway_requests_total", decision="allowed", reason="ok",
                  plan="standard") == 7
    assert sample(text, "gateway_admission_duration_seconds_count") == 2


def test_multiprocess_dir_clears_an_operator_dir_before_and_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    bump_in_subprocess(directory, 5)
    keep = directory / "notes.txt"
    keep.write_text("not a metrics file")
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    with multiprocess_dir(workers=4) as used:
        assert used == directory
        assert not list(directory.glob("*.db"))  # stale counts would add to this run's
        bump_in_subprocess(directory, 1)
        assert list(directory.glob("*.db"))
    assert directory.is_dir() and keep.exists()
    assert not list(directory.glob("*.db"))


def test_multiprocess_dir_creates_and_removes_a_private_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with multiprocess_dir(workers=1) as none:
        assert none is None and MULTIPROC_ENV not in os.environ
    with multiprocess_dir(workers=2) as used:
        assert used is not None and used.is_dir() and used.parent == tmp_path
        assert os.environ[MULTIPROC_ENV] == str(used)
    assert not used.exists()
    assert MULTIPROC_ENV not in os.environ


def test_multiprocess_dir_that_cannot_be_created_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(MULTIPROC_ENV, str(blocker / "metrics"))
    with pytest.raises(ConfigError, match=MULTIPROC_ENV), multiprocess_dir(workers=2):
        pass


# --------------------------------------------------------------------------- health


async def test_healthz_is_ok_while_redis_is_down(settings: Settings, metrics: Metrics,
                                                 tmp_path: Path) -> None:
    dead = connect(f"unix://{tmp_path}/nothing.sock", timeout_seconds=0.5)
    async with client_for(gateway(MockUpstream(), dead, settings, metrics)) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    await dead.close()
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "redis": False, "scripts": False}


async def test_readyz_loads_missing_scripts(store: Store, settings: Settings,
                                            metrics: Metrics) -> None:
    shas = [store._admit.sha, store._settle.sha, store._usage.sha]
    await redis_of(store).script_flush()
    assert await redis_of(store).script_exists(*shas) == [False, False, False]
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "redis": True, "scripts": True}
    assert response.headers["cache-control"] == "no-store"  # a probe must see it live
    assert await redis_of(store).script_exists(*shas) == [True, True, True]


async def test_readyz_is_503_when_scripts_cannot_be_checked(
        redis_server: RedisServer, redis_url: str, settings: Settings,
        metrics: Metrics) -> None:
    # A Redis user that may PING but not run SCRIPT: reachable, yet admission cannot work.
    cli = ["redis-cli", "-s", str(redis_server.socket)]
    subprocess.run([*cli, "ACL", "SETUSER", "noscript", "on", ">pw", "~*", "&*", "+@all",
                    "-script"], check=True, stdout=subprocess.DEVNULL)
    limited = connect(f"redis://noscript:pw@127.0.0.1:{redis_server.port}/0", 2.0)
    try:
        async with client_for(gateway(MockUpstream(), limited, settings, metrics)) as client:
            response = await client.get("/readyz")
    finally:
        await limited.close()
        subprocess.run([*cli, "ACL", "DELUSER", "noscript"], check=True,
                       stdout=subprocess.DEVNULL)
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "redis": True, "scripts": False}


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize(("value", "kept"), [
    (b"abc-123", True),
    (b"x" * 128, True),
    (b"x" * 129, False),
    (b"", False),
    (b"has space", False),
    (b"tab\there", False),
    (b"new\nline", False),
    ("caf\u00e9".encode("latin-1"), False),
])
def test_request_id_header_is_validated(value: bytes, kept: bool) -> None:
    got = request_id_from([(b"x-request-id", value)])
    if kept:
        assert got == value.decode()
    else:
        assert len(got) == 32 and int(got, 16) >= 0


def test_request_ids_are_generated_fresh() -> None:
    assert request_id_from([]) != request_id_from([])


class Recording:
    """The mock upstream, remembering the X-Request-Id of each request it gets."""

    def __init__(self) -> None:
        self.inner = MockUpstream()
        self.ids: list[bytes | None] = []
        self.id_headers: list[int] = []  # how many X-Request-Id headers each request had

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.ids.append(header(scope["headers"], b"x-request-id"))
        self.id_headers.append(sum(k == b"x-request-id" for k, _ in scope["headers"]))
        await self.inner(scope, receive, send)


async def test_request_id_is_returned_and_forwarded(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    upstream = Recording()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        chosen = await client.post("/v1/chat/completions", json=CHAT,
                                   headers={**bearer(secret), "X-Request-Id": "client-id-1"})
        generated = await client.post("/v1/chat/completions", json=CHAT,
                                      headers={**bearer(secret), "X-Request-Id": "bad id"})
        rejected = await client.post("/v1/chat/completions", json=CHAT,
                                     headers={"X-Request-Id": "client-id-2"})
        other = await client.get("/not-v1", headers={**bearer(secret), "X-Request-Id": "bad id"})
    assert chosen.headers["x-request-id"] == "client-id-1"
    assert len(generated.headers["x-request-id"]) == 32
    assert rejected.status_code == 401 and rejected.headers["x-request-id"] == "client-id-2"
    assert upstream.ids == [b"client-id-1", generated.headers["x-request-id"].encode(),
                            other.headers["x-request-id"].encode()]
    assert upstream.id_headers == [1, 1, 1]  # the client's invalid one is replaced, not added


class Barrier:
    """The mock upstream, holding every request until `n` of them are in flight at once."""

    def __init__(self, n: int) -> None:
        self.inner = MockUpstream()
        self.n = n
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), timeout=10)
        await self.inner(scope, receive, send)


async def test_a_repeated_request_id_never_shares_a_reservation(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    # Concurrent requests with one client id: were it the reservation id, the second
    # admission would overwrite the first's reservation and one estimate would never settle.
    secret, _, _ = await new_key(store, settings)
    headers = {**bearer(secret), "X-Request-Id": "same-id"}
    body = {**CHAT, "max_tokens": 100}  # estimate 155 micro-USD, actual 10 + 16 tokens: 29
    async with client_for(gateway(Barrier(3), store, settings, metrics)) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(3)))
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert {r.headers["x-request-id"] for r in responses} == {"same-id"}
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    assert usage["budget"]["spent"] == pytest.approx(3 * 29e-6)


# --------------------------------------------------------------------------- request logs


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    return [orjson.loads(formatter.format(r)) for r in caplog.records
            if r.name == "gateway.access"]


async def test_one_json_line_per_request(store: Store, settings: Settings, metrics: Metrics,
                                         caplog: pytest.LogCaptureFixture) -> None:
    secret, key_id, account_id = await new_key(store, settings)
    caplog.set_level(logging.INFO, logger="gateway")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        await client.post("/v1/chat/completions", json=CHAT,
                          headers={**bearer(secret), "X-Request-Id": "req-ok"})
        await client.post("/v1/chat/completions", json=CHAT,
                          headers={**bearer("sk_live_" + "q" * 40), "X-Request-Id": "req-401"})
        await client.post("/v1/chat/completions", content=b"nope",
                          headers={**bearer(secret), "X-Request-Id": "req-400"})
        await client.get("/healthz")  # probes log at DEBUG only
        await client.get("/metrics", headers=METRICS_AUTH)
    lines = access_lines(caplog)
    assert [line["request_id"] for line in lines] == ["req-ok", "req-401", "req-400"]
    ok, unknown, bad = lines
    assert {k: ok[k] for k in ("method", "path", "status", "key_id", "plan", "decision",
                               "reason", "prompt_tokens", "completion_tokens")} == {
        "method": "POST", "path": "/v1/chat/completions", "status": 200, "key_id": key_id,
        "plan": "standard", "decision": "allowed", "reason": "ok", "prompt_tokens": 10,
        "completion_tokens": 8}
    assert ok["cost_usd"] == pytest.approx(17e-6)
    assert ok["admission_ms"] > 0 and ok["duration_ms"] >= ok["admission_ms"]
    assert ok["level"] == "info" and ok["logger"] == "gateway.access" and ok["pid"] > 0
    assert (unknown["status"], unknown["decision"], unknown["reason"], unknown["key_id"]) == (
        401, "rejected", "invalid_api_key", None)
    assert unknown["admission_ms"] is None and unknown["cost_usd"] == 0
    assert (bad["status"], bad["reason"], bad["key_id"]) == (400, "invalid_request", key_id)
    assert (ok["account_id"], unknown["account_id"], bad["account_id"]) == (
        account_id, None, account_id)
    assert (ok["model"], ok["upstream_status"], unknown["model"], unknown["upstream_status"]) == (
        "m", 200, None, None)
    assert ok["ttft_ms"] is None  # not a stream
    everything = caplog.text + "".join(orjson.dumps(line).decode() for line in lines)
    for secret_value in (secret, "q" * 40):
        assert secret_value not in everything


async def test_probe_requests_log_at_debug(store: Store, settings: Settings, metrics: Metrics,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        await client.get("/healthz")
        await client.get("/readyz")
    assert [(r.levelno, r.fields["path"]) for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "gateway.access"] == [(logging.DEBUG, "/healthz"),
                                               (logging.DEBUG, "/readyz")]


def test_text_format_is_key_value() -> None:
    record = RequestRecord("rid-1", "POST", "/v1/chat/completions", decision="allowed",
                           status=200)
    log = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None, None)
    log.fields = record.fields()
    line = TextFormatter().format(log)
    assert " INFO gateway.access request request_id=rid-1 method=POST " in line
    assert "status=200" in line and "key_id=-" in line and "\n" not in line


def test_logging_config_applies_level_and_format() -> None:
    config = logging_config("warning", "text")
    assert config["loggers"]["gateway"]["level"] == "WARNING"
    assert config["formatters"]["gateway"]["()"] == "gateway.obs.logs.TextFormatter"
    assert logging_config()["formatters"]["gateway"]["()"] == "gateway.obs.logs.JsonFormatter"
    with pytest.raises(ConfigError, match="log format"):
        logging_config("info", "xml")
    with pytest.raises(ConfigError, match="log level"):
        logging_config("loud", "json")


def test_settings_read_log_level_and_format() -> None:
    assert (Settings.load(env={}).log_level, Settings.load(env={}).log_format) == (
        "info", "json")
    s = Settings.load(env={"GATEWAY_LOG_LEVEL": "DEBUG", "GATEWAY_LOG_FORMAT": "text"})
    assert (s.log_level, s.log_format) == ("debug", "text")
    assert Settings.from_mapping({"log_format": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="log format"):
        Settings.load(env={"GATEWAY_LOG_FORMAT": "yaml"})


def test_serve_rejects_an_unknown_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--upstream", "http://127.0.0.1:1", "--log-format", "xml"])
    assert exited.value.code == 2
    assert "--log-format" in capsys.readouterr().err
