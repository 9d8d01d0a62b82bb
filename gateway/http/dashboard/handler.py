"""/dashboard and /dashboard/...: routing, sign-in and sign-out, and the checks every state
change passes (same origin, a session, its CSRF token). Never forwarded upstream; every
failure is a page of ours (400, 403, 404, 405, 413, 429, 503), never a 500."""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable

from gateway.config.routes import route_path
from gateway.config.settings import Settings
from gateway.core.keys import MANAGEMENT_PREFIX, hash_secret, looks_like
from gateway.errors import NotFound, StoreUnavailable
from gateway.http.body import ClientGone
from gateway.http.dashboard import actions, pages, views
from gateway.http.dashboard.actions import ActionRefused, allow
from gateway.http.dashboard.admin import AdminDashboard
from gateway.http.dashboard.forms import BadForm, parse_form, read_body
from gateway.http.dashboard.respond import redirect, send_bytes, send_html, static, stylesheet
from gateway.http.dashboard.sessions import (
    SESSION_SECONDS,
    Signed,
    clear_cookie,
    csrf_ok,
    current,
    new_token,
    same_origin,
    set_cookie,
    signin_address,
    token_hash,
)
from gateway.store import Store
from gateway.store.sessions import DashSessions
from gateway.types import Headers, Receive, Scope, Send

log = logging.getLogger("gateway")

SIGNIN_ATTEMPTS = 10  # per client address
SIGNIN_WINDOW_SECONDS = 60
# Signed-in requests per account, all its sessions together: a page reads every key's
# counters, so a tenant reloading in a loop must not become Redis's main load.
PAGE_VIEWS = 120
PAGE_VIEWS_SECONDS = 60
PAGE_VIEWS_PRINCIPAL = "dashboard-pages"  # its own bucket, not the management API's
CSS = (b"content-type", b"text/css; charset=utf-8")
SVG = (b"content-type", b"image/svg+xml")
KEY_ACTIONS = ("rename", "activate", "deactivate", "rotate")
ONCE_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}")

Action = Callable[[Scope, Receive, Send, Signed, str], Awaitable[None]]


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


class Dashboard:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.sessions = DashSessions(store)
        self.css = stylesheet()
        self.icon = static("favicon.svg")  # else the browser asks /favicon.ico, a key route
        self.admin = AdminDashboard(store, settings, self.sessions, SIGNIN_ATTEMPTS,
                                    SIGNIN_WINDOW_SECONDS)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefix = str(scope.get("root_path") or "")
        try:
            await self._dispatch(scope, receive, send, prefix)
            return
        except Refused as exc:
            status, message, headers = exc.status, exc.message, exc.headers
        except ActionRefused as exc:
            status, message, headers = exc.status, exc.message, exc.headers
        except BadForm as exc:
            status, message, headers = exc.status, exc.message, []
        except ClientGone:
            return
        except StoreUnavailable:
            status, message, headers = 503, "The gateway's store is unavailable; retry.", []
        await send_html(send, status, pages.error(prefix, status, message), headers)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send, prefix: str) -> None:
        rest = route_path(scope)[len("/dashboard"):]
        if rest == "/admin" or rest.startswith("/admin/"):
            await self.admin.dispatch(scope, receive, send, prefix, rest[len("/admin"):])
        elif rest in ("", "/"):
            allow(scope, "GET")
            signed = await self._signed(scope)
            if signed is None:
                await redirect(send, f"{prefix}/dashboard/signin")
                return
            await send_html(send, 200, await self._account(scope, signed, prefix))
        elif rest == "/signin":
            if scope["method"] == "POST":
                await self._signin(scope, receive, send, prefix)
                return
            allow(scope, "GET", "POST")
            if await self._signed(scope) is not None:
                await redirect(send, f"{prefix}/dashboard")
                return
            await send_html(send, 200, pages.signin(prefix))
        elif rest == "/signout":
            signed = await self._changing(scope, receive, ("csrf",))
            await self.sessions.close(signed.token_hash)
            await redirect(send, f"{prefix}/dashboard/signin", [clear_cookie(scope)])
        elif rest == "/static/dashboard.css":
            allow(scope, "GET")
            await send_bytes(send, 200, self.css, CSS)
        elif rest == "/static/favicon.svg":
            allow(scope, "GET")
            await send_bytes(send, 200, self.icon, SVG)
        elif rest == "/keys":
            form, signed = await self._changing_form(scope, receive, ("csrf", "name", "once"))
            made = await self._once(signed, form, lambda: actions.create(
                self.store, self.settings, signed.session.account_id, form.get("name")))
            await send_html(send, 200, pages.secret(prefix, signed.session.csrf, made.record,
                                                    made.secret, rotated=False))
        elif rest.startswith("/keys/"):
            await self._key(scope, receive, send, prefix, rest[len("/keys/"):].split("/"))
        else:
            raise Refused(404, "No such page.")

    async def _key(self, scope: Scope, receive: Receive, send: Send, prefix: str,
                   parts: list[str]) -> None:
        key_id = _uuid(parts[0])
        if len(parts) == 1:
            allow(scope, "GET")
            signed = await self._signed(scope)
            if signed is None:
                await redirect(send, f"{prefix}/dashboard/signin")
                return
            html = await views.key_page(self.store, self.settings, prefix, signed.session.csrf,
                                        signed.session.account_id, key_id, _live(scope))
            if html is None:
                raise Refused(404, "No key with this id in your account.")
            await send_html(send, 200, html)
            return
        if len(parts) != 2 or parts[1] not in KEY_ACTIONS:
            raise Refused(404, "No such page.")
        action = parts[1]
        fields = {"rename": ("csrf", "name"), "rotate": ("csrf", "once")}.get(action, ("csrf",))
        form, signed = await self._changing_form(scope, receive, fields)
        account_id = signed.session.account_id
        if action == "rotate":
            made = await self._once(signed, form,
                                    lambda: actions.rotate(self.store, account_id, key_id))
            await send_html(send, 200, pages.secret(prefix, signed.session.csrf, made.record,
                                                    made.secret, rotated=True))
            return
        if action == "rename":
            await actions.rename(self.store, account_id, key_id, form.get("name"))
        else:
            await actions.change(self.store, account_id, key_id,
                                 active=action == "activate")
        await redirect(send, f"{prefix}/dashboard/keys/{key_id}")

    # -- sessions -------------------------------------------------------------------------

    async def _signed(self, scope: Scope) -> Signed | None:
        signed = await current(self.sessions, scope)
        if signed is None:
            return None
        account_id = signed.session.account_id
        if not await self.store.account_exists(account_id):
            await self.sessions.close(signed.token_hash)
            return None
        throttle = await self.store.mgmt_throttle(account_id, PAGE_VIEWS_PRINCIPAL,
                                                  PAGE_VIEWS, PAGE_VIEWS_SECONDS)
        if not throttle.allowed:
            seconds = max(1, -(-throttle.retry_after_us // 1_000_000))
            raise Refused(429, f"Too many dashboard requests for this account: try again in "
                          f"{seconds} s.", [(b"retry-after", str(seconds).encode())])
        return signed

    async def _changing(self, scope: Scope, receive: Receive,
                        fields: tuple[str, ...]) -> Signed:
        return (await self._changing_form(scope, receive, fields))[1]

    async def _changing_form(self, scope: Scope, receive: Receive,
                             fields: tuple[str, ...]) -> tuple[dict[str, str], Signed]:
        """A state change: a POST from our own origin, in a session, with its CSRF token;
        else a 403 before anything is changed."""
        allow(scope, "POST")
        if not same_origin(scope):
            raise Refused(403, "Refused: the request came from another site.")
        signed = await self._signed(scope)
        if signed is None:
            raise Refused(403, "Your session has ended: sign in again.")
        form = parse_form(scope, await read_body(scope, receive), fields)
        if not csrf_ok(signed.session, form.get("csrf")):
            raise Refused(403, "Refused: the form's CSRF token is missing or wrong. Reload "
                          "the page and try again.")
        return form, signed

    async def _once(self, signed: Signed, form: dict[str, str],
                    change: Callable[[], Awaitable[actions.NewSecret]]) -> actions.NewSecret:
        """A create or rotate form's single-use token (pages.once): a second use is a 409
        page, before anything is made; a change that fails gives the token back, so the
        form may be corrected and sent again. Forms sent without one (scripts) are not
        deduplicated."""
        token = form.get("once")
        if token is None:
            return await change()
        if not ONCE_TOKEN.fullmatch(token):
            raise Refused(400, "The form could not be read.")
        account_id = signed.session.account_id
        if not await self.sessions.first_use(account_id, token, SESSION_SECONDS):
            raise Refused(409, "This form was sent already (a reload?): its secret was shown "
                          "once and is never shown again. If it was lost, rotate the key.")
        try:
            return await change()
        except BaseException:
            await self.sessions.forget_use(account_id, token)
            raise

    async def _signin(self, scope: Scope, receive: Receive, send: Send, prefix: str) -> None:
        if not same_origin(scope):
            raise Refused(403, "Refused: the request came from another site.")
        address = signin_address(scope)
        attempt = await self.sessions.signin_attempt(address, SIGNIN_ATTEMPTS,
                                                     SIGNIN_WINDOW_SECONDS)
        if not attempt.allowed:
            seconds = max(1, -(-attempt.retry_after_us // 1_000_000))
            await send_html(send, 429, pages.signin(
                prefix, f"Too many sign-in attempts: try again in {seconds} s."),
                [(b"retry-after", str(seconds).encode())])
            return
        form = parse_form(scope, await read_body(scope, receive), ("key",))
        secret = form.get("key", "").strip()
        ref = None
        if looks_like(secret, MANAGEMENT_PREFIX):
            ref = await self.store.mgmt_lookup(hash_secret(secret))
        if ref is None or not await self.store.account_exists(ref.account_id):
            await send_html(send, 401, pages.signin(
                prefix, "That is not a management key of this gateway."))
            return
        old = await current(self.sessions, scope)
        if old is not None:  # a new session, never the one the browser came with
            await self.sessions.close(old.token_hash)
        token = new_token()
        await self.sessions.open(token_hash(token), ref.account_id, ref.mgmt_id,
                                 secrets.token_urlsafe(32), SESSION_SECONDS)
        log.info("dashboard: account %s signed in", ref.account_id)
        await redirect(send, f"{prefix}/dashboard", [set_cookie(scope, token)])

    async def _account(self, scope: Scope, signed: Signed, prefix: str) -> str:
        try:
            return await views.account_page(self.store, self.settings, prefix,
                                            signed.session.csrf, signed.session.account_id,
                                            _live(scope))
        except NotFound:
            raise Refused(404, "This account no longer exists.") from None


def _live(scope: Scope) -> bool:
    """?live=1: the page reloads itself (pages.LIVE_SECONDS), to watch usage move."""
    return b"live=1" in scope.get("query_string", b"").split(b"&")


def _uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise Refused(404, "No key with this id in your account.") from None
