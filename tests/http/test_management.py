"""The management API (/api/usage, /api/keys...) through GatewayMiddleware, on both stores."""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_management_secret
from gateway.core.usage_windows import aggregate
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.management import usage_row
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import KeyRecord, KeyRef, Names, Store, connect
from tests.conftest import bearer, client_for, new_key
from tests.openapi_check import check
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

# The example row of GET /api/usage in the seed document, verbatim.
SEED_ROW: dict[str, Any] = {
    "id": "key-uuid", "name": "user-alice", "type": "subscription", "plan": "pro",
    "isActive": True,
    "usage": {
        "last1h": {"requests": 3, "tokens": 8200, "promptTokens": 7800,
                   "completionTokens": 400},
        "last24h": {"requests": 45, "tokens": 128000, "promptTokens": 120000,
                    "completionTokens": 8000},
        "last7d": {"requests": 312, "tokens": 890000, "promptTokens": 840000,
                   "completionTokens": 50000},
        "last30d": {"requests": 1287, "tokens": 35895828, "promptTokens": 35634452,
                    "completionTokens": 261376},
    },
    "subscription": {"status": "active", "expiresAt": "2026-04-23T15:12:31.565Z"},
    "createdAt": "2026-03-05T13:29:01.800Z",
}


def shape(value: Any) -> Any:
    """Field names, nesting and JSON types, without the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


async def mgmt_secret(store: Store, account_id: str) -> str:
    secret = new_management_secret()
    await store.create_mgmt_key(account_id, hash_secret(secret))
    return secret


def gw(store: Store, settings: Settings, metrics: Metrics, **kw: Any) -> GatewayMiddleware:
    return GatewayMiddleware(MockUpstream(), settings=settings, store=store, metrics=metrics,
                             **kw)


async def get(client: httpx.AsyncClient, path: str, secret: str) -> httpx.Response:
    response = await client.get(path, headers=bearer(secret))
    check(response)
    return response


async def test_usage_counts_settled_traffic_only(store: Store, settings: Settings,
                                                 metrics: Metrics) -> None:
    secret, key_id, account = await new_key(store, settings, name="alice", rpm=4)
    _, idle_id, _ = await new_key(store, settings, account=account, name="idle", credit=True)
    mk = await mgmt_secret(store, account)
    auth = bearer(secret)
    async with client_for(gw(store, settings, metrics)) as client:
        ok = [
            await client.post("/v1/chat/completions", json=CHAT, headers=auth),  # 10 + 8
            await client.post("/v1/chat/completions", headers=auth,  # streamed: 10 + 5
                              json={**CHAT, "max_tokens": 5, "stream": True}),
            await client.post("/v1/embeddings", headers=auth,  # 5 + 0
                              json={"model": "m", "input": "y" * 20}),
            await client.post("/v1/completions", headers=auth,  # 3 + 4
                              json={"model": "m", "prompt": "z" * 12, "max_tokens": 4}),
        ]
        assert [r.status_code for r in ok] == [200, 200, 200, 200]
        assert "data: [DONE]" in ok[1].text
        rejected = [
            await client.post("/v1/chat/completions", content=b"nope", headers=auth),
            await client.post("/v1/chat/completions", json=CHAT, headers=auth),  # rpm 4 spent
            await client.post("/v1/chat/completions", json=CHAT,
                              headers=bearer("sk_live_" + "q" * 40)),
        ]
        assert [r.status_code for r in rejected] == [400, 429, 401]
        listing = (await get(client, "/api/usage", mk)).json()
    assert listing["success"] is True
    rows = {row["id"]: row for row in listing["data"]}
    assert set(rows) == {key_id, idle_id}
    expected = {"requests": 4, "tokens": 45, "promptTokens": 28, "completionTokens": 17}
    assert rows[key_id]["usage"] == {p: expected for p in ("last1h", "last24h", "last7d",
                                                           "last30d")}
    zero = {"requests": 0, "tokens": 0, "promptTokens": 0, "completionTokens": 0}
    assert rows[idle_id]["usage"]["last30d"] == zero


async def test_rows_match_the_seed_field_for_field(store: Store, settings: Settings,
                                                   metrics: Metrics) -> None:
    _, sub_id, account = await new_key(store, settings, name="user-alice", plan="pro")
    _, credit_id, _ = await new_key(store, settings, account=account, name="c", credit=True)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        rows = {r["id"]: r for r in (await get(client, "/api/usage", mk)).json()["data"]}
        single = (await get(client, f"/api/usage/{sub_id}", mk)).json()
    sub, credit = rows[sub_id], rows[credit_id]
    # The seed's fields in its order, then the lifetime spend added after them (issue 14).
    assert list(sub) == [*SEED_ROW, "total_spent"]
    assert shape({k: v for k, v in sub.items() if k != "total_spent"}) == shape(SEED_ROW)
    assert single == sub
    assert sub["plan"] == "pro" and sub["type"] == "subscription" and sub["isActive"] is True
    assert sub["subscription"]["status"] == "active"
    assert ISO_MS.match(sub["createdAt"]) and ISO_MS.match(sub["subscription"]["expiresAt"])
    assert credit["plan"] == "credits" and credit["type"] == "credit"
    assert "subscription" not in credit
    assert list(credit) == [*(f for f in SEED_ROW if f != "subscription"), "total_spent"]


async def test_expired_subscription_is_reported(store: Store, settings: Settings,
                                                metrics: Metrics) -> None:
    _, key_id, account = await new_key(store, settings, expires_at="2030-01-01T00:00:00Z")
    # A key cannot be created expired: it lapses (2020-01-01, by hand, as time would).
    await redis_of(store).hset(Names.key(account, key_id), "expires_at", 1577836800000000)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        row = (await get(client, f"/api/usage/{key_id}", mk)).json()
    assert row["subscription"] == {"status": "expired", "expiresAt": "2020-01-01T00:00:00.000Z"}


async def test_single_key_errors(store: Store, settings: Settings, metrics: Metrics) -> None:
    _, _, account = await new_key(store, settings)
    other = (await store.create_account("other")).id
    _, foreign_id, _ = await new_key(store, settings, account=other)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        unknown = await get(client, f"/api/usage/{uuid.uuid4()}", mk)
        foreign = await get(client, f"/api/usage/{foreign_id}", mk)
        malformed = await get(client, "/api/usage/not-a-uuid", mk)
    assert unknown.status_code == foreign.status_code == 404
    assert unknown.json() == foreign.json()  # nothing tells the two apart
    assert foreign.json()["error"]["code"] == "key_not_found"
    assert malformed.status_code == 400
    assert "keyId" in malformed.json()["error"]["message"]


async def test_usage_is_limited_to_12_per_12_hours(store: Store, settings: Settings,
                                                   metrics: Metrics) -> None:
    _, key_id, account = await new_key(store, settings)
    mk = await mgmt_secret(store, account)
    second = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        remaining = []
        for i in range(12):
            path = "/api/usage" if i % 2 else f"/api/usage/{key_id}"
            response = await get(client, path, mk)
            assert response.status_code == 200
            remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == list(range(11, -1, -1))
        for path in ("/api/usage", f"/api/usage/{key_id}"):
            limited = await get(client, path, mk)
            assert limited.status_code == 429
            assert limited.json()["error"]["code"] == "rate_limit_exceeded"
            # One request refills every hour; the 12 above took far less than 100 s.
            assert 3500 <= int(limited.headers["retry-after"]) <= 3600
        # The allowance is per management key; other endpoints are not limited.
        assert (await get(client, "/api/usage", second)).status_code == 200
        assert (await client.get("/api/keys", headers=bearer(mk))).status_code == 200


async def test_a_store_outage_is_502_for_usage_and_503_for_keys(
        tmp_path: Path, settings: Settings, metrics: Metrics) -> None:
    dead = connect(f"unix://{tmp_path}/no-redis.sock", timeout_seconds=0.2)
    token = new_management_secret()
    try:
        async with client_for(gw(dead, settings, metrics)) as client:
            usage = await client.get("/api/usage", headers=bearer(token))
            keys = await client.get("/api/keys", headers=bearer(token))
    finally:
        await dead.close()
    check(usage)
    assert usage.status_code == 502 and usage.json()["error"]["code"] == "usage_unavailable"
    check(keys)
    assert keys.status_code == 503 and keys.json()["error"]["code"] == "store_unavailable"


async def test_the_authorization_scheme_is_case_insensitive(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, account = await new_key(store, settings)
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        for scheme in ("bearer", "BEARER"):
            chat = await client.post("/v1/chat/completions", json=CHAT,
                                     headers={"Authorization": f"{scheme} {secret}"})
            assert chat.status_code == 200, scheme
            keys = await client.get("/api/keys", headers={"Authorization": f"{scheme} {mk}"})
            assert keys.status_code == 200, scheme


async def test_openapi_document_is_get_only(store: Store, settings: Settings,
                                            metrics: Metrics) -> None:
    async with client_for(gw(store, settings, metrics)) as client:
        posted = await client.post("/openapi.json", json={})
        got = await client.get("/openapi.json")
    assert posted.status_code == 405 and posted.headers["allow"] == "GET"
    assert got.status_code == 200


async def test_dashboard_sessions_of_one_account_share_one_allowance(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, _, account = await new_key(store, settings)
    sessions = {f"sess-{i}": account for i in range(13)}
    async with client_for(gw(store, settings, metrics, verifier=sessions.get)) as client:
        # Every login is a new token; the allowance is the account's, not the token's.
        statuses = [(await get(client, "/api/usage", token)).status_code
                    for token in sessions]
    assert statuses == [200] * 12 + [429]


def test_a_subscription_is_expired_from_its_expiry_instant() -> None:
    expires = 1_700_000_000_000_000
    record = KeyRecord(id=str(uuid.uuid4()), account_id="a", name="n", key_type="subscription",
                       plan="pro", active=True, created_at_us=0, expires_at_us=expires,
                       rpm=1, tpm=1, budget_limit=None, budget_duration=86400, spent=0,
                       resets_at_us=0, total_spent=0)
    assert usage_row(record, {}, expires - 1)["subscription"]["status"] == "active"
    assert usage_row(record, {}, expires)["subscription"]["status"] == "expired"


async def test_authentication(store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, account = await new_key(store, settings)
    mk = await mgmt_secret(store, account)
    revoked = new_management_secret()
    revoked_key = await store.create_mgmt_key(account, hash_secret(revoked))
    async with client_for(gw(store, settings, metrics)) as client:
        assert (await get(client, "/api/usage", revoked)).status_code == 200
        await store.revoke_mgmt_key(revoked_key.id)
        for headers in ({}, {"Authorization": "Bearer"}, bearer("mk_short"), bearer(secret),
                        bearer("mk_" + "a" * 40), bearer(revoked), {"Authorization": mk}):
            for method, path in (("GET", "/api/usage"), ("GET", "/api/keys"),
                                 ("POST", "/api/keys"), ("GET", f"/api/usage/{uuid.uuid4()}")):
                response = await client.request(method, path, headers=headers, json={})
                check(response)
                assert response.status_code == 401, (headers, path)
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert mk not in response.text and secret not in response.text
        assert [k.id for k in await store.list_mgmt_keys(account)] != [revoked_key.id]


async def test_pluggable_session_verifier(store: Store, settings: Settings,
                                          metrics: Metrics) -> None:
    _, key_id, account = await new_key(store, settings)
    sessions = {"sess-sync": account, "sess-ghost": "no-such-account"}

    async def verify(token: str) -> str | None:
        if token == "sess-broken":
            raise RuntimeError("login service down")
        return sessions.get(token)

    for verifier in (verify, sessions.get):
        async with client_for(gw(store, settings, metrics, verifier=verifier)) as client:
            ok = await get(client, "/api/usage", "sess-sync")
            assert ok.status_code == 200
            assert [r["id"] for r in ok.json()["data"]] == [key_id]
            assert (await get(client, "/api/usage", "sess-unknown")).status_code == 401
            assert (await get(client, "/api/usage", "sess-ghost")).status_code == 401
    async with client_for(gw(store, settings, metrics, verifier=verify)) as client:
        broken = await client.get("/api/keys", headers=bearer("sess-broken"))
    assert broken.status_code == 503
    assert broken.json()["error"]["code"] == "auth_unavailable"


async def test_a_failing_verifier_never_logs_the_session_token(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    token = "sess-" + "S3cr3t" * 6

    def verify(presented: str) -> str | None:
        raise RuntimeError("login service down")

    caplog.set_level(logging.DEBUG, logger="gateway")
    async with client_for(gw(store, settings, metrics, verifier=verify)) as client:
        response = await client.get("/api/keys", headers=bearer(token))
    assert response.status_code == 503
    assert "login service down" in caplog.text  # the failure is logged, with its cause
    assert token not in caplog.text and token not in response.text


async def test_accounts_are_isolated_on_every_endpoint(store: Store, settings: Settings,
                                                       metrics: Metrics) -> None:
    secret_a, key_a, account_a = await new_key(store, settings, name="a-key")
    account_b = (await store.create_account("b")).id
    _, key_b, _ = await new_key(store, settings, account=account_b, name="b-key")
    mk_b = await mgmt_secret(store, account_b)
    auth = bearer(mk_b)
    async with client_for(gw(store, settings, metrics)) as client:
        usage = (await get(client, "/api/usage", mk_b)).json()["data"]
        assert [r["id"] for r in usage] == [key_b]
        keys = (await client.get("/api/keys", headers=auth)).json()
        assert [k["id"] for k in keys] == [key_b]
        attempts = [
            await client.get(f"/api/usage/{key_a}", headers=auth),
            await client.get(f"/api/keys/{key_a}", headers=auth),
            await client.patch(f"/api/keys/{key_a}", headers=auth,
                               json={"isActive": False, "name": "pwned"}),
            await client.post(f"/api/keys/{key_a}/rotate", headers=auth),
        ]
        for response in attempts:
            check(response)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "key_not_found"
        still = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret_a))
        assert still.status_code == 200
    record = await store.account_key(account_a, key_a)
    assert record is not None and record.name == "a-key" and record.active


async def test_create_patch_and_rotate(store: Store, settings: Settings,
                                       metrics: Metrics) -> None:
    account = (await store.create_account("acme")).id
    mk = await mgmt_secret(store, account)
    auth = bearer(mk)
    async with client_for(gw(store, settings, metrics)) as client:
        created = await client.post("/api/keys", headers=auth, json={
            "name": "svc", "plan": "standard", "rpm": 30, "budget": "10.50",
            "budget_duration": "7d", "expires_in": "2d"})
        check(created)
        assert created.status_code == 201
        doc = created.json()
        key_id, old = doc["id"], doc["key"]
        assert doc["account_id"] == account and doc["rate_limits"] == {"rpm": 30, "tpm": 3333}
        assert doc["budget"]["limit"] == 10.5 and doc["budget"]["duration"] == "7d"
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(old))).status_code == 200

        rotated = await client.post(f"/api/keys/{key_id}/rotate", headers=auth)
        check(rotated)
        new = rotated.json()["key"]
        assert new != old and rotated.json()["id"] == key_id
        for path in ("/v1/chat/completions", "/v1/usage"):
            stale = await client.request("POST" if "chat" in path else "GET", path,
                                         json=CHAT, headers=bearer(old))
            assert stale.status_code == 401, path
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(new))).status_code == 200
        # The old secret no longer names the key at all: its index entry is gone.
        assert await store.lookup(hash_secret(old)) is None
        assert await store.lookup(hash_secret(new)) == KeyRef(account, key_id)

        patched = await client.patch(f"/api/keys/{key_id}", headers=auth,
                                     json={"isActive": False, "name": "svc-2"})
        check(patched)
        assert patched.json()["is_active"] is False and patched.json()["name"] == "svc-2"
        denied = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(new))
        assert denied.status_code == 403
        row = (await get(client, f"/api/usage/{key_id}", mk)).json()
        assert row["isActive"] is False and row["name"] == "svc-2"
        assert row["usage"]["last1h"]["requests"] == 2  # one per secret; the 401/403 are not

        credit = await client.post("/api/keys", headers=auth, json={"name": "c", "credit": True,
                                                                    "budget": 5})
        check(credit)
        assert credit.status_code == 201 and credit.json()["type"] == "credit"
        listed = await client.get("/api/keys", headers=auth)
        check(listed)
        assert {k["id"] for k in listed.json()} == {key_id, credit.json()["id"]}
        assert all("key" not in k for k in listed.json())


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": "", "plan": "standard"}, "name"),
    ({"name": 5, "plan": "standard"}, "name"),
    ({"name": "x"}, "plan"),
    ({"name": "x", "plan": "standard", "credit": True}, "credit"),
    ({"name": "x", "plan": "gold"}, "plan"),
    ({"name": "x", "credit": "yes"}, "credit"),
    ({"name": "x", "credit": True, "rpm": 0}, "rpm"),
    ({"name": "x", "credit": True, "tpm": "many"}, "tpm"),
    ({"name": "x", "credit": True, "rpm": True}, "rpm"),
    ({"name": "x", "credit": True, "budget": -1}, "budget"),
    ({"name": "x", "credit": True, "budget": "ten"}, "budget"),
    ({"name": "x", "credit": True, "budget": 1e300}, "budget"),
    ({"name": "x", "credit": True, "budget": 1_000_000_001}, "budget"),
    ({"name": "x" * 201, "credit": True}, "name"),
    ({"name": "ctl\x01\x1b[31mred", "credit": True}, "printable"),
    ({"name": "\u202eevil", "credit": True}, "printable"),  # a bidirectional override
    ({"name": "a\r\nSet-Cookie: x=1", "credit": True}, "printable"),
    ({"name": "x", "credit": True, "budget_duration": "monthly"}, "budget_duration"),
    ({"name": "x", "credit": True, "budget_duration": "99999d"}, "budget_duration"),
    ({"name": "x", "plan": "pro", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "x", "plan": "pro", "expires_at": "2020-01-01T00:00:00Z"}, "in the past"),
    ({"name": "x", "plan": "pro", "expires_at": "0001-01-01T00:00:00+01:00"}, "expires_at"),
    ({"name": "x", "plan": "pro", "expires_in": "1d", "expires_at": "2030-01-01"}, "expires_at"),
    ({"name": "x", "credit": True, "expires_in": "1d"}, "expires_in"),
    ({"name": "x", "credit": True, "colour": "red"}, "colour"),
])
async def test_create_validation_names_the_field(store: Store, settings: Settings,
                                                 metrics: Metrics, body: dict[str, Any],
                                                 field: str) -> None:
    account = (await store.create_account("acme")).id
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        response = await client.post("/api/keys", headers=bearer(mk), json=body)
    check(response)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert field in response.json()["error"]["message"]
    assert await store.list_keys(account) == []


@pytest.mark.parametrize("field, value", [
    ("max_concurrent", 2), ("models", ["m"]), ("budget_windows", ["5/1d"])])
async def test_a_customer_cannot_set_the_operators_limits(
        store: Store, settings: Settings, metrics: Metrics, field: str, value: Any) -> None:
    """POST /admin/keys takes these; POST /api/keys (an mk_ key) does not."""
    account = (await store.create_account("acme")).id
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        response = await client.post("/api/keys", headers=bearer(mk),
                                     json={"name": "x", "credit": True, field: value})
    check(response)
    assert response.status_code == 400, response.text
    assert f"unknown field {field!r}" in response.json()["error"]["message"]
    assert await store.list_keys(account) == []


async def test_patch_and_body_errors(store: Store, settings: Settings, metrics: Metrics) -> None:
    _, key_id, account = await new_key(store, settings)
    auth = bearer(await mgmt_secret(store, account))
    async with client_for(gw(store, settings, metrics)) as client:
        cases = [
            (await client.patch(f"/api/keys/{key_id}", headers=auth, json={}), 400, "isActive"),
            (await client.patch(f"/api/keys/{key_id}", headers=auth, json={"isActive": 1}),
             400, "isActive"),
            (await client.patch(f"/api/keys/{key_id}", headers=auth, json={"name": ""}),
             400, "name"),
            (await client.patch(f"/api/keys/{key_id}", headers=auth, json={"credits": 5}),
             400, "credits"),
            (await client.patch(f"/api/keys/{key_id}", headers=auth, content=b"[1]"),
             400, "JSON object"),
            (await client.post("/api/keys", headers=auth, content=b"x" * 70_000), 413, "64"),
            (await client.delete(f"/api/keys/{key_id}", headers=auth), 405, "Method"),
            (await client.put("/api/usage", headers=auth), 405, "Method"),
            (await client.get("/api/keys/nope", headers=auth), 400, "keyId"),
        ]
        for response, status, words in cases:
            check(response)
            assert response.status_code == status, response.text
            assert words in response.json()["error"]["message"]
        missing = await client.get("/api/nothing-here", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_usage_windows_read_from_redis(store: Store) -> None:
    """Counters at known offsets from Redis time land in the right periods."""
    account = (await store.create_account("acme")).id
    record = await store.create_key(
        account_id=account, name="k", key_type="credit", plan="", rpm=1, tpm=1,
        budget_limit=None, budget_duration=60, expires_at_us=None, expires_in_seconds=None,
        secret_hash="0" * 64)
    for _ in range(5):  # retried only if a minute boundary falls between write and read
        now = await store.now_us() // 1_000_000
        minute, hour = now // 60, now // 3600
        for m, n in ((minute - 59, 1), (minute - 60, 2)):
            await redis_of(store).hset(Names.usage_minutes(account, record.id, m // 60),
                                    mapping={f"r{m % 60}": n, f"p{m % 60}": 10 * n})
        for h, n in ((hour - 23, 4), (hour - 24, 8), (hour - 167, 16), (hour - 168, 32),
                     (hour - 719, 64), (hour - 720, 128)):
            await redis_of(store).hset(Names.usage_hours(account, record.id, h // 24),
                                    mapping={f"r{h % 24}": n, f"c{h % 24}": n})
        snapshot = await store.usage_snapshot(account)
        if snapshot.now_us // 60_000_000 == minute:
            break
        await redis_of(store).flushall()
        account = (await store.create_account("acme")).id
        record = await store.create_key(
            account_id=account, name="k", key_type="credit", plan="", rpm=1, tpm=1,
            budget_limit=None, budget_duration=60, expires_at_us=None, expires_in_seconds=None,
            secret_hash="0" * 64)
    [counters] = snapshot.keys
    periods = aggregate(snapshot.now_us // 1_000_000, counters.minute_hashes,
                        counters.hour_hashes)
    assert {k: (w.requests, w.prompt_tokens, w.completion_tokens)
            for k, w in periods.items()} == {
        "last1h": (1, 10, 0), "last24h": (4, 0, 4), "last7d": (28, 0, 28),
        "last30d": (124, 0, 124)}


async def test_usage_read_is_one_pipeline_for_100_keys(redis_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.store import connect

    store = connect(redis_url, timeout_seconds=5.0)
    try:
        account = (await store.create_account("big")).id
        for i in range(100):
            await store.create_key(
                account_id=account, name=f"k{i}", key_type="credit", plan="", rpm=1, tpm=1,
                budget_limit=None, budget_duration=60, expires_at_us=None,
                expires_in_seconds=None, secret_hash=f"{i:064x}")
        await store.usage_snapshot(account)  # loads the scripts
        from gateway.store.resp import _RespProtocol

        writes: list[list[bytes]] = []  # the commands of each write to the socket
        real_flush = _RespProtocol._flush

        def flush(protocol: _RespProtocol) -> None:
            if protocol._outbox:
                writes.append([c.split(b"\r\n")[2] for c in protocol._outbox])
            real_flush(protocol)

        monkeypatch.setattr(_RespProtocol, "_flush", flush)
        snapshot = await store.usage_snapshot(account)
        assert len(snapshot.keys) == 100
        # Two round trips: the key index with Redis time, then every hash in one write.
        assert [set(w) for w in writes] == [{b"EVALSHA"}, {b"HGETALL"}]
        assert len(writes[1]) >= 100
    finally:
        await store.close()


async def test_plan_keys_and_raised_limits_are_the_operators(store: Store) -> None:
    account = await store.create_account("entitled")
    secret = new_management_secret()
    await store.create_mgmt_key(account.id, hash_secret(secret))
    app = GatewayMiddleware(MockUpstream(), settings=Settings(), store=store,
                            metrics=Metrics.create(CollectorRegistry()))
    headers = {"Authorization": f"Bearer {secret}"}
    async with client_for(app) as client:
        plan = await client.post("/api/keys", json={"name": "p", "plan": "pro"},
                                 headers=headers)
        fast = await client.post("/api/keys", json={"name": "c", "credit": True,
                                                    "rpm": 10_000}, headers=headers)
        ok = await client.post("/api/keys", json={"name": "c", "credit": True, "rpm": 10},
                               headers=headers)
    assert plan.status_code == 403
    assert plan.json()["error"]["code"] == "plan_keys_not_allowed"
    assert fast.status_code == 400 and "rpm" in fast.json()["error"]["message"]
    assert ok.status_code == 201 and ok.json()["rate_limits"]["rpm"] == 10


async def test_credit_limits_are_capped_at_the_entitlement_inclusive(store: Store) -> None:
    settings = Settings()
    account = await store.create_account("capped")
    secret = new_management_secret()
    await store.create_mgmt_key(account.id, hash_secret(secret))
    app = GatewayMiddleware(MockUpstream(), settings=settings, store=store,
                            metrics=Metrics.create(CollectorRegistry()))
    rpm, tpm = settings.credit_rpm, settings.credit_tpm
    async with client_for(app) as client:
        greedy = await client.post("/api/keys", json={"name": "t", "credit": True,
                                                      "tpm": tpm + 1}, headers=bearer(secret))
        exact = await client.post("/api/keys", json={"name": "e", "credit": True, "rpm": rpm,
                                                     "tpm": tpm}, headers=bearer(secret))
    check(greedy)
    assert greedy.status_code == 400 and "tpm" in greedy.json()["error"]["message"]
    check(exact)
    assert exact.status_code == 201
    assert exact.json()["rate_limits"] == {"rpm": rpm, "tpm": tpm}


async def test_keys_per_account_are_capped_over_http_and_cli_alike(
        store: Store, metrics: Metrics, store_kind: str, request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url") if store_kind == "redis" else ""
    import asyncio

    from gateway.errors import LimitReached
    from gateway.http.admin import KeySpec, create_key, resolve_account

    settings = Settings(api_plan_keys=True, max_keys_per_account=5)
    account = await resolve_account(store, None)
    # concurrent creations cannot pass the cap together
    results = await asyncio.gather(*(
        create_key(store, settings, account, KeySpec(name=f"k{i}", credit=True))
        for i in range(12)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert all(isinstance(r, LimitReached) for r in results if isinstance(r, BaseException))
    assert len(await store.list_keys(account)) == 5
    mk = await mgmt_secret(store, account)
    async with client_for(gw(store, settings, metrics)) as client:
        over = await client.post("/api/keys", headers=bearer(mk),
                                 json={"name": "one-more", "credit": True})
    assert over.status_code == 403
    assert over.json()["error"]["code"] == "key_limit_reached"
    if store_kind == "redis":
        import subprocess
        import sys

        config = Path(redis_url.removeprefix("unix://")).parent / "cap.toml"
        config.write_text("max_keys_per_account = 5\n")
        cli = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "x",
                              "--credit", "--account", account, "--redis", redis_url,
                              "--config", str(config)], capture_output=True, text=True,
                             timeout=60)
        assert cli.returncode == 1
        assert cli.stderr == ("gateway: error: the account already holds its maximum of 5 "
                              "keys (max_keys_per_account)\n")
