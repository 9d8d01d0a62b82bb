"""The operator view (/dashboard/admin) in a real browser (Debian's headless Chromium driven
by Playwright) against docs/dashboard.md "The operator view": its ids, classes, routes, the
gw_admin cookie, the csrf input and the security headers, nothing else of the markup.

test_browser.py's way and fixtures: the gateway, here with an operator token, on a real
uvicorn server on loopback in this event loop over the session's private redis-server;
httpx for traffic and the management API; one browser for the module, a fresh context per
test. The cross-site POST comes from a page of a second loopback server: another origin
(port) but the same site, so the SameSite=Strict cookie rides along and only the Origin /
Sec-Fetch-Site check stands in the way. Screenshots: tests/artifacts/dashboard/admin*.png.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, Response
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.timefmt import iso_from_us
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.dashboard import admin_pages
from gateway.http.dashboard.admin_sessions import token_fingerprint
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from gateway.types import Receive, Scope, Send
from tests.conftest import METRICS_TOKEN, RedisServer, bearer, new_key, serving
from tests.dashboard import test_browser as tb
from tests.dashboard.test_browser import (
    ARTIFACTS,
    CREDITS_MICRO,
    XSS,
    Browsing,
    Site,
    Tenant,
    complete,
    settled,
    submit,
    tenant,
    text,
    usd,
)

TOKEN = "operator-token-for-browser-tests-0123456789"
COOKIE = "gw_admin"
DAY_US = 86_400 * 1_000_000

pytestmark = pytest.mark.asyncio(loop_scope="module")


# -- the module's browser and gateway: test_browser.py's fixtures over this module's site ----

browser = tb.browser  # one Chromium for the module
browsing = tb.browsing  # a fresh context (cookie jar) per test
_fresh_signin_allowance = tb._fresh_signin_allowance  # autouse: 10 sign-ins a test


def gateway(store: Store, settings: Settings) -> GatewayMiddleware:
    return GatewayMiddleware(MockUpstream(), settings=settings, store=store,
                             metrics=Metrics.create(CollectorRegistry()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(redis_server: RedisServer) -> AsyncIterator[Site]:
    store = connect(redis_server.url, timeout_seconds=5.0)
    await store.client.call("FLUSHALL")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    settings = Settings(api_plan_keys=True, metrics_token=METRICS_TOKEN, admin_token=TOKEN)
    try:
        async with serving(gateway(store, settings)) as base:
            yield Site(base, store, settings)
    finally:
        await store.close()


# -- helpers ----------------------------------------------------------------------------------

async def sign_in(site: Site, page: Page, token: str = TOKEN) -> Response:
    """Signs the operator in through form#admin-signin; returns the POST's answer."""
    shown = await page.goto(site.url("/dashboard/admin/signin"))
    assert shown is not None and shown.status == 200
    await page.fill("form#admin-signin input#token", token)
    async with page.expect_response(lambda r: r.request.method == "POST" and
                                    r.url == site.url("/dashboard/admin/signin")) as posted:
        await page.click("form#admin-signin #admin-signin-submit")
    await page.wait_for_load_state()
    return await posted.value


async def signed_in(site: Site, browsing: Browsing) -> Page:
    page = await browsing.page()
    assert (await sign_in(site, page)).status == 303
    await page.wait_for_url(site.url("/dashboard/admin"))
    return page


def account_row(account_id: str) -> str:
    return f'table#accounts tbody tr[data-account-id="{account_id}"]'


def key_row(table: str, key_id: str) -> str:
    return f'table#{table} tbody tr[data-key-id="{key_id}"]'


def dollars(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-6)


async def balance(site: Site, account_id: str) -> Decimal:
    return dollars((await site.store.get_account(account_id)).credits)


async def usage(site: Site, t: Tenant, key_id: str) -> dict[str, Any]:
    """The key's row of /api/usage, as its tenant reads it."""
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.get(site.url(f"/api/usage/{key_id}"), headers=bearer(t.mk))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def spent(site: Site, t: Tenant, key_id: str) -> Decimal:
    """The key's lifetime spend: its record's micro-USD, which /api/usage reports too."""
    micro = (await site.store.get_key(key_id)).total_spent
    assert (await usage(site, t, key_id))["total_spent"] == micro / 1_000_000
    return dollars(micro)


async def cookie_of(browsing: Browsing) -> dict[str, Any] | None:
    found = [dict(c) for c in await browsing.context.cookies() if c["name"] == COOKIE]
    assert len(found) <= 1
    return found[0] if found else None


# -- the tests --------------------------------------------------------------------------------

async def test_without_an_operator_token_the_admin_pages_are_404(
        site: Site, browsing: Browsing) -> None:
    plain = replace(site.settings, admin_token=None)
    async with serving(gateway(site.store, plain)) as base:
        page = await browsing.page()
        for path in ("/dashboard/admin", "/dashboard/admin/signin", "/dashboard/admin/x"):
            shown = await page.goto(base + path)
            assert shown is not None and shown.status == 404, path
            assert page.url == base + path  # not sent on to a sign-in form
            assert await page.locator("p#error").is_visible()
            assert await page.locator("form#admin-signin, table#accounts").count() == 0
        forged = await page.request.post(base + "/dashboard/admin/signin", max_redirects=0,
                                         form={"token": TOKEN})
        assert forged.status == 404 and "set-cookie" not in forged.headers
        await browsing.check_headers(Site(base, site.store, plain))


async def test_sign_in_with_the_operator_token_and_its_cookie(
        site: Site, browsing: Browsing) -> None:
    page = await browsing.page()
    await page.goto(site.url("/dashboard/admin"))
    assert page.url == site.url("/dashboard/admin/signin")
    form = page.locator("form#admin-signin")
    assert (await form.get_attribute("method") or "").lower() == "post"
    assert await form.get_attribute("action") == "/dashboard/admin/signin"
    assert await page.get_attribute("input#token", "type") == "password"
    await page.screenshot(path=ARTIFACTS / "admin-signin.png", full_page=True)

    wrong = TOKEN[:-1] + "x"
    assert (await sign_in(site, page, wrong)).status == 401
    assert await page.locator("p#error").is_visible()
    assert await page.locator("form#admin-signin").count() == 1
    assert wrong not in await page.content() and await page.input_value("input#token") == ""
    assert await cookie_of(browsing) is None

    posted = await sign_in(site, page)
    assert posted.status == 303
    headers = await posted.all_headers()
    assert headers["location"] == "/dashboard/admin"
    attributes = {p.strip().lower() for p in headers["set-cookie"].split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/dashboard/admin"} <= attributes
    await page.wait_for_url(site.url("/dashboard/admin"))
    assert await page.locator("table#accounts").count() == 1
    cookie = await cookie_of(browsing)
    assert cookie is not None and cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard/admin"
    value = str(cookie["value"])
    assert len(value) >= 20 and TOKEN not in value and value not in TOKEN
    assert value not in (hashlib.sha256(TOKEN.encode()).hexdigest(), token_fingerprint(TOKEN))
    assert COOKIE not in await page.evaluate("document.cookie")  # HttpOnly
    assert TOKEN not in await page.content()
    assert all(TOKEN not in a.url for a in browsing.answers)
    assert all(TOKEN not in c["value"] for c in await browsing.context.cookies())
    await browsing.check_headers(site)


async def test_the_page_shows_credits_spend_and_the_top_keys_after_traffic(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site)
    heavy_secret, heavy, _ = await new_key(site.store, site.settings, account=t.account_id,
                                           name="heavy", credit=True)
    light_secret, light, _ = await new_key(site.store, site.settings, account=t.account_id,
                                           name="light", credit=True)
    for n in (40, 60, 80):
        assert await complete(site, heavy_secret, n) == 200
    assert await complete(site, light_secret, 1) == 200
    await settled(site, t, heavy, 3)
    await settled(site, t, light, 1)
    heavy_spent, light_spent = await spent(site, t, heavy), await spent(site, t, light)
    assert heavy_spent > light_spent > 0
    # Refused requests of a known key: a deactivated one's, counted per minute.
    shut_secret, shut, _ = await new_key(site.store, site.settings, account=t.account_id,
                                         name="shut", credit=True)
    await site.store.update_key(t.account_id, shut, active=False)
    assert [await complete(site, shut_secret) for _ in range(2)] == [403, 403]

    page = await signed_in(site, browsing)
    refused = key_row("top-refused", shut)
    assert await text(page, f"{refused} td.refused-1h") == "2"
    assert await text(page, f"{refused} td.status") == "inactive"
    assert await page.locator(key_row("top-refused", heavy)).count() == 0
    line = account_row(t.account_id)
    assert await text(page, f"{line} td.name") == t.name
    assert usd(await text(page, f"{line} td.spend")) == heavy_spent + light_spent
    shown_credits = usd(await text(page, f"{line} td.credits"))
    assert shown_credits == dollars(CREDITS_MICRO) - heavy_spent - light_spent
    assert shown_credits == await balance(site, t.account_id)

    top = page.locator("table#top-spend tbody tr[data-key-id]")
    ranked = [str(await top.nth(i).get_attribute("data-key-id"))
              for i in range(await top.count())]
    assert heavy in ranked and light in ranked and ranked.index(heavy) < ranked.index(light)
    by_rank = [usd(await top.nth(i).locator("td.spend-1h").inner_text())
               for i in range(len(ranked))]
    assert by_rank == sorted(by_rank, reverse=True)
    for key_id, key_spent, name in ((heavy, heavy_spent, "heavy"), (light, light_spent, "light")):
        cells = key_row("top-spend", key_id)
        assert usd(await text(page, f"{cells} td.spend-1h")) == key_spent
        assert await text(page, f"{cells} td.name") == name
        assert await text(page, f"{cells} td.account") == t.name
        assert await text(page, f"{cells} td.status") == "active"
    await page.screenshot(path=ARTIFACTS / "admin.png", full_page=True)
    await browsing.check_headers(site)


async def test_add_credits_by_exactly_the_amount_and_refuse_bad_forms(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site)
    page = await signed_in(site, browsing)
    form = f"{account_row(t.account_id)} form.add-credits"
    credits = f"{account_row(t.account_id)} td.credits"
    before = usd(await text(page, credits))
    assert before == dollars(CREDITS_MICRO)
    await page.fill(f"{form} input[name=usd]", "2.5")
    await page.fill(f"{form} input[name=reason]", "invoice 7")
    assert (await submit(page, form)).status == 200
    assert page.url == site.url("/dashboard/admin")
    after = before + Decimal("2.5")
    assert usd(await text(page, credits)) == after == await balance(site, t.account_id)
    [entry, *_] = await site.store.credit_log(t.account_id)
    assert (entry.micro, entry.reason, entry.by) == (2_500_000, "invoice 7", "dashboard")

    for amount, reason in (("0", "nothing"), ("1", "   "), ("1", ""), ("-1000", "too much")):
        await page.goto(site.url("/dashboard/admin"))
        await page.evaluate("f => document.querySelectorAll(f + ' input').forEach("
                            "i => i.removeAttribute('required'))", form)  # past the browser
        await page.fill(f"{form} input[name=usd]", amount)
        await page.fill(f"{form} input[name=reason]", reason)
        assert (await submit(page, form)).status == 400, (amount, reason)
        assert await page.locator("p#error").is_visible()
    await page.goto(site.url("/dashboard/admin"))
    assert usd(await text(page, credits)) == after == await balance(site, t.account_id)
    assert len(await site.store.credit_log(t.account_id)) == 2
    await browsing.check_headers(site)


async def test_deactivate_a_key_and_renew_a_plan_key(site: Site, browsing: Browsing) -> None:
    t = await tenant(site, key_name="monthly")  # t.key_id: a plan key
    secret, credit_id, _ = await new_key(site.store, site.settings, account=t.account_id,
                                         name="to-stop", credit=True)
    expiry = (await site.store.get_key(t.key_id)).expires_at_us
    assert expiry is not None
    assert await complete(site, secret) == 200
    page = await signed_in(site, browsing)

    stopped = key_row("all-keys", credit_id)
    assert await page.locator(f"{stopped} form.renew").count() == 0  # credit keys never expire
    await submit(page, f"{stopped} form.deactivate")
    assert page.url == site.url("/dashboard/admin")
    assert await text(page, f"{stopped} td.status") == "inactive"
    assert await page.locator(f"{stopped} form.deactivate").count() == 0
    assert await complete(site, secret) == 403
    assert await complete(site, t.secret) == 200  # the other key was not touched

    await submit(page, f'{key_row("all-keys", t.key_id)} form.renew')
    assert page.url == site.url("/dashboard/admin")
    renewed = (await site.store.get_key(t.key_id)).expires_at_us
    assert renewed == expiry + 30 * DAY_US
    assert (await usage(site, t, t.key_id))["subscription"]["expiresAt"] == iso_from_us(renewed)
    await browsing.check_headers(site)


def foreign_form(action: str, fields: dict[str, str]) -> Any:
    """An ASGI app whose page auto-submits a form of `fields` to `action`."""
    inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
    html = (f'<!doctype html><form id="f" method="post" action="{action}">{inputs}</form>'
            "<script>document.getElementById('f').submit()</script>").encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")]})
        await send({"type": "http.response.body", "body": html})
    return app


async def test_a_cross_site_post_or_a_wrong_csrf_is_403_and_changes_nothing(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site)
    plan_key = await site.store.get_key(t.key_id)
    page = await signed_in(site, browsing)
    form = f"{account_row(t.account_id)} form.add-credits"
    csrf = await page.get_attribute(f"{form} input[name=csrf]", "value")
    assert csrf

    # The other origin's page even holds the right CSRF token: Origin and Sec-Fetch-Site,
    # which the browser sets, give it away.
    target = site.url(f"/dashboard/admin/accounts/{t.account_id}/credits")
    evil = foreign_form(target, {"csrf": csrf, "usd": "1000", "reason": "forged"})
    async with serving(evil) as elsewhere:
        async with page.expect_response(lambda r: r.url == target) as posted:
            await page.goto(elsewhere + "/")
        answer = await posted.value
        sent = await answer.request.all_headers()
        assert answer.request.method == "POST" and sent.get("origin") == elsewhere != site.base
        assert f"{COOKIE}=" in sent.get("cookie", "")  # same site: the cookie rode along
        assert answer.status == 403
        await page.wait_for_url(target)
        assert await page.locator("p#error").is_visible()
    assert await balance(site, t.account_id) == dollars(CREDITS_MICRO)

    # The gateway's own forms, with a forged token.
    forge = "f => { document.querySelector(f + ' input[name=csrf]').value = 'forged'; }"
    for tampered in (form, f"{key_row('all-keys', t.key_id)} form.deactivate",
                     f"{key_row('all-keys', t.key_id)} form.renew", "form#admin-signout"):
        await page.goto(site.url("/dashboard/admin"))
        if tampered == form:
            await page.fill(f"{form} input[name=usd]", "5")
            await page.fill(f"{form} input[name=reason]", "forged token")
        await page.evaluate(forge, tampered)
        assert (await submit(page, tampered)).status == 403, tampered
        assert await page.locator("p#error").is_visible()
    assert await balance(site, t.account_id) == dollars(CREDITS_MICRO)
    assert len(await site.store.credit_log(t.account_id)) == 1
    assert await site.store.get_key(t.key_id) == plan_key  # neither renewed nor deactivated
    assert await complete(site, t.secret) == 200
    await page.goto(site.url("/dashboard/admin"))  # still signed in: sign-out was refused
    assert page.url == site.url("/dashboard/admin")
    browsing.answers[:] = [a for a in browsing.answers if a.url.startswith(site.base + "/")]
    await browsing.check_headers(site)


async def xss_attempt(site: Site, browsing: Browsing) -> None:
    """An account and a key named with markup: shown as the text they are, nothing runs."""
    t = await tenant(site, name=XSS, key_name=XSS)
    page = await browsing.page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await sign_in(site, page)
    await page.wait_for_url(site.url("/dashboard/admin"))
    key = key_row("all-keys", t.key_id)
    for cell, name in ((f"{account_row(t.account_id)} td.name", t.name),
                       (f"{key} td.name", XSS), (f"{key} td.account", t.name)):
        assert await text(page, cell) == name, cell
        assert await page.locator(f"{cell} *").count() == 0, cell
    assert await page.locator("script, img").count() == 0
    assert await page.evaluate("typeof window.__xss") == "undefined"
    css = [a for a in browsing.answers if a.url == site.url("/dashboard/static/dashboard.css")]
    assert css and css[-1].status == 200  # our own stylesheet passes our CSP
    assert not [m for m in browsing.console if "Content Security Policy" in m], browsing.console
    assert not errors
    await browsing.check_headers(site)


async def test_markup_in_account_and_key_names_shows_as_text(
        site: Site, browsing: Browsing) -> None:
    await xss_attempt(site, browsing)


async def test_the_xss_check_fails_when_the_admin_page_stops_escaping(
        site: Site, browsing: Browsing, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation (the server runs in this process): admin_pages' escape made the
    identity. The same check then fails: it proves the escaping, not just the CSP."""
    monkeypatch.setattr(admin_pages, "e", lambda value, quote=True: value)
    with pytest.raises(AssertionError):
        await xss_attempt(site, browsing)


async def test_sign_out_ends_the_operator_session(site: Site, browsing: Browsing,
                                                  browser: Browser) -> None:
    page = await signed_in(site, browsing)
    old = await cookie_of(browsing)
    assert old is not None
    await submit(page, "form#admin-signout")
    assert page.url == site.url("/dashboard/admin/signin")
    assert await page.locator("form#admin-signin").count() == 1
    await page.goto(site.url("/dashboard/admin"))
    assert page.url == site.url("/dashboard/admin/signin")

    # The old cookie, replayed by another browser and by a plain HTTP client, is no session.
    other = await browser.new_context()
    try:
        await other.add_cookies([{"name": COOKIE, "value": old["value"], "domain": "127.0.0.1",
                                  "path": "/dashboard/admin", "httpOnly": True,
                                  "sameSite": "Strict"}])
        replay = await other.new_page()
        await replay.goto(site.url("/dashboard/admin"))
        assert replay.url == site.url("/dashboard/admin/signin")
    finally:
        await other.close()
    async with httpx.AsyncClient(timeout=30, cookies={COOKIE: old["value"]}) as http:
        got = await http.get(site.url("/dashboard/admin"))
    assert got.status_code == 303 and got.headers["location"] == "/dashboard/admin/signin"
    await browsing.check_headers(site)
