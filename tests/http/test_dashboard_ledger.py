"""The key page's `#spend-by-model` (docs/dashboard.md) when a ledger is configured: requests
through the gateway (GatewayMiddleware with httpx, the mock upstream), exported once into a
private PostgreSQL, read back by `GET /dashboard/keys/<uuid>` as `/api/spend` reads them;
model names escaped; the page still answering when the ledger database is not. On a real
redis-server and on the Redis Cluster, as tests/http/test_dashboard.py."""

from __future__ import annotations

import dataclasses
import html
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from gateway.config.ledger import LedgerSettings
from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.dashboard.charts import usd
from gateway.ledger import db
from gateway.ledger.exporter import Exporter
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.store.ledger import LedgerEntry, LedgerStreams
from gateway.types import Message, Receive, Scope, Send
from tests.conftest import bearer, client_for, free_port, gateway, new_key
from tests.http.test_dashboard import account_with_mk, sign_in

PASSWORD = "s3cret-ledger-pw"
AVAILABLE_NOTE = "From the ledger: requests settled in the last 30 days, as /api/spend."
UNAVAILABLE_NOTE = "The ledger database is unavailable at the moment."
# Asked for under this name, the upstream serves (and reports) another model.
ALIASES = {"alias-of-b": "model-b"}
HOSTILE = "<script>x</script>"
QUOTED = "q\"><img src=x onerror=alert(1)>&amp;'"


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Aliasing:
    """MockUpstream (which answers with the model it is asked for) serving the model ALIASES
    names instead of the one asked, as a router or a llama.cpp alias does."""

    def __init__(self) -> None:
        self.inner = MockUpstream()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":  # no body to read
            await self.inner(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = orjson.loads(b"".join(chunks))
        if isinstance(body, dict) and body.get("model") in ALIASES:
            body["model"] = ALIASES[body["model"]]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": orjson.dumps(body),
                        "more_body": False}
            return await receive()

        await self.inner(scope, replay, send)


def with_password(url: str) -> str:
    """The private server trusts every local connection: a password in the URL is accepted
    (and ignored), so the tests can watch that it is never shown."""
    assert url.startswith("postgresql://postgres@"), url
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


def with_ledger(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, ledger=LedgerSettings(postgres_url=url))


@pytest.fixture
async def ledger_url(postgres_url: str) -> str:
    """A migrated ledger database (what `gateway ledger migrate` does), its URL carrying a
    password."""
    url = with_password(postgres_url)
    async with db.connection(url) as conn:
        await db.migrate(conn)
    return url



def chat(model: str, chars: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "y" * chars}],
            "max_tokens": 8}


async def send(client: httpx.AsyncClient, secret: str, model: str, chars: int) -> None:
    response = await client.post("/v1/chat/completions", json=chat(model, chars),
                                 headers=bearer(secret))
    assert response.status_code == 200, response.text


async def export_once(store: Store, url: str, exporters: list[Exporter]) -> int:
    exporter = Exporter(LedgerStreams(store), url)
    exporters.append(exporter)
    exported = await exporter.export_pending()
    assert await exporter.observe_lag() == 0
    return exported


async def ledger_rows(url: str, key_id: str) -> dict[str, tuple[int, int]]:
    """model -> (rows, Σ cost_micro) of the key's entries in the last 30 days, read with SQL
    of our own (not the query the page uses)."""
    async with db.connection(url) as conn:
        cur = await conn.execute(
            "SELECT model, count(*), sum(cost_micro) FROM ledger_entries WHERE key_id = %s "
            "AND settled_at >= now() - interval '30 days' GROUP BY model", (key_id,))
        return {str(m): (int(str(n)), int(str(c))) for m, n, c in await cur.fetchall()}


def model_table(page: str) -> str:
    found = re.search(r'<table id="spend-by-model">(.*?)</table>', page, re.S)
    assert found is not None, page
    return found.group(1)


def model_rows(page: str) -> list[tuple[str, str, str]]:
    """(data-model as written, td.requests, td.spend) per row of #spend-by-model."""
    rows = []
    for name, inner in re.findall(r'<tr data-model="([^"]*)">(.*?)</tr>', model_table(page),
                                  re.S):
        requests = re.search(r'<td class="requests">(.*?)</td>', inner, re.S)
        spend = re.search(r'<td class="spend">(.*?)</td>', inner, re.S)
        assert requests is not None and spend is not None, inner
        rows.append((name, requests.group(1), spend.group(1)))
    return rows


def hint_after_table(page: str) -> str:
    found = re.search(r'<table id="spend-by-model">.*?</table>\s*<p class="hint">(.*?)</p>',
                      page, re.S)
    assert found is not None
    return html.unescape(found.group(1))


def old_entry(account_id: str, key_id: str) -> LedgerEntry:
    """A settled request of the key 31 days ago: outside the page's (and /api/spend's)
    window."""
    settled = int((datetime.now(UTC) - timedelta(days=31)).timestamp() * 1_000_000)
    return LedgerEntry(f"{settled // 1000}-0", "req-old", account_id, key_id,
                       "/v1/chat/completions", "model-a", 10, 0, 3, 77_000_000, 200,
                       settled - 1000, settled)


async def test_spend_by_model_is_the_keys_ledger_lines_as_api_spend_reads_them(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = with_ledger(settings, ledger_url)
    secret, key_id, account_id, mk = await account_with_mk(store, settings, "acme")
    sibling, sibling_id, _ = await new_key(store, settings, account="acme", name="bob",
                                           credit=True)
    await store.create_account("other-co")
    stranger, stranger_id, other_id = await new_key(store, settings, account="other-co",
                                                    name="eve", credit=True)
    await store.add_credits(other_id, 1_000_000, "test", "cli")
    app = gateway(Aliasing(), store, settings, metrics)
    async with client_for(app) as client:
        await send(client, secret, "model-a", 40)
        await send(client, secret, "model-a", 400)
        await send(client, secret, "model-b", 120)
        await send(client, secret, "alias-of-b", 80)  # served as model-b
        await send(client, sibling, "model-a", 4000)  # same account and model, other key
        await send(client, stranger, "model-z", 40)  # another account
        await app.drain()
        assert await export_once(store, ledger_url, exporters) == 6
        async with db.connection(ledger_url) as conn:
            await db.insert(conn, [old_entry(account_id, key_id)])
        await sign_in(client, mk)
        response = await client.get(f"/dashboard/keys/{key_id}")
        spend = await client.get("/api/spend?group_by=key", headers=bearer(mk))
    assert response.status_code == 200
    page = response.text
    expected = await ledger_rows(ledger_url, key_id)
    # The ledger keeps the model served, not the one asked for.
    assert set(expected) == {"model-a", "model-b"}
    assert expected["model-a"][0] == 2 and expected["model-b"][0] == 2
    assert all(cost > 0 for _, cost in expected.values())
    assert expected["model-a"][1] != expected["model-b"][1]
    # Its lines are the key's exact spend: the counters agree (all of it is recent).
    record = await store.get_key(key_id)
    assert record is not None
    assert sum(cost for _, cost in expected.values()) == record.total_spent

    rows = model_rows(page)
    assert sorted(name for name, _, _ in rows) == ["model-a", "model-b"]  # once each
    assert all(re.fullmatch(r"\$\d+\.\d{6}", spent) for _, _, spent in rows), rows
    assert {name: (requests, spent) for name, requests, spent in rows} == {
        model: (str(n), usd(cost)) for model, (n, cost) in expected.items()}
    assert "alias-of-b" not in page and "model-z" not in page
    assert sibling_id not in page and stranger_id not in page
    assert hint_after_table(page) == AVAILABLE_NOTE

    # What /api/spend reports for the key, over its default window (the last 30 days).
    assert spend.status_code == 200, spend.text
    by_key = {d["group"]: d for d in spend.json()["data"]}
    assert set(by_key) == {key_id, sibling_id}
    assert by_key[key_id]["requests"] == sum(n for n, _ in expected.values()) == 4
    assert by_key[key_id]["costUsd"] == sum(c for _, c in expected.values()) / 1_000_000
    assert sum(int(requests) for _, requests, _ in rows) == by_key[key_id]["requests"]
    assert PASSWORD not in page and PASSWORD not in caplog.text


async def test_the_sibling_keys_page_shows_only_its_own_line(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    secret, key_id, _, mk = await account_with_mk(store, settings, "acme")
    sibling, sibling_id, _ = await new_key(store, settings, account="acme", name="bob",
                                           credit=True)
    idle_secret, idle_id, _ = await new_key(store, settings, account="acme", name="idle",
                                            credit=True)
    app = gateway(MockUpstream(), store, settings, metrics)
    async with client_for(app) as client:
        await send(client, secret, "model-a", 40)
        await send(client, secret, "model-b", 40)
        await send(client, sibling, "model-a", 400)
        await app.drain()
        assert await export_once(store, ledger_url, exporters) == 3
        await sign_in(client, mk)
        page = (await client.get(f"/dashboard/keys/{sibling_id}")).text
        idle = (await client.get(f"/dashboard/keys/{idle_id}")).text
    expected = await ledger_rows(ledger_url, sibling_id)
    assert model_rows(page) == [("model-a", "1", usd(expected["model-a"][1]))]
    assert model_rows(idle) == []  # no requests: no rows (and not the counters' one)
    assert hint_after_table(idle) == AVAILABLE_NOTE
    assert idle_secret not in idle and key_id not in page


async def test_model_names_from_the_ledger_are_escaped(
        store: Store, settings: Settings, metrics: Metrics, ledger_url: str,
        exporters: list[Exporter]) -> None:
    settings = with_ledger(settings, ledger_url)
    secret, key_id, _, mk = await account_with_mk(store, settings, "acme")
    app = gateway(MockUpstream(), store, settings, metrics)
    async with client_for(app) as client:
        await send(client, secret, HOSTILE, 40)  # the mock serves the model it is asked for
        await send(client, secret, QUOTED, 40)
        await app.drain()
        assert await export_once(store, ledger_url, exporters) == 2
        await sign_in(client, mk)
        page = (await client.get(f"/dashboard/keys/{key_id}")).text
    expected = await ledger_rows(ledger_url, key_id)
    assert set(expected) == {HOSTILE, QUOTED}  # the ledger holds the names as they were
    table = model_table(page)
    assert "<script" not in table and "<img" not in table
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert '<tr data-model="&lt;script&gt;x&lt;/script&gt;"><th>&lt;script&gt;x&lt;/script&gt;' \
           "</th>" in table
    rows = model_rows(page)
    assert {html.unescape(name) for name, _, _ in rows} == {HOSTILE, QUOTED}
    for name, requests, spent in rows:
        model = html.unescape(name)
        assert name == html.escape(model, quote=True)
        assert (requests, spent) == ("1", usd(expected[model][1]))
        assert f"<th>{html.escape(model, quote=True)}</th>" in table


@pytest.mark.parametrize("failure", ["closed-port", "server-stopped", "not-migrated"])
async def test_the_key_page_answers_when_the_ledger_database_does_not(
        store: Store, settings: Settings, metrics: Metrics, postgres_server: Any,
        postgres_url: str, caplog: pytest.LogCaptureFixture, failure: str) -> None:
    caplog.set_level(logging.DEBUG)
    if failure == "closed-port":
        url = f"postgresql://gw:{PASSWORD}@127.0.0.1:{free_port()}/ledger"
    else:
        url = with_password(postgres_url)
        if failure == "server-stopped":
            async with db.connection(url) as conn:
                await db.migrate(conn)
    settings = with_ledger(settings, url)
    secret, key_id, _, mk = await account_with_mk(store, settings, "acme")
    app = gateway(MockUpstream(), store, settings, metrics)
    try:
        async with client_for(app) as client:
            await send(client, secret, "model-a", 40)
            await app.drain()
            await sign_in(client, mk)
            if failure == "server-stopped":
                postgres_server.stop("fast")
            response = await client.get(f"/dashboard/keys/{key_id}")
    finally:
        postgres_server.ensure_running()
    assert response.status_code == 200, response.text
    page = response.text
    assert hint_after_table(page) == UNAVAILABLE_NOTE
    assert model_rows(page) == []
    assert '<h1 id="key-name">alice</h1>' in page and '<table id="periods">' in page
    assert 'id="error"' not in page
    for text in (page, caplog.text):
        assert "Traceback" not in text
        assert PASSWORD not in text
        assert url not in text and url.partition("@")[2] not in text
    assert "127.0.0.1" not in page and "psycopg" not in page.lower()
    assert "dashboard: the ledger database failed" in caplog.text
    for record in caplog.records:
        assert record.exc_info is None and record.exc_text is None, record.getMessage()
        assert PASSWORD not in record.getMessage()
        assert PASSWORD not in repr(record.args)
