"""The account dashboard (/dashboard, docs/dashboard.md) through GatewayMiddleware with httpx,
on a real redis-server and on the Redis Cluster: sign-in and its limit, the session cookie,
what the pages show (the numbers of /api/usage), the key actions, CSRF, Origin, escaping and
the security headers. The browser tests are tests/dashboard/test_browser.py."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_management_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from gateway.types import Receive, Scope, Send
from tests.conftest import bearer, client_for, new_key, serving
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Upstream:
    """MockUpstream that counts what reaches it."""

    def __init__(self) -> None:
        self.inner = MockUpstream()
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.inner(scope, receive, send)


def app(store: Store, settings: Settings, metrics: Metrics,
        upstream: Upstream | None = None) -> GatewayMiddleware:
    return GatewayMiddleware(upstream or Upstream(), settings=settings, store=store,
                             metrics=metrics)


async def account_with_mk(store: Store, settings: Settings,
                          account: str | None = None) -> tuple[str, str, str, str]:
    """(consumption secret, key id, account id, management secret); the account `account`
    is made when it does not exist."""
    if account is not None and await store.account_by_name(account) is None:
        await store.create_account(account)
    secret, key_id, account_id = await new_key(store, settings, account=account,
                                               name="alice", credit=True)
    await store.add_credits(account_id, 1_000_000, "test", "cli")
    mk = new_management_secret()
    await store.create_mgmt_key(account_id, hash_secret(mk))
    return secret, key_id, account_id, mk


async def sign_in(client: httpx.AsyncClient, mk: str) -> str:
    """Signs in; returns the session's CSRF token (read from the dashboard page)."""
    response = await client.post("/dashboard/signin", data={"key": mk})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/dashboard"
    page = await client.get("/dashboard")
    assert page.status_code == 200
    found = CSRF.search(page.text)
    assert found is not None
    return found.group(1)


def cell(html: str, row_attr: str, cls: str) -> str:
    row = re.search(rf'<tr {row_attr}>(.*?)</tr>', html, re.S)
    assert row is not None, row_attr
    found = re.search(rf'<td class="{cls}">(.*?)</td>', row.group(1), re.S)
    assert found is not None, cls
    return found.group(1)


def svg_attrs(html: str, chart_id: str) -> dict[str, str]:
    found = re.search(rf'<svg id="{chart_id}"([^>]*)>(.*?)</svg>', html, re.S)
    assert found is not None
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', found.group(1)))
    attrs["rects"] = str(found.group(2).count("<rect "))
    return attrs


def session_cookie(response: httpx.Response) -> str:
    [cookie] = [v for k, v in response.headers.multi_items() if k == "set-cookie"]
    return cookie


# -- sign-in ------------------------------------------------------------------------------


async def test_signin_sets_a_strict_httponly_cookie_and_redis_holds_only_its_hash(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, _, account_id, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        form = await client.get("/dashboard/signin")
        assert form.status_code == 200
        assert '<form id="signin" method="post" action="/dashboard/signin">' in form.text
        assert '<input id="key" name="key" type="password"' in form.text
        wrong = await client.post("/dashboard/signin", data={"key": "mk_" + "a" * 40})
        assert wrong.status_code == 401 and 'id="error"' in wrong.text
        assert "set-cookie" not in wrong.headers
        assert (await client.post("/dashboard/signin", data={"key": "nope"})).status_code == 401
        response = await client.post("/dashboard/signin", data={"key": mk})
    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = session_cookie(response)
    parts = [p.strip() for p in cookie.split(";")]
    name, _, token = parts[0].partition("=")
    assert name == "gw_dash" and len(token) >= 40
    assert {"HttpOnly", "SameSite=Strict", "Path=/dashboard"} <= set(parts)
    assert "Secure" not in parts  # plain http
    assert mk not in cookie and mk not in response.headers.get("location", "")
    redis = redis_of(store)
    name_in_redis = Names.dash_session(hashlib.sha256(token.encode()).hexdigest())
    stored = (await redis.get(name_in_redis)).decode()
    assert account_id in stored and token not in stored and mk not in stored
    assert 8 * 3600 - 60 < await redis.ttl(name_in_redis) <= 8 * 3600


async def test_the_cookie_is_secure_over_https(store: Store, settings: Settings,
                                               metrics: Metrics) -> None:
    _, _, _, mk = await account_with_mk(store, settings)
    transport = httpx.ASGITransport(app=app(store, settings, metrics))
    async with httpx.AsyncClient(transport=transport, base_url="https://gw") as client:
        response = await client.post("/dashboard/signin", data={"key": mk})
        assert response.status_code == 303
        assert "Secure" in [p.strip() for p in session_cookie(response).split(";")]
        assert (await client.get("/dashboard")).status_code == 200


async def test_the_eleventh_attempt_in_a_minute_is_429(store: Store, settings: Settings,
                                                       metrics: Metrics) -> None:
    _, _, _, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        statuses = [(await client.post("/dashboard/signin",
                                       data={"key": "mk_" + "b" * 40})).status_code
                    for _ in range(10)]
        refused = await client.post("/dashboard/signin", data={"key": mk})  # even the right one
    assert statuses == [401] * 10
    assert refused.status_code == 429 and 'id="error"' in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "set-cookie" not in refused.headers
    # Another client address has attempts of its own.
    other = httpx.ASGITransport(app=app(store, settings, metrics), client=("10.0.0.9", 1))
    async with httpx.AsyncClient(transport=other, base_url="http://gw") as client:
        assert (await client.post("/dashboard/signin", data={"key": mk})).status_code == 303


async def test_without_a_session_the_pages_redirect_to_signin(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, key_id, _, _ = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        for path in ("/dashboard", f"/dashboard/keys/{key_id}"):
            response = await client.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/dashboard/signin"
        client.cookies.set("gw_dash", "x" * 43, domain="gw.local", path="/dashboard")
        assert (await client.get("/dashboard")).status_code == 303


# -- what the pages show ------------------------------------------------------------------


async def test_the_keys_table_lists_this_accounts_keys_and_no_other(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, key_id, account_id, mk = await account_with_mk(store, settings, "acme")
    _, plan_id, _ = await new_key(store, settings, account="acme", name="sub", plan="pro")
    _, foreign_id, _, _ = await account_with_mk(store, settings, "other")
    await store.add_credits(account_id, 24_000_000, "test", "cli")  # $1 + $24
    async with client_for(app(store, settings, metrics)) as client:
        await sign_in(client, mk)
        page = (await client.get("/dashboard")).text
        foreign = await client.get(f"/dashboard/keys/{foreign_id}")
        nonsense = await client.get("/dashboard/keys/not-a-uuid")
    assert '<h1 id="account">acme</h1>' in page
    assert '<span id="credits">$25.000000</span>' in page
    assert set(re.findall(r'<tr data-key-id="([^"]+)">', page)) == {key_id, plan_id}
    assert foreign_id not in page
    assert cell(page, f'data-key-id="{key_id}"', "plan") == "credits"
    assert cell(page, f'data-key-id="{plan_id}"', "plan") == "pro"
    assert cell(page, f'data-key-id="{plan_id}"', "rpm") == "200"
    assert cell(page, f'data-key-id="{key_id}"', "status") == "active"
    assert cell(page, f'data-key-id="{key_id}"', "expires") == "never"
    assert f'href="/dashboard/keys/{key_id}"' in page
    assert foreign.status_code == 404 and 'id="error"' in foreign.text
    assert nonsense.status_code == 404


async def test_the_key_page_shows_the_numbers_of_api_usage(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _, mk = await account_with_mk(store, settings)
    sent = 5
    async with client_for(app(store, settings, metrics)) as client:
        for _ in range(sent):
            assert (await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))).status_code == 200
        usage = (await client.get(f"/api/usage/{key_id}", headers=bearer(mk))).json()["usage"]
        await sign_in(client, mk)
        page = (await client.get(f"/dashboard/keys/{key_id}")).text
        listing = (await client.get("/dashboard")).text
    assert '<h1 id="key-name">alice</h1>' in page
    for period, numbers in usage.items():
        row = f'data-period="{period}"'
        assert int(cell(page, row, "requests")) == numbers["requests"] == sent
        assert int(cell(page, row, "tokens")) == numbers["tokens"]
    hourly, daily = svg_attrs(page, "chart-hourly"), svg_attrs(page, "chart-daily")
    assert hourly["rects"] == "24" and daily["rects"] == "30"
    for chart in (hourly, daily):
        assert int(chart["data-requests"]) == sent
        assert int(chart["data-tokens"]) == usage["last24h"]["tokens"]
    assert int(cell(listing, f'data-key-id="{key_id}"', "requests-24h")) == sent
    assert '<table id="spend-by-model">' in page and "data-model=" in page


# -- key actions --------------------------------------------------------------------------


async def test_create_shows_the_secret_once_and_it_works(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, _, account_id, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        made = await client.post("/dashboard/keys", data={"csrf": csrf, "name": "fresh"})
        assert made.status_code == 200
        found = re.search(r'<code id="new-secret">(sk_live_\w+)</code>', made.text)
        assert found is not None
        secret = found.group(1)
        [record] = [r for r in await store.list_keys(account_id) if r.name == "fresh"]
        assert record.key_type == "credit"
        for path in ("/dashboard", f"/dashboard/keys/{record.id}"):
            page = await client.get(path)
            assert secret not in page.text and 'id="new-secret"' not in page.text
        answer = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert answer.status_code == 200


async def test_rotate_retires_the_old_secret(store: Store, settings: Settings,
                                             metrics: Metrics) -> None:
    old, key_id, _, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(old))).status_code == 200
        rotated = await client.post(f"/dashboard/keys/{key_id}/rotate", data={"csrf": csrf})
        assert rotated.status_code == 200
        found = re.search(r'<code id="new-secret">(sk_live_\w+)</code>', rotated.text)
        assert found is not None and found.group(1) != old
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(old))).status_code == 401
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(found.group(1)))).status_code == 200


async def test_rename_deactivate_and_activate(store: Store, settings: Settings,
                                              metrics: Metrics) -> None:
    secret, key_id, account_id, mk = await account_with_mk(store, settings)
    base = f"/dashboard/keys/{key_id}"
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        renamed = await client.post(f"{base}/rename", data={"csrf": csrf, "name": "bob"})
        assert renamed.status_code == 303 and renamed.headers["location"] == base
        assert (await store.account_key(account_id, key_id)).name == "bob"  # type: ignore[union-attr]
        page = (await client.get(base)).text
        assert '<h1 id="key-name">bob</h1>' in page and 'id="deactivate"' in page
        assert (await client.post(f"{base}/deactivate", data={"csrf": csrf})).status_code == 303
        assert cell((await client.get("/dashboard")).text, f'data-key-id="{key_id}"',
                    "status") == "inactive"
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 403
        assert 'id="activate"' in (await client.get(base)).text
        assert (await client.post(f"{base}/activate", data={"csrf": csrf})).status_code == 303
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 200
        empty = await client.post(f"{base}/rename", data={"csrf": csrf, "name": "  "})
        assert empty.status_code == 400 and 'id="error"' in empty.text


# -- attacks ------------------------------------------------------------------------------


async def test_a_missing_or_wrong_csrf_token_is_403_and_changes_nothing(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id, mk = await account_with_mk(store, settings)
    before = await store.list_keys(account_id)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        for token in (None, "", "x" * len(csrf), csrf[:-1]):
            extra: dict[str, Any] = {} if token is None else {"csrf": token}
            for path, data in (("/dashboard/keys", {"name": "evil"}),
                               (f"/dashboard/keys/{key_id}/rename", {"name": "evil"}),
                               (f"/dashboard/keys/{key_id}/deactivate", {}),
                               (f"/dashboard/keys/{key_id}/rotate", {}),
                               ("/dashboard/signout", {})):
                response = await client.post(path, data={**data, **extra})
                assert response.status_code == 403, (path, token)
                assert 'id="error"' in response.text and "new-secret" not in response.text
        assert (await client.get("/dashboard")).status_code == 200  # still signed in
    assert await store.list_keys(account_id) == before
    assert (await store.lookup(hash_secret(secret))) is not None


async def test_a_foreign_origin_is_403(store: Store, settings: Settings,
                                       metrics: Metrics) -> None:
    _, key_id, account_id, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://gw.evil"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
            response = await client.post(f"/dashboard/keys/{key_id}/deactivate",
                                         data={"csrf": csrf}, headers=headers)
            assert response.status_code == 403 and 'id="error"' in response.text, headers
            signin = await client.post("/dashboard/signin", data={"key": mk}, headers=headers)
            assert signin.status_code == 403 and "set-cookie" not in signin.headers
        assert (await store.account_key(account_id, key_id)).active  # type: ignore[union-attr]
        same = await client.post(f"/dashboard/keys/{key_id}/deactivate", data={"csrf": csrf},
                                 headers={"Origin": "http://gw", "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 303
        # A form on our pages (Referrer-Policy: no-referrer): Chromium sends Origin: null.
        chromium = await client.post(f"/dashboard/keys/{key_id}/activate", data={"csrf": csrf},
                                     headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
        assert chromium.status_code == 303


async def test_a_script_in_a_key_name_is_escaped(store: Store, settings: Settings,
                                                 metrics: Metrics) -> None:
    evil = "<script>alert(1)</script>"
    _, _, account_id, mk = await account_with_mk(store, settings)
    _, key_id, _ = await new_key(store, settings, account=account_id, name=evil, credit=True)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        pages = [(await client.get("/dashboard")).text,
                 (await client.get(f"/dashboard/keys/{key_id}")).text,
                 (await client.post("/dashboard/keys", data={"csrf": csrf, "name": evil})).text,
                 (await client.post(f"/dashboard/keys/{key_id}/rename",
                                    data={"csrf": csrf, "name": '"><img src=x>'},
                                    follow_redirects=True)).text]
    for page in pages[:3]:
        assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '"><img' not in pages[3] and "&quot;&gt;&lt;img src=x&gt;" in pages[3]


async def test_bad_forms_are_400_pages_never_500(store: Store, settings: Settings,
                                                 metrics: Metrics) -> None:
    _, key_id, _, mk = await account_with_mk(store, settings)
    upstream = Upstream()
    async with client_for(app(store, settings, metrics, upstream)) as client:
        csrf = await sign_in(client, mk)
        path = f"/dashboard/keys/{key_id}/rename"
        cases = [
            (400, {"content": f"csrf={csrf}&name=a".encode(),
                   "headers": {"Content-Type": "text/plain"}}),
            (400, {"content": f"csrf={csrf}&name=a&name=b".encode(), "headers": FORM}),
            (400, {"content": f"csrf={csrf}&name=a&extra=1".encode(), "headers": FORM}),
            (400, {"content": f"csrf={csrf}&name=%ff".encode(), "headers": FORM}),
            (400, {"content": f"csrf={csrf}&name=\xe9".encode("latin-1"), "headers": FORM}),
            (413, {"content": f"csrf={csrf}&name={'a' * 9000}".encode(), "headers": FORM}),
        ]
        for status, kwargs in cases:
            response = await client.post(path, **kwargs)
            assert response.status_code == status, kwargs
            assert 'id="error"' in response.text
        assert (await client.get("/dashboard/nope")).status_code == 404
        for method, route, allowed in (("DELETE", "/dashboard", "GET, HEAD"),
                                       ("GET", path, "POST"),
                                       ("PUT", "/dashboard/signin", "GET, POST, HEAD"),
                                       ("GET", "/dashboard/signout", "POST"),
                                       ("PUT", "/dashboard/admin", None)):  # no token: 404
            refused = await client.request(method, route)
            if allowed is None:
                assert refused.status_code == 404, route
                continue
            assert refused.status_code == 405 and refused.headers["allow"] == allowed, route
        head = await client.head("/dashboard")  # as GET; the server sends no body
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/html")
        assert (await client.head("/dashboard/static/dashboard.css")).status_code == 200
        long_key = await client.post("/dashboard/signin", data={"key": "mk_" + "a" * 9000})
        assert long_key.status_code == 413
    assert upstream.paths == []  # never forwarded


async def test_every_answer_carries_the_security_headers(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, key_id, _, mk = await account_with_mk(store, settings)
    answers = []
    async with client_for(app(store, settings, metrics)) as client:
        answers.append(await client.get("/dashboard"))  # 303
        answers.append(await client.get("/dashboard/signin"))
        answers.append(await client.post("/dashboard/signin", data={"key": "x"}))  # 401
        csrf = await sign_in(client, mk)
        answers.append(await client.get("/dashboard"))
        answers.append(await client.get(f"/dashboard/keys/{key_id}"))
        answers.append(await client.get("/dashboard/keys/" + "0" * 32))  # 404
        answers.append(await client.post("/dashboard/keys", data={"csrf": "no"}))  # 403
        answers.append(await client.post("/dashboard/keys", data={"csrf": csrf}))  # 400
        css = await client.get("/dashboard/static/dashboard.css")
        answers.append(css)
        icon = await client.get("/dashboard/static/favicon.svg")
        answers.append(icon)
    assert [a.status_code for a in answers] == [303, 200, 401, 200, 200, 404, 403, 400, 200,
                                                200]
    for answer in answers:
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"
    assert css.headers["content-type"].startswith("text/css") and "svg.chart" in css.text
    assert '<link rel="stylesheet" href="/dashboard/static/dashboard.css">' in answers[3].text
    # The page names its icon, so a browser never asks /favicon.ico (a key-checked route).
    assert icon.headers["content-type"] == "image/svg+xml" and icon.content.startswith(b"<svg")
    assert '<link rel="icon" href="/dashboard/static/favicon.svg">' in answers[3].text


async def test_sign_out_deletes_the_session_in_redis(store: Store, settings: Settings,
                                                     metrics: Metrics) -> None:
    _, _, _, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        csrf = await sign_in(client, mk)
        token = client.cookies["gw_dash"]
        name = Names.dash_session(hashlib.sha256(token.encode()).hexdigest())
        assert await redis_of(store).exists(name) == 1
        out = await client.post("/dashboard/signout", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/signin"
        assert "Max-Age=0" in session_cookie(out)
        assert await redis_of(store).exists(name) == 0
        client.cookies.set("gw_dash", token, domain="gw.local", path="/dashboard")
        assert (await client.get("/dashboard")).status_code == 303  # the old token is dead


async def test_revoking_the_management_key_ends_its_sessions(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, _, account_id, mk = await account_with_mk(store, settings)
    async with client_for(app(store, settings, metrics)) as client:
        await sign_in(client, mk)
        [mgmt] = await store.list_mgmt_keys(account_id)
        await store.revoke_mgmt_key(mgmt.id)
        assert (await client.get("/dashboard")).status_code == 303


async def test_over_real_http_and_under_a_root_path(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    _, key_id, _, mk = await account_with_mk(store, settings)
    async with serving(app(store, settings, metrics), root_path="/gw") as url, \
            httpx.AsyncClient(base_url=url) as client:  # a proxy removed the /gw
        signin = await client.post("/dashboard/signin", data={"key": mk})
        assert signin.status_code == 303 and signin.headers["location"] == "/gw/dashboard"
        cookie = session_cookie(signin)
        assert "Path=/gw/dashboard" in cookie
        # The browser sends it to /gw/dashboard, which the proxy hands on as /dashboard.
        client.cookies.clear()
        page = await client.get("/dashboard", headers={"Cookie": cookie.split(";")[0]})
        assert page.status_code == 200 and f'href="/gw/dashboard/keys/{key_id}"' in page.text
        assert 'action="/gw/dashboard/keys"' in page.text


# -- the charts' series (pure) ------------------------------------------------------------


def test_the_series_sum_the_buckets_aggregate_sums() -> None:
    from gateway.core.usage_windows import aggregate
    from gateway.http.dashboard.charts import period_spend, series, usd

    now = 1_800_000_000  # hour 500000, day 20833, hour of day 8
    hour, day = now // 3600, now // 86400
    hours = {day: {"r8": 2, "p8": 10, "c8": 5, "s8": 1_500, "r0": 1, "p0": 1, "c0": 1,
                   "s0": 7},
             day - 1: {"r23": 4, "p23": 4, "c23": 0, "s23": 40},
             day - 29: {"r0": 1, "p0": 1, "c0": 0, "s0": 1},
             day - 30: {"r23": 9, "p23": 9, "c23": 9, "s23": 9}}  # outside both charts
    minutes = {hour: {f"r{(now // 60) % 60}": 2, f"p{(now // 60) % 60}": 10,
                      f"c{(now // 60) % 60}": 5, f"s{(now // 60) % 60}": 1_500}}
    hourly, daily = series(now, hours)
    assert len(hourly.bars) == 24 and len(daily.bars) == 30
    assert hourly.requests == aggregate(now, minutes, hours)["last24h"].requests == 7
    assert hourly.tokens == 15 + 2 + 4 and hourly.spend_micro == 1_547
    assert daily.requests == 8 and daily.spend_micro == 1_548
    assert period_spend(now, minutes, hours) == {
        "last1h": 1_500, "last24h": 1_547, "last7d": 1_547, "last30d": 1_557}
    # Counters without money: unknown, never $0.
    unknown, _ = series(now, {day: {"r8": 1, "p8": 1, "c8": 1}})
    assert unknown.spend_micro is None and usd(None) == "—"
    assert usd(1_234_567) == "$1.234567" and usd(5) == "$0.000005"
