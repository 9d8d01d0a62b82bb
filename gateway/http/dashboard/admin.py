"""/dashboard/admin: the operator's view of the dashboard (docs/dashboard.md).

Signed in with the operator token (Settings.admin_token, compared in constant time) into an
operator session (admin_sessions.py); without a token configured every /dashboard/admin path
is 404. Changes go through the functions the operator API uses (Store.add_credits,
renew_key, update_key), each a same-origin POST in the session with its CSRF token, else a
403 before anything is changed. Sign-in shares the account dashboard's attempt limit.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import uuid

from gateway.config.settings import Settings
from gateway.config.units import usd_to_micro_signed
from gateway.errors import ConfigError, NotFound
from gateway.http.dashboard import admin_pages
from gateway.http.dashboard.actions import ActionRefused, allow
from gateway.http.dashboard.admin_pages import AccountRow, AdminKeyRow
from gateway.http.dashboard.admin_sessions import (
    ADMIN_COOKIE,
    ADMIN_PATH,
    AdminSession,
    AdminSessions,
)
from gateway.http.dashboard.charts import period_spend, refusals_last_hour
from gateway.http.dashboard.forms import parse_form, read_body
from gateway.http.dashboard.respond import redirect, send_html
from gateway.http.dashboard.sessions import (
    SESSION_SECONDS,
    clear_cookie,
    new_token,
    same_origin,
    set_cookie,
    signin_address,
    token_hash,
)
from gateway.http.key_changes import ChangeSpec, renew_key, update_key
from gateway.http.management_body import MAX_REASON_LENGTH
from gateway.store import Account, Names, Store
from gateway.store.records import _text
from gateway.store.sessions import DashSessions
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway")

CREDITS_BY = "dashboard"  # who made a credit change, in the account's credit log
KEY_ACTIONS = ("renew", "deactivate")
ACCOUNTS_AT_ONCE = 16


def _uuid(text: str, what: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ActionRefused(404, f"No {what} with this id.") from None


class AdminDashboard:
    def __init__(self, store: Store, settings: Settings, limits: DashSessions,
                 attempts: int, window_seconds: int) -> None:
        self.store = store
        self.settings = settings
        self.token = settings.admin_token
        self.sessions = None if self.token is None else AdminSessions(store, self.token)
        self.limits = limits
        self.attempts, self.window_seconds = attempts, window_seconds

    async def dispatch(self, scope: Scope, receive: Receive, send: Send, prefix: str,
                       rest: str) -> None:
        """`rest`: the path after /dashboard/admin."""
        if self.sessions is None:
            raise ActionRefused(404, "No such page.")
        home = f"{prefix}{ADMIN_PATH}"
        if rest in ("", "/"):
            allow(scope, "GET")
            session = await self.sessions.current(scope)
            if session is None:
                await redirect(send, f"{home}/signin")
                return
            await send_html(send, 200, await self._page(prefix, session))
        elif rest == "/signin":
            if scope["method"] == "POST":
                await self._signin(scope, receive, send, prefix)
                return
            allow(scope, "GET", "POST")
            if await self.sessions.current(scope) is not None:
                await redirect(send, home)
                return
            await send_html(send, 200, admin_pages.signin(prefix))
        elif rest == "/signout":
            session, _ = await self._changing(scope, receive, ("csrf",))
            await self.sessions.close(session.token_hash)
            await redirect(send, f"{home}/signin",
                           [clear_cookie(scope, ADMIN_COOKIE, ADMIN_PATH)])
        else:
            await self._change(scope, receive, send, home, rest.strip("/").split("/"))

    async def _change(self, scope: Scope, receive: Receive, send: Send, home: str,
                      parts: list[str]) -> None:
        if len(parts) == 3 and parts[0] == "accounts" and parts[2] == "credits":
            account_id = _uuid(parts[1], "account")
            _, form = await self._changing(scope, receive, ("csrf", "usd", "reason"))
            micro, reason = _credit_change(form)
            try:
                await self.store.add_credits(account_id, micro, reason, CREDITS_BY)
            except NotFound:
                raise ActionRefused(404, "No account with this id.") from None
            except ConfigError as exc:
                raise ActionRefused(400, str(exc)) from None
            log.info("dashboard: the operator changed account %s's credits by %d micro-USD",
                     account_id, micro)
        elif len(parts) == 3 and parts[0] == "keys" and parts[2] in KEY_ACTIONS:
            key_id = _uuid(parts[1], "key")
            await self._changing(scope, receive, ("csrf",))
            try:
                if parts[2] == "renew":
                    await renew_key(self.store, key_id, None)
                else:
                    await update_key(self.store, self.settings, key_id,
                                     ChangeSpec(active=False))
            except NotFound:
                raise ActionRefused(404, "No key with this id.") from None
            except ConfigError as exc:
                raise ActionRefused(400, str(exc)) from None
            log.info("dashboard: the operator did %s on key %s", parts[2], key_id)
        else:
            raise ActionRefused(404, "No such page.")
        await redirect(send, home)

    async def _changing(self, scope: Scope, receive: Receive,
                        fields: tuple[str, ...]) -> tuple[AdminSession, dict[str, str]]:
        """A same-origin POST in an operator session with its CSRF token, else a 403."""
        assert self.sessions is not None
        allow(scope, "POST")
        if not same_origin(scope):
            raise ActionRefused(403, "Refused: the request came from another site.")
        session = await self.sessions.current(scope)
        if session is None:
            raise ActionRefused(403, "Your operator session has ended: sign in again.")
        form = parse_form(scope, await read_body(scope, receive), fields)
        given = form.get("csrf")
        if given is None or not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise ActionRefused(403, "Refused: the form's CSRF token is missing or wrong. "
                                "Reload the page and try again.")
        return session, form

    async def _signin(self, scope: Scope, receive: Receive, send: Send, prefix: str) -> None:
        assert self.sessions is not None and self.token is not None
        if not same_origin(scope):
            raise ActionRefused(403, "Refused: the request came from another site.")
        address = signin_address(scope)
        # The account sign-in's counter: one limit per address, whichever form is tried.
        attempt = await self.limits.signin_attempt(address, self.attempts, self.window_seconds)
        if not attempt.allowed:
            seconds = max(1, -(-attempt.retry_after_us // 1_000_000))
            await send_html(send, 429, admin_pages.signin(
                prefix, f"Too many sign-in attempts: try again in {seconds} s."),
                [(b"retry-after", str(seconds).encode())])
            return
        form = parse_form(scope, await read_body(scope, receive), ("token",))
        given = form.get("token", "").strip()
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            await send_html(send, 401, admin_pages.signin(
                prefix, "That is not the operator token of this gateway."))
            return
        old = await self.sessions.current(scope)
        if old is not None:  # a new session, never the one the browser came with
            await self.sessions.close(old.token_hash)
        token = new_token()
        await self.sessions.open(token_hash(token), secrets.token_urlsafe(32),
                                 SESSION_SECONDS)
        log.info("dashboard: the operator signed in")
        await redirect(send, f"{prefix}{ADMIN_PATH}",
                       [set_cookie(scope, token, ADMIN_COOKIE, ADMIN_PATH)])

    async def _page(self, prefix: str, session: AdminSession) -> str:
        accounts = await self.store.list_accounts()
        # The accounts' reads overlap on the connection (each two round trips), a bounded
        # number at a time.
        room = asyncio.Semaphore(ACCOUNTS_AT_ONCE)

        async def read(account: Account) -> tuple[AccountRow, list[AdminKeyRow]]:
            async with room:
                spent = await self.store._cmd("HGET", Names.account(account.id),
                                              "total_spent")
                snapshot = await self.store.usage_snapshot(account.id)
            now_s = snapshot.now_us // 1_000_000
            keys = [AdminKeyRow(c.record, account.name,
                                period_spend(now_s, c.minute_hashes, c.hour_hashes)["last1h"],
                                refusals_last_hour(now_s, c.minute_hashes))
                    for c in snapshot.keys if c.record.deleted_at_us is None]
            return AccountRow(account, int(_text(spent)) if spent else 0), keys

        rows = await asyncio.gather(*(read(account) for account in accounts))
        return admin_pages.admin(prefix, session.csrf, [row for row, _ in rows],
                                 [key for _, keys in rows for key in keys])


def _credit_change(form: dict[str, str]) -> tuple[int, str]:
    reason = form.get("reason", "").strip()
    if not reason:
        raise ActionRefused(400, "A reason is required: it is kept with the account's "
                            "credit history.")
    if len(reason) > MAX_REASON_LENGTH:
        raise ActionRefused(400, f"The reason is at most {MAX_REASON_LENGTH} characters.")
    try:
        micro = usd_to_micro_signed(form.get("usd", ""), "usd")
    except ConfigError as exc:
        raise ActionRefused(400, str(exc)) from None
    if micro == 0:
        raise ActionRefused(400, "The amount must not be zero.")
    return micro, reason
