"""The gateway against Redis over TLS: standalone, mutual TLS and a TLS cluster (rediss://)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError
from gateway.obs.metrics import Metrics
from gateway.serve.cli import main
from gateway.store import Store, connect
from tests.conftest import bearer, client_for, gateway, new_key
from tests.tls import Certificates, TLSCluster, TLSRedis

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}
CHAT_COST_MICRO = 17  # 10 prompt tokens at 0.50 + 8 completion tokens at 1.50 per million


@pytest.fixture(scope="module")
def mtls_redis(tmp_path_factory: pytest.TempPathFactory,
               certs: Certificates) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path_factory.mktemp("mtls-redis"), certs, auth_clients=True)
    yield server
    server.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 1
    assert out == ""
    assert err.startswith("gateway: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


async def drive_gateway(store: Store, settings: Settings, metrics: Metrics,
                        account: str | None = None) -> None:
    """Three admitted chats and a 429 through the middleware; spend is exactly 3 chats."""
    secret, key_id, _ = await new_key(store, settings, account, rpm=3)
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT,
                                       headers=bearer(secret))).status_code
                    for _ in range(3)]
        limited = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        usage = await client.get("/v1/usage", headers=bearer(secret))
    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert upstream.requests == 3
    assert usage.status_code == 200
    assert usage.json()["budget"]["spent"] == 3 * CHAT_COST_MICRO / 1e6
    assert (await store.get_key(key_id)).spent == 3 * CHAT_COST_MICRO


async def test_gateway_runs_over_tls(tls_redis: TLSRedis, settings: Settings,
                                     metrics: Metrics) -> None:
    store = connect(tls_redis.url(), timeout_seconds=5.0)
    try:
        # The server listens on TLS only (--port 0), so every command here went over TLS.
        await drive_gateway(store, settings, metrics)
        account = await store.create_account("tls-acme")
        assert [a.name for a in await store.list_accounts()].count("tls-acme") == 1
        assert (await store.get_account(account.id)).name == "tls-acme"
    finally:
        await store.close()


def test_cli_creates_keys_over_tls(tls_redis: TLSRedis,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = tls_redis.url()
    code, out, err = run(capsys, "keys", "create", "--name", "cli-tls", "--plan", "standard",
                         "--json", "--redis", url)
    assert (code, err) == (0, "")
    key = json.loads(out)
    assert key["key"].startswith("sk_live_") and key["name"] == "cli-tls"
    code, out, _ = run(capsys, "keys", "show", key["id"], "--json", "--redis", url)
    assert code == 0 and json.loads(out)["id"] == key["id"]


def test_cli_rejects_an_untrusted_server_in_one_line(
        tls_redis: TLSRedis, certs: Certificates, capsys: pytest.CaptureFixture[str]) -> None:
    wrong_ca = tls_redis.url(ssl_ca_certs=certs.path("other-ca.crt"))
    no_ca = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=required"
    for url in (wrong_ca, no_ca):
        code, out, err = run(capsys, "keys", "create", "--name", "x", "--credit",
                             "--redis", url)
        assert_one_error_line(code, out, err, "cannot reach Redis",
                              "TLS certificate verify failed", "ssl_ca_certs")


def test_cli_names_a_missing_certificate_file(tls_redis: TLSRedis, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.crt")
    code, out, err = run(capsys, "keys", "list", "--redis",
                         tls_redis.url(ssl_ca_certs=missing))
    assert_one_error_line(code, out, err, "ssl_ca_certs", missing, "does not exist")
    with pytest.raises(ConfigError, match="ssl_certfile"):
        connect(tls_redis.url(ssl_certfile=missing))


async def test_gateway_runs_over_mutual_tls(mtls_redis: TLSRedis, certs: Certificates,
                                            settings: Settings, metrics: Metrics) -> None:
    url = mtls_redis.url(ssl_certfile=certs.path("client.crt"),
                         ssl_keyfile=certs.path("client.key"))
    store = connect(url, timeout_seconds=5.0)
    try:
        await drive_gateway(store, settings, metrics)
    finally:
        await store.close()


def test_cli_needs_the_client_certificate_for_mutual_tls(
        mtls_redis: TLSRedis, certs: Certificates,
        capsys: pytest.CaptureFixture[str]) -> None:
    with_cert = mtls_redis.url(ssl_certfile=certs.path("client.crt"),
                               ssl_keyfile=certs.path("client.key"))
    code, out, err = run(capsys, "keys", "create", "--name", "m", "--credit", "--json",
                         "--redis", with_cert)
    assert (code, err) == (0, "")
    assert json.loads(out)["type"] == "credit"

    code, out, err = run(capsys, "keys", "list", "--redis", mtls_redis.url())
    assert_one_error_line(code, out, err, "cannot reach Redis", "ssl_certfile/ssl_keyfile")


async def test_gateway_runs_over_a_tls_cluster(tls_cluster: TLSCluster, settings: Settings,
                                               metrics: Metrics) -> None:
    # Two of the three masters are given; the third is discovered (over TLS as well).
    store = connect(tls_cluster.url, timeout_seconds=5.0)
    try:
        for n in range(4):  # accounts hash to different slots, so to different nodes
            account = await store.create_account(f"cluster-{n}")
            await drive_gateway(store, settings, metrics, account.id)
    finally:
        await store.close()
    assert sum(1 for n in tls_cluster.keys_per_node() if n > 0) >= 2


def test_cli_creates_keys_on_a_tls_cluster(tls_cluster: TLSCluster,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keys", "create", "--name", "c", "--plan", "standard",
                         "--json", "--redis", tls_cluster.url)
    assert (code, err) == (0, "")
    assert json.loads(out)["key"].startswith("sk_live_")
