"""GET /api/spend against a real PostgreSQL (the ledger) and both stores, and the lifetime
`total_spent` of /api/usage rows."""

from __future__ import annotations

import dataclasses
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from gateway.config.ledger import LedgerSettings
from gateway.config.settings import Settings
from gateway.http import spend
from gateway.ledger import db, queries
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.store.ledger import LedgerEntry
from tests.conftest import bearer, client_for, free_port, new_key
from tests.http.test_management import CHAT, gw, mgmt_secret
from tests.openapi_check import check

_ids = itertools.count(1)


def us(iso: str) -> int:
    """'2026-11-02T10:00:00.000001' (UTC) as Redis-time microseconds, exactly."""
    moment = datetime.fromisoformat(iso).replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def row(account: str, key: str, model: str, settled_us: int, cost: int, prompt: int = 10,
        completion: int = 3) -> LedgerEntry:
    n = next(_ids)
    return LedgerEntry(f"{settled_us // 1000}-{n}", f"req-{n}", account, key,
                       "/v1/chat/completions", model, prompt, 0, completion, cost, 200,
                       settled_us - 1000, settled_us)


async def ledger(url: str, entries: list[LedgerEntry]) -> None:
    async with db.connection(url) as conn:
        await db.migrate(conn)
        await db.insert(conn, entries)


def with_ledger(settings: Settings, url: str | None) -> Settings:
    return dataclasses.replace(settings, ledger=LedgerSettings(postgres_url=url))


async def get(client: httpx.AsyncClient, secret: str, query: str = "") -> httpx.Response:
    response = await client.get(f"/api/spend{query}", headers=bearer(secret))
    check(response)
    return response


def lines(response: httpx.Response) -> dict[str, tuple[int, int, int, float]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    return {d["group"]: (d["requests"], d["promptTokens"], d["completionTokens"], d["costUsd"])
            for d in body["data"]}


NOVEMBER = "?from=2026-11-01&to=2026-11-06"


async def test_spend_by_key_model_and_day_sums_exactly_and_only_the_callers_rows(
        store: Store, settings: Settings, metrics: Metrics, postgres_url: str) -> None:
    _, k1, account = await new_key(store, settings, name="k1")
    _, k2, _ = await new_key(store, settings, account=account, name="k2", credit=True)
    other = (await store.create_account("other")).id
    await ledger(postgres_url, [
        row(account, k1, "m-a", us("2026-11-02T10:00:00"), 1, 7, 1),
        row(account, k1, "m-b", us("2026-11-02T23:59:59.999999"), 333_333, 20, 4),
        row(account, k2, "m-a", us("2026-11-03T00:00:00"), 999_999, 30, 5),
        row(account, k2, "m-a", us("2026-11-05T12:00:00"), 2_500_000, 40, 6),
        # outside [from, to): just before from, exactly at to
        row(account, k1, "m-a", us("2026-10-31T23:59:59.999999"), 50_000_000),
        row(account, k2, "m-b", us("2026-11-06T00:00:00"), 60_000_000),
        # another account's, inside the window, on a model and day the caller also has
        row(other, "k-other", "m-a", us("2026-11-02T12:00:00"), 7_000_000),
    ])
    mk = await mgmt_secret(store, account)
    app = gw(store, with_ledger(settings, postgres_url), metrics)
    async with client_for(app) as client:
        by_key = await get(client, mk, NOVEMBER + "&group_by=key")
        by_model = await get(client, mk, NOVEMBER + "&group_by=model")
        by_day = await get(client, mk, NOVEMBER + "&group_by=day")
        default = await get(client, mk, NOVEMBER)
    assert lines(by_key) == {k1: (2, 27, 5, 0.333334), k2: (2, 70, 11, 3.499999)}
    assert lines(by_model) == {"m-a": (3, 77, 12, 3.5), "m-b": (1, 20, 4, 0.333333)}
    assert lines(by_day) == {"2026-11-02": (2, 27, 5, 0.333334),
                             "2026-11-03": (1, 30, 5, 0.999999),
                             "2026-11-05": (1, 40, 6, 2.5)}
    assert [d["group"] for d in by_day.json()["data"]] == ["2026-11-02", "2026-11-03",
                                                           "2026-11-05"]
    for response in (by_key, by_model, by_day):
        assert response.json()["totalCostUsd"] == 3_833_333 / 1_000_000
    assert default.json() == by_key.json()  # group_by defaults to key
    assert "k-other" not in by_key.text
    assert by_key.headers["x-ratelimit-remaining-requests"] == "11"


async def test_another_accounts_spend_is_never_shown(
        store: Store, settings: Settings, metrics: Metrics, postgres_url: str) -> None:
    _, _, account = await new_key(store, settings)
    other = (await store.create_account("other")).id
    await ledger(postgres_url, [row(other, "k-other", "m", us("2026-11-02T10:00:00"), 5)])
    mk, other_mk = await mgmt_secret(store, account), await mgmt_secret(store, other)
    async with client_for(gw(store, with_ledger(settings, postgres_url), metrics)) as client:
        mine = await get(client, mk, NOVEMBER)
        theirs = await get(client, other_mk, NOVEMBER)
    assert mine.json() == {"success": True, "data": [], "totalCostUsd": 0}
    assert lines(theirs) == {"k-other": (1, 10, 3, 0.000005)}


@pytest.mark.parametrize("query,expected", [
    ("from=2026-11-02T10:00:00", 4),  # naive: UTC, and from is inclusive
    ("from=2026-11-02T10:00:00.000001", 3),
    ("from=2026-11-02T11:00:00%2B01:00", 4),  # an offset: 10:00 UTC
    ("from=2026-11-02T11:00:00+01:00", 4),  # the same, its '+' not encoded
    ("from=2026-11-02T05:00:00.000001-05:00", 3),
    ("from=20261102T100000Z", 4),  # ISO 8601's basic format
])
async def test_from_forms(store: Store, settings: Settings, metrics: Metrics,
                          postgres_url: str, query: str, expected: int) -> None:
    _, key, account = await new_key(store, settings)
    await ledger(postgres_url, [
        row(account, key, "m", us("2026-11-02T10:00:00"), 1),
        row(account, key, "m", us("2026-11-02T23:59:59.999999"), 1),
        row(account, key, "m", us("2026-11-03T00:00:00"), 1),
        row(account, key, "m", us("2026-11-05T00:00:00"), 1),
    ])
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, with_ledger(settings, postgres_url), metrics)) as client:
        response = await get(client, mk, f"?{query}&to=2026-12-01")
        days = [await get(client, mk, f"?from=2026-11-02&to={to}") for to in (
            "2026-11-03", "2026-11-03T00:00:00.000001Z", "2026-11-02")]
    assert sum(n for n, *_ in lines(response).values()) == expected
    # Dates are 00:00 UTC and to is exclusive; from == to is an empty window, not an error.
    assert [sum(n for n, *_ in lines(d).values()) for d in days] == [2, 3, 0]


async def test_the_default_window_is_the_last_30_days(
        store: Store, settings: Settings, metrics: Metrics, postgres_url: str) -> None:
    _, key, account = await new_key(store, settings)
    now = int(time.time() * 1_000_000)
    day = 86_400 * 1_000_000
    await ledger(postgres_url, [row(account, key, "recent", now - day, 1),
                                row(account, key, "old", now - 31 * day, 1),
                                row(account, key, "future", now + day, 1)])
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, with_ledger(settings, postgres_url), metrics)) as client:
        response = await get(client, mk, "?group_by=model")
        until = await get(client, mk, "?group_by=model&to=" + datetime.fromtimestamp(
            (now - 30 * day) / 1e6, UTC).isoformat().replace("+00:00", "Z"))
    assert set(lines(response)) == {"recent"}
    assert set(lines(until)) == {"old"}  # from defaults to 30 days before to


@pytest.mark.parametrize("query,named", [
    ("?from=yesterday", "from"),
    ("?from=", "from"),
    ("?to=2026-13-01", "to"),
    ("?to=2026-11", "to"),
    ("?from=2026-11-05&to=2026-11-01", "from must not be after to"),
    ("?from=2024-01-01&to=2025-01-01T00:00:00.000001", "at most 366 days"),
    ("?from=2026-11-01&from=2026-11-02", "from is given more than once"),
    ("?group_by=week", "group_by"),
    ("?group_by=", "group_by"),
    ("?group_by=KEY", "group_by"),
    ("?to=0001-01-05", "to is too early"),  # the default from would be before year 1 (QA)
    ("?to=0001-01-01T00:00:00%2B00:00", "to is too early"),
])
async def test_bad_parameters_are_400_naming_them_and_cost_nothing(
        store: Store, settings: Settings, metrics: Metrics, postgres_url: str, query: str,
        named: str) -> None:
    _, _, account = await new_key(store, settings)
    await ledger(postgres_url, [])
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, with_ledger(settings, postgres_url), metrics)) as client:
        bad = await get(client, mk, query)
        good = await get(client, mk, "?from=2024-01-01&to=2025-01-01&unknown=ignored")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"
    assert named in bad.json()["error"]["message"]
    assert good.status_code == 200  # a leap year's 366 days are allowed
    assert good.headers["x-ratelimit-remaining-requests"] == "11"  # the 400 was not counted


async def test_postgres_unreachable_is_503_without_the_url(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    _, _, account = await new_key(store, settings)
    mk = await mgmt_secret(store, account)
    url = f"postgresql://gw:s3cret-pass@127.0.0.1:{free_port()}/ledger"
    async with client_for(gw(store, with_ledger(settings, url), metrics)) as client:
        started = time.monotonic()
        down = await get(client, mk, NOVEMBER)
        elapsed = time.monotonic() - started
    assert down.status_code == 503, down.text
    error = down.json()["error"]
    assert error["code"] == "ledger_unavailable" and error["type"] == "api_error"
    assert "unavailable" in error["message"] and "configured" not in error["message"]
    assert "s3cret" not in down.text and "127.0.0.1" not in down.text
    assert "s3cret" not in caplog.text and "ledger database failed" in caplog.text
    assert down.headers["x-ratelimit-remaining-requests"] == "11"
    assert elapsed < 5  # a closed port is refused at once


async def test_no_ledger_configured_is_503_saying_so(store: Store, settings: Settings,
                                                     metrics: Metrics) -> None:
    _, _, account = await new_key(store, settings)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, with_ledger(settings, None), metrics)) as client:
        response = await get(client, mk, NOVEMBER)
        bad = await get(client, mk, "?group_by=week")
        usage = await client.get("/api/usage", headers=bearer(mk))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "ledger_unavailable"
    assert "none is configured" in response.json()["error"]["message"]
    assert "x-ratelimit-remaining-requests" not in response.headers
    assert usage.headers["x-ratelimit-remaining-requests"] == "11"  # neither was counted
    assert bad.status_code == 400  # the query is checked first either way


async def test_spend_shares_the_usage_allowance_and_needs_a_management_key(
        store: Store, settings: Settings, metrics: Metrics, postgres_url: str) -> None:
    _, _, account = await new_key(store, settings)
    await ledger(postgres_url, [])
    mk = await mgmt_secret(store, account)
    app = gw(store, with_ledger(settings, postgres_url), metrics)
    app.endpoints.management.usage_capacity = 2
    async with client_for(app) as client:
        usage = await client.get("/api/usage", headers=bearer(mk))
        first = await get(client, mk, NOVEMBER)
        limited = await get(client, mk, NOVEMBER)
        anonymous = await client.get("/api/spend")
        wrong = await get(client, "mk_" + "x" * 40, NOVEMBER)
        posted = await client.post("/api/spend", headers=bearer(mk))
    assert usage.status_code == first.status_code == 200
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    check(anonymous)
    assert anonymous.status_code == wrong.status_code == 401
    check(posted)
    assert posted.status_code == 405 and posted.headers["allow"] == "GET"


def test_the_groups_are_the_ledgers() -> None:
    assert spend.GROUPS == queries.GROUPS


# -- total_spent in /api/usage -------------------------------------------------------------


async def test_usage_rows_carry_the_lifetime_total_spent(store: Store, settings: Settings,
                                                         metrics: Metrics) -> None:
    secret, key_id, account = await new_key(store, settings)
    _, idle_id, _ = await new_key(store, settings, account=account, name="idle", credit=True)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        for _ in range(3):
            ok = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
            assert ok.status_code == 200
        single = await client.get(f"/api/usage/{key_id}", headers=bearer(mk))
        listing = await client.get("/api/usage", headers=bearer(mk))
    for response in (single, listing):
        check(response)
    record = await store.get_key(key_id)
    assert record is not None and record.total_spent > 0
    assert single.json()["total_spent"] == record.total_spent / 1_000_000
    rows: dict[str, Any] = {r["id"]: r for r in listing.json()["data"]}
    assert rows[key_id] == single.json()
    assert rows[idle_id]["total_spent"] == 0
