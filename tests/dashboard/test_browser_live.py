"""Watching usage move (issue 17's "watch usage move while curl sends requests") in a real
browser: the keys page and a key page with ?live=1 reload themselves every LIVE_SECONDS (a
meta refresh, no script, so the CSP stays `default-src 'none'`) and show the requests sent
meanwhile without anyone touching the page; the header's link turns it on and off; a page
that shows a new secret never reloads. test_browser.py's fixtures and helpers."""

from __future__ import annotations

import time

import pytest
from playwright.async_api import Page

from gateway.http.dashboard.pages import LIVE_SECONDS
from tests.dashboard import test_browser as tb
from tests.dashboard.test_browser import Site, complete, settled, sign_in, tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

browser = tb.browser
browsing = tb.browsing
site = tb.site
_fresh_signin_allowance = tb._fresh_signin_allowance


async def cell_text(page: Page, selector: str) -> str:
    return (await page.locator(selector).inner_text()).strip()


async def test_a_live_page_shows_new_requests_by_itself_and_stops_when_asked(
        site: Site, browsing: tb.Browsing) -> None:
    who = await tenant(site, "live")
    page = await browsing.page()
    assert (await sign_in(site, page, who.mk)).status == 303
    row = f'table#keys tr[data-key-id="{who.key_id}"] td.requests-24h'
    assert await cell_text(page, row) == "0"
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0
    await page.click("a#live")
    await page.wait_for_url(site.url("/dashboard?live=1"))
    assert await page.locator('meta[http-equiv="refresh"]').get_attribute("content") == \
        str(LIVE_SECONDS)

    # curl's part: requests from elsewhere while the page sits there untouched.
    for _ in range(3):
        assert await complete(site, who.secret) == 200
    await settled(site, who, who.key_id, 3)
    started = time.monotonic()
    await page.wait_for_function(
        "([selector]) => document.querySelector(selector)?.textContent.trim() === '3'",
        arg=[row], timeout=(LIVE_SECONDS * 2 + 5) * 1000)
    assert time.monotonic() - started <= LIVE_SECONDS * 2 + 5
    assert page.url == site.url("/dashboard?live=1")

    # The key page refreshes the same way, and the link turns it off again.
    await page.goto(site.url(f"/dashboard/keys/{who.key_id}?live=1"))
    assert await page.locator('meta[http-equiv="refresh"]').count() == 1
    assert await cell_text(page, 'table#periods tr[data-period="last1h"] td.requests') == "3"
    await page.click("a#live")
    await page.wait_for_url(site.url(f"/dashboard/keys/{who.key_id}?"))
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0

    # A page showing a secret once never reloads (nor offers to): reloading would re-POST.
    await page.goto(site.url("/dashboard?live=1"))
    await page.fill("form#create-key input#new-key-name", "made live")
    await page.click("form#create-key #create-key-submit")
    await page.wait_for_selector("code#new-secret")
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0
    assert await page.locator("a#live").count() == 0
