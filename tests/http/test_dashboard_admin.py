"""The operator's dashboard (/dashboard/admin, docs/dashboard.md "The operator view")
through GatewayMiddleware with httpx, on a real redis-server and on the Redis Cluster:
404 without an operator token, sign-in and its limit, what the page shows (accounts with
credits and spend, keys by spend in the last hour), the changes (credits with their reason,
renew, deactivate), CSRF and Origin, account sessions kept out, escaping, headers."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from tests.conftest import bearer, client_for, new_key
from tests.http.test_dashboard import (
    CHAT,
    CSP,
    CSRF,
    account_with_mk,
    app,
    cell,
    session_cookie,
    sign_in,
)
from tests.redis_inspect import redis_of

TOKEN = "operator-token-0123456789"


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def op_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=TOKEN)


async def admin_sign_in(client: httpx.AsyncClient) -> str:
    """Signs the operator in; returns the session's CSRF token (read from the page)."""
    response = await client.post("/dashboard/admin/signin", data={"token": TOKEN})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/dashboard/admin"
    page = await client.get("/dashboard/admin")
    assert page.status_code == 200
    found = CSRF.search(page.text)
    assert found is not None
    return found.group(1)


def table(html: str, table_id: str) -> str:
    found = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
    assert found is not None, table_id
    return found.group(1)


async def test_without_an_operator_token_every_admin_path_is_404(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    assert settings.admin_token is None
    _, key_id, account_id, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        await sign_in(client, mk)  # not even an account session opens them
        for method, path in (("GET", "/dashboard/admin"), ("GET", "/dashboard/admin/"),
                             ("GET", "/dashboard/admin/signin"),
                             ("POST", "/dashboard/admin/signin"),
                             ("POST", f"/dashboard/admin/accounts/{account_id}/credits"),
                             ("POST", f"/dashboard/admin/keys/{key_id}/deactivate"),
                             ("GET", "/dashboard/admin/anything")):
            response = await client.request(method, path, data={"token": "x"})
            assert response.status_code == 404, (method, path)
            assert response.headers["content-security-policy"] == CSP


async def test_signin_wrong_token_401_then_accounts_with_credits_and_spend(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, _ = await account_with_mk(store, op_settings, "acme")
    async with client_for(app(store, op_settings, metrics)) as client:
        assert (await client.get("/dashboard/admin")).headers["location"] == \
            "/dashboard/admin/signin"
        form = await client.get("/dashboard/admin/signin")
        assert form.status_code == 200
        assert '<form id="admin-signin" method="post" action="/dashboard/admin/signin">' \
            in form.text
        assert '<input id="token" name="token" type="password"' in form.text
        wrong = await client.post("/dashboard/admin/signin", data={"token": TOKEN + "x"})
        assert wrong.status_code == 401 and 'id="error"' in wrong.text
        assert "set-cookie" not in wrong.headers
        assert (await client.post("/dashboard/admin/signin",
                                  data={"token": ""})).status_code == 401
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))).status_code == 200
        response = await client.post("/dashboard/admin/signin", data={"token": TOKEN})
        cookie = session_cookie(response)
        parts = [p.strip() for p in cookie.split(";")]
        name, _, token = parts[0].partition("=")
        assert name == "gw_admin" and TOKEN not in cookie
        assert {"HttpOnly", "SameSite=Strict", "Path=/dashboard/admin"} <= set(parts)
        stored = await redis_of(store).get(Names.dash_admin_session(
            hashlib.sha256(token.encode()).hexdigest()))
        assert stored.decode().startswith("operator ") and TOKEN not in stored.decode()
        page = await client.get("/dashboard/admin")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store"
    html = page.text
    account = await store.get_account(account_id)
    [spent] = [k.total_spent for k in await store.list_keys(account_id)]
    assert spent > 0
    row = f'data-account-id="{account_id}"'
    assert cell(html, row, "name") == "acme"
    assert cell(html, row, "credits") == f"${account.credits / 1e6:.6f}"
    assert cell(html, row, "spend") == f"${spent / 1e6:.6f}"
    top = table(html, "top-spend")
    assert re.findall(r'<tr data-key-id="([^"]+)">', top) == [key_id]
    assert cell(top, f'data-key-id="{key_id}"', "spend-1h") == f"${spent / 1e6:.6f}"
    assert 'id="admin-signout"' in html
    assert f'action="/dashboard/admin/accounts/{account_id}/credits"' in html


async def test_add_credits_renew_and_deactivate(store: Store, op_settings: Settings,
                                                metrics: Metrics) -> None:
    secret, key_id, account_id, _ = await account_with_mk(store, op_settings, "acme")
    _, plan_id, _ = await new_key(store, op_settings, account="acme", name="sub", plan="pro")
    before = await store.get_account(account_id)
    expiry = (await store.get_key(plan_id)).expires_at_us
    assert expiry is not None
    async with client_for(app(store, op_settings, metrics)) as client:
        csrf = await admin_sign_in(client)
        page = (await client.get("/dashboard/admin")).text
        assert f'action="/dashboard/admin/keys/{plan_id}/renew"' in page
        assert f'action="/dashboard/admin/keys/{key_id}/deactivate"' in page
        added = await client.post(f"/dashboard/admin/accounts/{account_id}/credits",
                                  data={"csrf": csrf, "usd": "2.5", "reason": "invoice 7"})
        assert added.status_code == 303 and added.headers["location"] == "/dashboard/admin"
        zero = await client.post(f"/dashboard/admin/accounts/{account_id}/credits",
                                 data={"csrf": csrf, "usd": "0", "reason": "x"})
        no_reason = await client.post(f"/dashboard/admin/accounts/{account_id}/credits",
                                      data={"csrf": csrf, "usd": "1", "reason": " "})
        assert zero.status_code == 400 and no_reason.status_code == 400
        renewed = await client.post(f"/dashboard/admin/keys/{plan_id}/renew",
                                    data={"csrf": csrf})
        assert renewed.status_code == 303
        credit_renew = await client.post(f"/dashboard/admin/keys/{key_id}/renew",
                                         data={"csrf": csrf})
        assert credit_renew.status_code == 400 and 'id="error"' in credit_renew.text
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 200
        off = await client.post(f"/dashboard/admin/keys/{key_id}/deactivate",
                                data={"csrf": csrf})
        assert off.status_code == 303
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 403
        after = (await client.get("/dashboard/admin")).text
        missing = await client.post(
            "/dashboard/admin/keys/00000000-0000-0000-0000-000000000000/deactivate",
            data={"csrf": csrf})
        assert missing.status_code == 404
    account = await store.get_account(account_id)
    spent = sum(k.total_spent for k in await store.list_keys(account_id))
    assert account.credits == before.credits + 2_500_000 - spent
    [entry, *_] = await store.credit_log(account_id)
    assert (entry.micro, entry.reason, entry.by) == (2_500_000, "invoice 7", "dashboard")
    renewed_until = (await store.get_key(plan_id)).expires_at_us
    assert renewed_until == expiry + 30 * 86400 * 1_000_000
    assert not (await store.get_key(key_id)).active
    assert cell(table(after, "all-keys"), f'data-key-id="{key_id}"', "status") == "inactive"


async def test_missing_csrf_or_a_foreign_origin_is_403_and_changes_nothing(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, _ = await account_with_mk(store, op_settings, "acme")
    _, plan_id, _ = await new_key(store, op_settings, account="acme", name="sub", plan="pro")
    before = (await store.get_account(account_id), await store.list_keys(account_id))
    attempts: list[tuple[str, dict[str, str]]] = [
        (f"/dashboard/admin/accounts/{account_id}/credits", {"usd": "5", "reason": "x"}),
        (f"/dashboard/admin/keys/{plan_id}/renew", {}),
        (f"/dashboard/admin/keys/{key_id}/deactivate", {}),
        ("/dashboard/admin/signout", {})]
    async with client_for(app(store, op_settings, metrics)) as client:
        csrf = await admin_sign_in(client)
        for token in (None, "", "x" * len(csrf), csrf[:-1]):
            extra: dict[str, Any] = {} if token is None else {"csrf": token}
            for path, data in attempts:
                response = await client.post(path, data={**data, **extra})
                assert response.status_code == 403, (path, token)
                assert 'id="error"' in response.text
        for path, data in attempts:
            response = await client.post(path, data={**data, "csrf": csrf},
                                         headers={"Origin": "http://evil.example"})
            assert response.status_code == 403, path
        assert (await client.get("/dashboard/admin")).status_code == 200  # still signed in
    assert (await store.get_account(account_id), await store.list_keys(account_id)) == before
    assert (await store.credit_log(account_id))[0].reason == "test"
    assert (await store.get_key(key_id)).active
    async with client_for(app(store, op_settings, metrics)) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 200


async def test_an_account_session_never_opens_admin_pages(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    _, key_id, account_id, mk = await account_with_mk(store, op_settings)
    async with client_for(app(store, op_settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        page = await client.get("/dashboard/admin")
        assert page.status_code == 303
        assert page.headers["location"] == "/dashboard/admin/signin"
        changed = await client.post(f"/dashboard/admin/keys/{key_id}/deactivate",
                                    data={"csrf": csrf})
        assert changed.status_code == 403
        # The account session's own token, put in the operator cookie, is no session there.
        token = client.cookies.get("gw_dash")
        assert token
        client.cookies.set("gw_admin", token, domain="gw.local", path="/dashboard/admin")
        assert (await client.get("/dashboard/admin")).status_code == 303
        assert (await client.post(f"/dashboard/admin/accounts/{account_id}/credits",
                                  data={"csrf": csrf, "usd": "5", "reason": "x"})
                ).status_code == 403
        # And an operator session does not open the account dashboard.
        await admin_sign_in(client)
        client.cookies.delete("gw_dash")
        assert (await client.get("/dashboard")).status_code == 303
    assert (await store.get_key(key_id)).active


async def test_signout_ends_the_operator_session_and_a_new_token_ends_them_all(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    async with client_for(app(store, op_settings, metrics)) as client:
        csrf = await admin_sign_in(client)
        out = await client.post("/dashboard/admin/signout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/admin/signin"
        assert (await client.get("/dashboard/admin")).status_code == 303
        await admin_sign_in(client)
        cookies = dict(client.cookies)
    rotated = replace(op_settings, admin_token=TOKEN + "-new")
    async with client_for(app(store, rotated, metrics)) as client:
        for name, value in cookies.items():
            client.cookies.set(name, value, domain="gw.local", path="/dashboard/admin")
        assert (await client.get("/dashboard/admin")).status_code == 303


async def test_the_signin_limit_is_shared_with_the_account_signin(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    async with client_for(app(store, op_settings, metrics)) as client:
        statuses = [(await client.post("/dashboard/signin",
                                       data={"key": "mk_" + "b" * 40})).status_code
                    for _ in range(5)]
        statuses += [(await client.post("/dashboard/admin/signin",
                                        data={"token": "wrong"})).status_code
                     for _ in range(5)]
        refused = await client.post("/dashboard/admin/signin", data={"token": TOKEN})
    assert statuses == [401] * 10
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert "set-cookie" not in refused.headers


async def test_tenant_names_are_escaped(store: Store, op_settings: Settings,
                                        metrics: Metrics) -> None:
    evil = "<script>alert(1)</script>"
    await account_with_mk(store, op_settings, evil)
    _, key_id, _ = await new_key(store, op_settings, account=evil, name='"><img src=x>',
                                 credit=True)
    async with client_for(app(store, op_settings, metrics)) as client:
        await admin_sign_in(client)
        html = (await client.get("/dashboard/admin")).text
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '"><img' not in html and "&quot;&gt;&lt;img src=x&gt;" in html
    assert cell(table(html, "all-keys"), f'data-key-id="{key_id}"', "name") == \
        "&quot;&gt;&lt;img src=x&gt;"


async def test_a_wrong_method_is_405_naming_the_allowed_ones(
        store: Store, op_settings: Settings, metrics: Metrics) -> None:
    _, key_id, account_id, _ = await account_with_mk(store, op_settings)
    async with client_for(app(store, op_settings, metrics)) as client:
        await admin_sign_in(client)
        for method, path, allowed in (
                ("PUT", "/dashboard/admin", "GET, HEAD"),
                ("DELETE", "/dashboard/admin/signin", "GET, POST, HEAD"),
                ("GET", "/dashboard/admin/signout", "POST"),
                ("GET", f"/dashboard/admin/accounts/{account_id}/credits", "POST"),
                ("PATCH", f"/dashboard/admin/keys/{key_id}/renew", "POST")):
            response = await client.request(method, path)
            assert response.status_code == 405, path
            assert response.headers["allow"] == allowed, path
            assert response.headers["content-security-policy"] == CSP
        assert (await client.head("/dashboard/admin")).status_code == 200
