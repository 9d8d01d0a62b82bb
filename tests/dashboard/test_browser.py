"""The dashboard (issue 17) in a real browser: Debian's headless Chromium driven by
Playwright, against the HTML contract of docs/dashboard.md (its ids, form names, routes,
cookie, CSRF and headers are what these tests look for, nothing else of the markup).

The gateway runs in this event loop on a real uvicorn server (loopback) over the session's
private redis-server; traffic and the management API (/api/usage) are read with httpx, the
way a tenant's programs would. One browser for the module, a fresh browser context (cookie
jar) per test, a fresh account per test. Screenshots of the sign-in page, the keys page and
a key page with its charts are written to tests/artifacts/dashboard/.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    async_playwright,
)
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_management_secret
from gateway.core.usage_windows import aggregate
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import KeyRecord, Store, connect
from tests.conftest import METRICS_TOKEN, RedisServer, bearer, new_key, serving

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
COOKIE = "gw_dash"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                    "referrer-policy": "no-referrer", "cache-control": "no-store"}
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_ATTRIBUTE = '"><svg onload="window.__xss=3"></svg><b title=\'x'
PERIODS = ("last1h", "last24h", "last7d", "last30d")
CREDITS_MICRO = 25_000_000  # $25
SECRET = re.compile(r"sk_live_\S+")

pytestmark = pytest.mark.asyncio(loop_scope="module")


# -- the module's browser and gateway ---------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        reason = (f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run installs "
                  "it): the dashboard's browser tests need Debian's headless Chromium")
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: a missing browser there is a broken setup
        pytest.skip(reason)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                    headless=True)
        yield chromium
        await chromium.close()


@dataclass
class Site:
    base: str  # http://127.0.0.1:<port>
    store: Store
    settings: Settings

    def url(self, path: str) -> str:
        return self.base + path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(redis_server: RedisServer) -> AsyncIterator[Site]:
    subprocess.run(["redis-cli", "-s", str(redis_server.socket), "FLUSHALL"], check=True,
                   stdout=subprocess.DEVNULL)
    store = connect(redis_server.url, timeout_seconds=5.0)
    settings = Settings(api_plan_keys=True, metrics_token=METRICS_TOKEN)
    app = GatewayMiddleware(MockUpstream(), settings=settings, store=store,
                            metrics=Metrics.create(CollectorRegistry()))
    try:
        async with serving(app) as base:
            yield Site(base, store, settings)
    finally:
        await store.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def _fresh_signin_allowance(site: Site) -> None:
    """Sign-in attempts are limited per client address (10 a minute) and every test signs in
    from 127.0.0.1: each test starts with the allowance a new minute would give."""
    cursor = "0"
    while True:
        reply = await site.store.client.call("SCAN", cursor, "MATCH", "*dash-signin*",
                                             "COUNT", 1000)
        cursor = _text(reply[0])
        for name in reply[1]:
            await site.store.client.call("DEL", name)
        if cursor == "0":
            return


@dataclass
class Browsing:
    """A browser context (its own cookie jar) and every answer it got."""

    context: BrowserContext
    answers: list[Response] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    async def page(self) -> Page:
        page = await self.context.new_page()
        page.on("console", self._console)
        return page

    def record(self, answer: Response) -> None:
        self.answers.append(answer)

    def _console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    async def check_headers(self, site: Site) -> int:
        """Every dashboard answer this context got (pages, redirects, errors, the stylesheet)
        has the contract's security headers; nothing came from another origin."""
        checked = 0
        for answer in self.answers:
            assert answer.url.startswith(site.base + "/"), answer.url
            if not urlsplit(answer.url).path.startswith("/dashboard"):
                continue
            headers = await answer.all_headers()
            for name, value in SECURITY_HEADERS.items():
                assert headers.get(name) == value, (answer.url, answer.status, name, headers)
            checked += 1
        assert checked > 0
        return checked


@pytest_asyncio.fixture(loop_scope="module")
async def browsing(browser: Browser) -> AsyncIterator[Browsing]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(10_000)
    seen = Browsing(context)
    context.on("response", seen.record)
    yield seen
    await context.close()


# -- tenants, traffic and pages ---------------------------------------------------------------

@dataclass
class Tenant:
    account_id: str
    name: str
    mk: str  # the management key (mk_...) the tenant signs in with
    key_id: str  # a subscription key on plan "standard"
    secret: str  # its sk_live_ secret


async def tenant(site: Site, name: str = "", key_name: str = "alice") -> Tenant:
    name = f"{name or 'acme'} {uuid.uuid4().hex[:8]}"
    account = await site.store.create_account(name)
    await site.store.add_credits(account.id, CREDITS_MICRO, "dashboard browser test")
    secret, key_id, _ = await new_key(site.store, site.settings, account=account.id,
                                      name=key_name, plan="standard")
    mk = new_management_secret()
    await site.store.create_mgmt_key(account.id, hash_secret(mk))
    return Tenant(account.id, name, mk, key_id, secret)


async def keys_of(site: Site, account_id: str) -> dict[str, KeyRecord]:
    snapshot = await site.store.usage_snapshot(account_id)
    return {k.record.id: k.record for k in snapshot.keys}


async def key_states(site: Site, account_id: str) -> dict[str, tuple[Any, ...]]:
    """What a dashboard action could change of each key (spend aside: traffic moves it)."""
    return {i: (r.name, r.active, r.key_type, r.plan, r.expires_at_us, r.deleted_at_us)
            for i, r in (await keys_of(site, account_id)).items()}


def chat(n: int) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hello " * n}],
            "max_tokens": 8}


async def complete(site: Site, secret: str, n: int = 1) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(site.url("/v1/chat/completions"), json=chat(n),
                                   headers=bearer(secret))
    return response.status_code


async def sign_in(site: Site, page: Page, mk: str) -> Response:
    """Signs in through form#signin the way a person would; returns the POST's answer."""
    shown = await page.goto(site.url("/dashboard/signin"))
    assert shown is not None and shown.status == 200, shown and shown.status
    await page.fill("form#signin input#key", mk)
    async with page.expect_response(lambda r: r.request.method == "POST"
                                    and r.url == site.url("/dashboard/signin")) as posted:
        await page.click("form#signin #signin-submit")
    await page.wait_for_url(site.url("/dashboard"))
    return await posted.value


async def submit(page: Page, form: str) -> Response:
    """Submits `form` with its button; returns the answer of the page it lands on."""
    async with page.expect_navigation() as landed:
        await page.locator(f"{form} button, {form} input[type=submit]").first.click()
    response = await landed.value
    assert response is not None
    return response


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


def number(shown: str) -> Decimal:
    """A number as a page shows it: '$25.000000', '1,234', '7'."""
    cleaned = shown.strip().replace("$", "").replace(",", "").replace("\u00a0", "")
    assert re.fullmatch(r"-?\d+(\.\d+)?", cleaned), f"not a number: {shown!r}"
    return Decimal(cleaned)


def usd(shown: str | float) -> Decimal:
    """Dollars to the micro-dollar (the gateway's unit)."""
    return number(str(shown)).quantize(Decimal("0.000001"))


async def row_ids(page: Page) -> set[str]:
    rows = page.locator("table#keys tbody tr[data-key-id]")
    return {str(await rows.nth(i).get_attribute("data-key-id"))
            for i in range(await rows.count())}


async def key_id_named(page: Page, name: str) -> str:
    row = page.locator("table#keys tbody tr[data-key-id]").filter(
        has=page.locator("td.name", has_text=name))
    assert await row.count() == 1, name
    return str(await row.get_attribute("data-key-id"))


async def dash_cookie(context: BrowserContext) -> dict[str, Any]:
    found = [dict(c) for c in await context.cookies() if c["name"] == COOKIE]
    assert len(found) == 1, found
    return found[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def settled(site: Site, tenant: Tenant, key_id: str, requests: int) -> None:
    """Waits until the counters hold `requests` settled requests of the key (settlement
    may finish just after the client has read the whole answer)."""
    for _ in range(200):
        snapshot = await site.store.usage_snapshot(tenant.account_id, key_id)
        key = snapshot.keys[0]
        periods = aggregate(snapshot.now_us // 1_000_000, key.minute_hashes, key.hour_hashes)
        if periods["last24h"].requests >= requests:
            assert periods["last24h"].requests == requests
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{requests} requests never settled")


# -- the tests --------------------------------------------------------------------------------

async def test_sign_in_lands_on_the_accounts_keys_with_its_credits(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site, key_name="alice")
    _, credit_id, _ = await new_key(site.store, site.settings, account=t.account_id,
                                    name="batch-jobs", credit=True)
    page = await browsing.page()

    # Not signed in: /dashboard sends the browser to the sign-in page.
    await page.goto(site.url("/dashboard"))
    assert page.url == site.url("/dashboard/signin")
    form = page.locator("form#signin")
    assert (await form.get_attribute("method") or "").lower() == "post"
    assert await form.get_attribute("action") == "/dashboard/signin"
    assert await page.get_attribute("input#key", "name") == "key"
    assert await page.get_attribute("input#key", "type") == "password"
    # Its stylesheet is the packaged one, served by the gateway.
    assert await page.get_attribute("link[rel=stylesheet]", "href") == \
        "/dashboard/static/dashboard.css"
    css = [a for a in browsing.answers if a.url == site.url("/dashboard/static/dashboard.css")]
    assert css and css[-1].status == 200
    assert "text/css" in (await css[-1].all_headers())["content-type"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "signin.png", full_page=True)

    # A wrong management key: the form again, 401 with p#error, and no cookie.
    await page.fill("input#key", new_management_secret())
    async with page.expect_navigation() as refused:
        await page.click("#signin-submit")
    assert (await refused.value).status == 401  # type: ignore[union-attr]
    assert await page.locator("p#error").is_visible()
    assert await page.locator("form#signin").count() == 1
    assert not [c for c in await browsing.context.cookies() if c["name"] == COOKIE]

    posted = await sign_in(site, page, t.mk)
    assert posted.status == 303
    posted_headers = await posted.all_headers()
    assert posted_headers["location"] == "/dashboard"
    set_cookie = posted_headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    attributes = {part.strip().lower() for part in set_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/dashboard"} <= attributes
    assert "secure" not in attributes  # plain http here; Secure only over https

    assert await text(page, "h1#account") == t.name
    assert usd(await text(page, "span#credits")) == usd(CREDITS_MICRO / 1_000_000)
    assert await row_ids(page) == {t.key_id, credit_id}
    row = page.locator(f'table#keys tbody tr[data-key-id="{t.key_id}"]')
    assert (await row.locator("td.name").inner_text()).strip() == "alice"
    assert await row.locator("td.name a").get_attribute("href") == \
        f"/dashboard/keys/{t.key_id}"
    assert (await row.locator("td.plan").inner_text()).strip() == "standard"
    assert (await row.locator("td.status").inner_text()).strip() == "active"
    for cell in ("rpm", "tpm", "expires", "created", "requests-24h", "spend-24h"):
        assert await row.locator(f"td.{cell}").count() == 1, cell
    assert number(await row.locator("td.requests-24h").inner_text()) == 0
    credit_row = page.locator(f'table#keys tbody tr[data-key-id="{credit_id}"]')
    assert (await credit_row.locator("td.name").inner_text()).strip() == "batch-jobs"
    assert (await credit_row.locator("td.status").inner_text()).strip() == "active"
    await page.screenshot(path=ARTIFACTS / "keys.png", full_page=True)

    # The session cookie: HttpOnly (scripts cannot read it), SameSite=Strict, not the key.
    cookie = await dash_cookie(browsing.context)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert cookie["secure"] is False
    assert t.mk not in cookie["value"] and cookie["value"] not in t.mk
    assert len(cookie["value"]) >= 20
    assert COOKIE not in await page.evaluate("document.cookie")
    # The management key is never in a URL or a page.
    assert t.mk not in await page.content()
    assert all(t.mk not in a.url for a in browsing.answers)
    assert await page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") \
        == "{}{}"
    await browsing.check_headers(site)


async def test_the_key_page_charts_the_traffic_as_api_usage_counts_it(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site, key_name="chart-key")
    sent = 7
    for n in range(1, sent + 1):
        assert await complete(site, t.secret, n) == 200
    await settled(site, t, t.key_id, sent)
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.get(site.url(f"/api/usage/{t.key_id}"), headers=bearer(t.mk))
    assert answer.status_code == 200
    usage = answer.json()
    day = usage["usage"]["last24h"]
    assert day["requests"] == sent and day["tokens"] > 0
    spent = usd(usage["total_spent"])  # a new key: all it ever spent is minutes old
    assert spent > 0

    page = await browsing.page()
    await sign_in(site, page, t.mk)
    row = page.locator(f'table#keys tbody tr[data-key-id="{t.key_id}"]')
    assert number(await row.locator("td.requests-24h").inner_text()) == sent
    assert usd(await row.locator("td.spend-24h").inner_text()) == spent
    await row.locator("td.name a").click()
    await page.wait_for_url(site.url(f"/dashboard/keys/{t.key_id}"))
    assert await text(page, "h1#key-name") == "chart-key"

    for chart, bars in (("svg#chart-hourly", 24), ("svg#chart-daily", 30)):
        svg = page.locator(chart)
        assert await svg.count() == 1, chart
        assert number(await svg.get_attribute("data-requests") or "") == sent, chart
        assert number(await svg.get_attribute("data-tokens") or "") == day["tokens"], chart
        assert usd(await svg.get_attribute("data-spend") or "") == spent, chart
        rects = svg.locator("rect")
        assert await rects.count() == bars, chart
        heights = [float(await rects.nth(i).get_attribute("height") or 0) for i in range(bars)]
        assert max(heights) > 0, chart  # the traffic's bar is drawn
        box = await svg.bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 20, (chart, box)

    periods = page.locator("table#periods tr[data-period]")
    names = [await periods.nth(i).get_attribute("data-period")
             for i in range(await periods.count())]
    assert sorted(str(n) for n in names) == sorted(usage["usage"]) == sorted(PERIODS)
    for name, counted in usage["usage"].items():
        period = page.locator(f'table#periods tr[data-period="{name}"]')
        assert number(await period.locator("td.requests").inner_text()) == \
            counted["requests"], name
        assert number(await period.locator("td.tokens").inner_text()) == counted["tokens"], name
        assert usd(await period.locator("td.spend").inner_text()) == spent, name

    models = page.locator("table#spend-by-model tr[data-model]")
    by_model = {str(await models.nth(i).get_attribute("data-model")):
                usd(await models.nth(i).locator("td.spend").inner_text())
                for i in range(await models.count())}
    # No ledger here: the counters' rows, by the model served, add up to the key's exact
    # spend (tests/http/test_dashboard_models.py checks them one by one).
    assert by_model and sum(by_model.values()) == spent, by_model
    await page.screenshot(path=ARTIFACTS / "key.png", full_page=True)
    await browsing.check_headers(site)


async def test_create_rename_deactivate_and_rotate_a_key(site: Site,
                                                         browsing: Browsing) -> None:
    t = await tenant(site)
    page = await browsing.page()
    await sign_in(site, page, t.mk)

    await page.fill("form#create-key input#new-key-name", "made-in-browser")
    created = await submit(page, "form#create-key")
    assert created.status == 200
    secret = await text(page, "code#new-secret")
    assert SECRET.fullmatch(secret), secret
    assert await complete(site, secret) == 200
    if created.request.method == "GET":  # a redirect-after-POST: reloading is harmless
        await page.reload()
        assert secret not in await page.content()
    await page.goto(site.url("/dashboard"))
    assert secret not in await page.content()
    key_id = await key_id_named(page, "made-in-browser")
    assert await row_ids(page) == {t.key_id, key_id}
    record = (await keys_of(site, t.account_id))[key_id]
    assert record.key_type == "credit" and record.name == "made-in-browser"
    await page.goto(site.url(f"/dashboard/keys/{key_id}"))
    assert secret not in await page.content()

    # Rename.
    await page.fill("form#rename input[name=name]", "renamed-in-browser")
    assert (await submit(page, "form#rename")).status == 200
    await page.goto(site.url(f"/dashboard/keys/{key_id}"))
    assert await text(page, "h1#key-name") == "renamed-in-browser"
    assert (await keys_of(site, t.account_id))[key_id].name == "renamed-in-browser"

    # Deactivate, then activate again: the key refused, then served.
    assert await page.locator("form#activate").count() == 0
    assert (await submit(page, "form#deactivate")).status == 200
    assert await complete(site, secret) == 403
    await page.goto(site.url("/dashboard"))
    status = page.locator(f'table#keys tr[data-key-id="{key_id}"] td.status')
    assert (await status.inner_text()).strip() == "inactive"
    await page.goto(site.url(f"/dashboard/keys/{key_id}"))
    assert await page.locator("form#deactivate").count() == 0
    assert (await submit(page, "form#activate")).status == 200
    assert await complete(site, secret) == 200

    # Rotate: a new secret, shown once; the old one is refused at once.
    await page.goto(site.url(f"/dashboard/keys/{key_id}"))
    rotated_answer = await submit(page, "form#rotate")
    assert rotated_answer.status == 200
    rotated = await text(page, "code#new-secret")
    assert SECRET.fullmatch(rotated) and rotated != secret
    assert await complete(site, secret) == 401
    assert await complete(site, rotated) == 200
    for path in ("/dashboard", f"/dashboard/keys/{key_id}"):
        await page.goto(site.url(path))
        html = await page.content()
        assert rotated not in html and secret not in html, path
    assert await complete(site, t.secret) == 200  # the other key was not touched
    await browsing.check_headers(site)


async def test_sign_out_ends_the_session_everywhere(site: Site, browsing: Browsing,
                                                    browser: Browser) -> None:
    t = await tenant(site)
    page = await browsing.page()
    await sign_in(site, page, t.mk)
    old = await dash_cookie(browsing.context)
    csrf = await page.get_attribute("form#create-key input[name=csrf]", "value")
    assert csrf

    await submit(page, "form#signout")
    await page.goto(site.url("/dashboard"))
    assert page.url == site.url("/dashboard/signin")

    # The old cookie, replayed by another browser and by a plain HTTP client, is no session.
    other = await browser.new_context()
    try:
        await other.add_cookies([{"name": COOKIE, "value": old["value"],
                                  "domain": "127.0.0.1", "path": "/dashboard",
                                  "httpOnly": True, "sameSite": "Strict"}])
        replay = await other.new_page()
        await replay.goto(site.url("/dashboard"))
        assert replay.url == site.url("/dashboard/signin")
    finally:
        await other.close()
    before = await key_states(site, t.account_id)
    async with httpx.AsyncClient(timeout=30, cookies={COOKIE: old["value"]}) as http:
        got = await http.get(site.url("/dashboard"))
        assert got.status_code == 303
        assert got.headers["location"] == "/dashboard/signin"
        posted = await http.post(site.url("/dashboard/keys"),
                                 data={"name": "after-signout", "csrf": csrf},
                                 headers={"Origin": site.base})
        assert posted.status_code in (303, 401, 403), posted.status_code
        assert posted.headers.get("location", "/dashboard/signin") == "/dashboard/signin"
    assert await key_states(site, t.account_id) == before
    await browsing.check_headers(site)


async def test_a_post_without_the_right_csrf_or_from_another_origin_changes_nothing(
        site: Site, browsing: Browsing) -> None:
    t = await tenant(site)
    page = await browsing.page()
    await sign_in(site, page, t.mk)
    before = await key_states(site, t.account_id)

    async def refused(form: str, name_field: str | None, tamper: str) -> None:
        if name_field is not None:
            await page.fill(f"{form} {name_field}", "forged")
        await page.evaluate(tamper, form)
        answer = await submit(page, form)
        assert answer.status == 403, (form, tamper)
        assert await page.locator("p#error").is_visible()
        assert SECRET.search(await page.content()) is None

    wrong = "f => { document.querySelector(f + ' input[name=csrf]').value = 'forged'; }"
    missing = "f => { document.querySelector(f + ' input[name=csrf]').remove(); }"
    empty = "f => { document.querySelector(f + ' input[name=csrf]').value = ''; }"
    for tamper in (wrong, missing, empty):
        await page.goto(site.url("/dashboard"))
        await refused("form#create-key", "input#new-key-name", tamper)
    key_page = site.url(f"/dashboard/keys/{t.key_id}")
    for form, name_field in (("form#rotate", None), ("form#deactivate", None),
                             ("form#rename", "input[name=name]"), ("form#signout", None)):
        await page.goto(key_page if form != "form#signout" else site.url("/dashboard"))
        await refused(form, name_field, wrong)
    assert await key_states(site, t.account_id) == before
    assert await complete(site, t.secret) == 200  # neither rotated nor deactivated

    # The right token, but sent by a page of another origin (the session cookie rides along
    # on page.request): refused too.
    await page.goto(site.url("/dashboard"))
    csrf = await page.get_attribute("form#create-key input[name=csrf]", "value")
    assert csrf
    foreign = await page.request.post(site.url("/dashboard/keys"), max_redirects=0,
                                      form={"name": "from-elsewhere", "csrf": csrf},
                                      headers={"Origin": "http://evil.example"})
    assert foreign.status == 403
    assert 'id="error"' in await foreign.text()
    assert await key_states(site, t.account_id) == before
    # ...while the same request from the dashboard's own origin is accepted: the refusals
    # above were the token's and the origin's, not the request's.
    own = await page.request.post(site.url("/dashboard/keys"), max_redirects=0,
                                  form={"name": "from-here", "csrf": csrf},
                                  headers={"Origin": site.base})
    assert own.status in (200, 303), own.status
    after = await key_states(site, t.account_id)
    assert [state[0] for i, state in after.items() if i not in before] == ["from-here"]
    await page.goto(site.url("/dashboard"))  # still signed in: sign-out was refused too
    assert page.url == site.url("/dashboard")
    await browsing.check_headers(site)


async def xss_attempt(site: Site, browsing: Browsing) -> None:
    """Tenant-chosen strings carrying markup (an account name, a key name made by the CLI,
    one made through the form) show as the text they are; no script of theirs runs."""
    t = await tenant(site, name=XSS, key_name=XSS)
    page = await browsing.page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await sign_in(site, page, t.mk)
    await page.fill("form#create-key input#new-key-name", XSS_ATTRIBUTE)
    await submit(page, "form#create-key")
    await page.goto(site.url("/dashboard"))
    made = next(i for i, r in (await keys_of(site, t.account_id)).items()
                if r.name == XSS_ATTRIBUTE)

    assert await text(page, "h1#account") == t.name
    for key_id, name in ((t.key_id, XSS), (made, XSS_ATTRIBUTE)):
        cell = page.locator(f'table#keys tbody tr[data-key-id="{key_id}"] td.name')
        assert (await cell.inner_text()).strip() == name
        assert await cell.locator("script, img, svg, b").count() == 0
    assert await page.locator("h1#account script, h1#account img").count() == 0
    for key_id, name in ((t.key_id, XSS), (made, XSS_ATTRIBUTE)):
        await page.goto(site.url(f"/dashboard/keys/{key_id}"))
        assert await text(page, "h1#key-name") == name
        assert await page.locator("h1#key-name *").count() == 0
        assert await page.locator("img[src=x], svg[onload], b[title]").count() == 0
    assert await page.evaluate("typeof window.__xss") == "undefined"
    assert await page.locator("script").count() == 0
    # Nothing even tried to run (CSP would have blocked it, and said so on the console).
    assert not [m for m in browsing.console if "Content Security Policy" in m], browsing.console
    assert not errors
    await browsing.check_headers(site)


async def test_markup_in_names_is_shown_as_text_and_never_runs(site: Site,
                                                               browsing: Browsing) -> None:
    await xss_attempt(site, browsing)


async def test_the_xss_check_fails_when_the_pages_stop_escaping(
        site: Site, browsing: Browsing, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation: the page renderer's html.escape made the identity (the server runs in
    this process). The same check then fails: it proves the escaping, not just the CSP."""
    from gateway.http.dashboard import pages

    monkeypatch.setattr(pages, "escape", lambda value, quote=True: value)
    with pytest.raises(AssertionError):
        await xss_attempt(site, browsing)


async def test_sign_in_attempts_are_limited_per_address(site: Site,
                                                        browsing: Browsing) -> None:
    t = await tenant(site)
    async with httpx.AsyncClient(timeout=30) as http:
        statuses = [(await http.post(site.url("/dashboard/signin"),
                                     data={"key": new_management_secret()})).status_code
                    for _ in range(10)]
        assert statuses == [401] * 10
        limited = await http.post(site.url("/dashboard/signin"), data={"key": t.mk})
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert 'id="error"' in limited.text
    assert COOKIE not in limited.headers.get("set-cookie", "")
    # The browser sees the same page.
    page = await browsing.page()
    await page.goto(site.url("/dashboard/signin"))
    await page.fill("input#key", t.mk)
    async with page.expect_navigation() as landed:
        await page.click("#signin-submit")
    assert (await landed.value).status == 429  # type: ignore[union-attr]
    assert await page.locator("p#error").is_visible()
    await browsing.check_headers(site)

