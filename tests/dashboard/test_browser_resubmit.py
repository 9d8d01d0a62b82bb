"""The answers that show a secret are POST results: reloading one (the browser sends the
form again) must make no second key and rotate nothing, or the secret just copied would
die unseen. The forms carry a single-use token (docs/dashboard.md); a second use is a 409
page. In a real browser, with test_browser.py's fixtures and helpers."""

from __future__ import annotations

import re

import pytest

from tests.dashboard import test_browser as tb
from tests.dashboard.test_browser import Site, complete, keys_of, sign_in, tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

browser = tb.browser
browsing = tb.browsing
site = tb.site
_fresh_signin_allowance = tb._fresh_signin_allowance

ONCE = re.compile(r'<input type="hidden" name="once" value="([^"]+)">')


async def test_reloading_a_secret_page_creates_and_rotates_nothing(
        site: Site, browsing: tb.Browsing) -> None:
    who = await tenant(site, "reload")
    page = await browsing.page()
    assert (await sign_in(site, page, who.mk)).status == 303
    await page.fill("form#create-key input#new-key-name", "made once")
    await page.click("form#create-key #create-key-submit")
    made = (await page.locator("code#new-secret").inner_text()).strip()
    assert len(await keys_of(site, who.account_id)) == 2

    again = await page.reload()  # Chromium sends the POST again
    assert again is not None and again.status == 409
    assert await page.locator("p#error").count() == 1
    assert await page.locator("code#new-secret").count() == 0
    assert len(await keys_of(site, who.account_id)) == 2
    assert await complete(site, made) == 200

    await page.goto(site.url(f"/dashboard/keys/{who.key_id}"))
    await page.click("form#rotate button")
    rotated = (await page.locator("code#new-secret").inner_text()).strip()
    assert rotated != who.secret
    again = await page.reload()
    assert again is not None and again.status == 409
    assert await page.locator("code#new-secret").count() == 0
    assert await complete(site, rotated) == 200  # the secret shown is still the key's
    assert await complete(site, who.secret) == 401

    # Each page view's forms carry a token of their own: a new visit can rotate again.
    await page.goto(site.url(f"/dashboard/keys/{who.key_id}"))
    first = ONCE.findall(await page.content())
    await page.reload()
    assert first and ONCE.findall(await page.content()) != first
    await page.click("form#rotate button")
    assert (await page.locator("code#new-secret").inner_text()).strip() != rotated


async def test_a_refused_form_leaves_its_token_for_the_corrected_resend(
        site: Site, browsing: tb.Browsing) -> None:
    who = await tenant(site, "typo")
    page = await browsing.page()
    assert (await sign_in(site, page, who.mk)).status == 303
    html = await page.content()
    [once] = ONCE.findall(html)
    [csrf] = re.findall(r'name="csrf" value="([^"]+)"', html)[:1]
    headers = {"origin": site.base}

    async def create(name: str) -> int:
        answer = await page.request.post(site.url("/dashboard/keys"), headers=headers,
                                         form={"csrf": csrf, "name": name, "once": once})
        return answer.status

    assert await create("bell\x07") == 400  # not printable: nothing made, the token kept
    assert len(await keys_of(site, who.account_id)) == 1
    assert await create("corrected") == 200
    assert await create("corrected") == 409
    assert sorted(k.name for k in (await keys_of(site, who.account_id)).values()) == \
        ["alice", "corrected"]
