"""`gateway ledger migrate | export | reconcile` as an operator runs them: main([...]) against
a private redis-server and a private PostgreSQL, the output read back from the terminal."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.ledger import LedgerSettings
from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.ledger.schema import MIGRATIONS
from gateway.obs.metrics import Metrics
from gateway.serve.cli import main
from gateway.store import connect
from tests.conftest import bearer, client_for, free_port, gateway, new_key

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
VERSION = MIGRATIONS[-1].version


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_ledger_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_POSTGRES_URL", raising=False)


@dataclass
class Traffic:
    acme: str  # account ids
    other: str
    acme_keys: list[str]
    other_key: str
    requests: int


def drive(redis_url: str, postgres_url: str, per_key: int = 3) -> Traffic:
    """Two accounts ('acme' with two keys, 'other' with one), `per_key` chats on each key
    through an in-process gateway whose ledger is on."""

    async def go() -> Traffic:
        store = connect(redis_url, 5.0)
        settings = dataclasses.replace(Settings(), ledger=LedgerSettings(postgres_url))
        try:
            acme = (await store.create_account("acme")).id
            other = (await store.create_account("other")).id
            keys = [await new_key(store, settings, account=acme, rpm=1000, tpm=10_000_000)
                    for _ in range(2)]
            keys.append(await new_key(store, settings, account=other, rpm=1000,
                                      tpm=10_000_000))
            app = gateway(MockUpstream(), store, settings, Metrics.create(CollectorRegistry()))
            async with client_for(app) as client:
                for secret, _, _ in keys:
                    for _ in range(per_key):
                        response = await client.post("/v1/chat/completions", json=CHAT,
                                                     headers=bearer(secret))
                        assert response.status_code == 200, response.text
            await app.drain()
        finally:
            await store.close()
        return Traffic(acme, other, [keys[0][1], keys[1][1]], keys[2][1], per_key * 3)

    return asyncio.run(go())


def sql(url: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement.encode(), params or None)
        return cursor.fetchall() if cursor.description is not None else []


def test_migrate_twice_then_up_to_date(postgres_url: str,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(capsys, "ledger", "migrate", "--postgres", postgres_url)
    assert (code, err) == (0, "")
    versions = ", ".join(str(m.version) for m in MIGRATIONS)
    assert out == f"applied migrations {versions}; schema version {VERSION}\n"
    # The environment names the database as well as --postgres does (no Redis needed).
    monkeypatch.setenv("GATEWAY_POSTGRES_URL", postgres_url)
    code, out, _ = run(capsys, "ledger", "migrate")
    assert code == 0
    assert out == f"the ledger schema is up to date (version {VERSION})\n"
    code, out, _ = run(capsys, "ledger", "migrate", "--json")
    assert code == 0 and json.loads(out) == {"applied": [], "version": VERSION}
    assert sql(postgres_url, "SELECT count(*) FROM ledger_schema_migrations") == [
        (len(MIGRATIONS),)]


def test_migrate_json_on_a_fresh_database(postgres_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ledger", "migrate", "--json", "--postgres", postgres_url)
    assert code == 0
    assert json.loads(out) == {"applied": [m.version for m in MIGRATIONS], "version": VERSION}


def test_export_once_prints_its_counts(redis_url: str, postgres_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "ledger", "migrate", "--postgres", postgres_url)[0] == 0
    traffic = drive(redis_url, postgres_url)
    common = ("--redis", redis_url, "--postgres", postgres_url)
    code, out, err = run(capsys, "ledger", "export", "--once", *common)
    assert (code, err) == (0, "")
    assert out == f"exported {traffic.requests} rows (0 already stored); 0 entries left in Redis\n"
    code, out, _ = run(capsys, "ledger", "export", "--once", "--json", *common)
    assert code == 0
    assert json.loads(out) == {"exported": 0, "duplicates": 0, "lag_entries": 0}
    assert sql(postgres_url, "SELECT count(*) FROM ledger_entries") == [(traffic.requests,)]


def test_reconcile_passes_then_fails_on_one_corrupted_row(
        redis_url: str, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "ledger", "migrate", "--postgres", postgres_url)[0] == 0
    traffic = drive(redis_url, postgres_url)
    common = ("--redis", redis_url, "--postgres", postgres_url)
    assert run(capsys, "ledger", "export", "--once", *common)[0] == 0

    code, out, err = run(capsys, "ledger", "reconcile", *common)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1] == "2 accounts, 3 keys: the ledger matches Redis"
    assert len(lines) == 2 + 3 + 1 and all(line.endswith(": ok") for line in lines[:-1]), out
    assert f"account {traffic.acme}: ledger " in out and "(3 rows stored" in out

    # One row of acme's first key made dearer by 0.001234 USD, in PostgreSQL only.
    [(request_id,)] = sql(postgres_url, "SELECT request_id FROM ledger_entries WHERE key_id = "
                          "%s ORDER BY request_id LIMIT 1", traffic.acme_keys[0])
    sql(postgres_url, "UPDATE ledger_entries SET cost_micro = cost_micro + 1234 "
        "WHERE request_id = %s", request_id)
    code, out, err = run(capsys, "ledger", "reconcile", *common)
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[-1] == "2 accounts, 3 keys: 2 differences"
    differing = [line for line in lines if "DIFFERS" in line]
    assert len(differing) == 2, out
    assert differing[0].startswith(f"account {traffic.acme}: ")
    assert differing[1].startswith(f"  key {traffic.acme_keys[0]}: ")
    assert all(line.endswith("DIFFERS by 0.001234 USD") for line in differing), out
    assert next(line for line in lines if traffic.acme_keys[1] in line).endswith(": ok")
    assert next(line for line in lines if traffic.other in line).endswith(": ok")

    code, out, _ = run(capsys, "ledger", "reconcile", "--json", *common)
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["accounts"] == 2
    assert [(d["scope"], d["key_id"], d["difference_usd"]) for d in doc["differences"]] == [
        ("account", None, "0.001234"), ("key", traffic.acme_keys[0], "0.001234")]
    for difference in doc["differences"]:
        ledger, redis = float(difference["ledger_usd"]), float(difference["redis_usd"])
        assert round((ledger - redis) * 1e6) == 1234

    # --account: by name, only that account is looked at.
    code, out, _ = run(capsys, "ledger", "reconcile", "--account", "other", *common)
    assert code == 0
    assert out.splitlines()[-1] == "1 account, 1 key: the ledger matches Redis"
    assert traffic.acme not in out and traffic.other in out
    code, out, _ = run(capsys, "ledger", "reconcile", "--account", "acme", *common)
    assert code == 1 and out.splitlines()[-1] == "1 account, 2 keys: 2 differences"
    code, out, _ = run(capsys, "ledger", "reconcile", "--account", traffic.acme, *common)
    assert code == 1 and traffic.other not in out
    code, out, err = run(capsys, "ledger", "reconcile", "--account", "nobody", *common)
    assert (code, out) == (1, "") and "no account with id or name 'nobody'" in err

    # Put right again, it passes again.
    sql(postgres_url, "UPDATE ledger_entries SET cost_micro = cost_micro - 1234 "
        "WHERE request_id = %s", request_id)
    assert run(capsys, "ledger", "reconcile", *common)[0] == 0


def test_reconcile_counts_what_still_waits_in_redis(
        redis_url: str, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Before any export every entry is in the stream: reconcile passes, naming them
    waiting; a row of PostgreSQL deleted after the export is a difference."""
    assert run(capsys, "ledger", "migrate", "--postgres", postgres_url)[0] == 0
    traffic = drive(redis_url, postgres_url, per_key=2)
    common = ("--redis", redis_url, "--postgres", postgres_url)
    code, out, _ = run(capsys, "ledger", "reconcile", "--account", "other", *common)
    assert code == 0 and "(0 rows stored, 2 waiting in Redis)" in out
    assert run(capsys, "ledger", "export", "--once", *common)[0] == 0
    sql(postgres_url, "DELETE FROM ledger_entries WHERE request_id IN (SELECT request_id FROM "
        "ledger_entries WHERE key_id = %s LIMIT 1)", traffic.other_key)
    code, out, _ = run(capsys, "ledger", "reconcile", "--account", "other", *common)
    assert code == 1 and "(1 rows stored, 0 waiting in Redis)" in out
    assert out.splitlines()[-1] == "1 account, 1 key: 2 differences"


@pytest.mark.parametrize("argv", [
    ["ledger", "migrate"],
    ["ledger", "export", "--once"],
    ["ledger", "export", "--metrics-port", "0"],
    ["ledger", "reconcile"],
])
def test_no_database_configured_is_one_line(redis_url: str, argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv, "--redis", redis_url)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("gateway: error: no ledger database configured")
    assert "GATEWAY_POSTGRES_URL" in err and "--postgres" in err


@pytest.mark.parametrize("argv", [
    ["ledger", "migrate"],
    ["ledger", "migrate", "--json"],
    ["ledger", "export", "--once"],
    ["ledger", "export", "--metrics-port", "0"],
    ["ledger", "reconcile"],
])
def test_unreachable_postgres_is_one_line_without_the_password(
        redis_url: str, argv: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql://gw:s3cret-pa55@127.0.0.1:{free_port()}/ledger"  # nothing listens
    code, out, err = run(capsys, *argv, "--redis", redis_url, "--postgres", url)
    assert (code, out) == (1, ""), err
    assert err.count("\n") == 1, err
    assert err.startswith("gateway: error: cannot use the ledger's database (PostgreSQL:"), err
    assert "s3cret-pa55" not in err
    # The same URL from the environment is no more printed.
    monkeypatch.setenv("GATEWAY_POSTGRES_URL", url)
    code, out, err = run(capsys, *argv, "--redis", redis_url)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "s3cret-pa55" not in err and "cannot use the ledger's database" in err


def test_a_url_that_is_not_postgresql_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ledger", "migrate", "--postgres", "mysql://u:pw@db/ledger")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "must start with postgresql://" in err and "pw@" not in err


@pytest.mark.parametrize("once", [True, False])
def test_export_before_migrate_says_run_migrate(redis_url: str, postgres_url: str, once: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["ledger", "export", "--redis", redis_url, "--postgres", postgres_url,
            *(["--once"] if once else ["--metrics-port", "0"])]
    if once:
        code, out, err = run(capsys, *argv)
    else:  # the long-running exporter, in a process of its own: it must exit, not wait
        done = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                              text=True, timeout=30, check=False,
                              env={k: v for k, v in os.environ.items()
                                   if not k.startswith("GATEWAY_")})
        code, out, err = done.returncode, done.stdout, done.stderr
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert f"schema is at version 0, this gateway needs {VERSION}" in err
    assert "run `gateway ledger migrate` first" in err
    # Nothing was created behind the operator's back.
    assert sql(postgres_url, "SELECT to_regclass('ledger_entries') IS NULL") == [(True,)]
