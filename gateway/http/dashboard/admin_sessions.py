"""Operator sessions of /dashboard/admin: the account dashboard's mechanism (a random token
in an HttpOnly, SameSite=Strict cookie; Redis keeps only its SHA-256, with a CSRF token and
an expiry), under a name and a cookie of their own, and marked as the operator's.

An account session is never one: it lives under another Redis name (Names.dash_session),
its cookie is another (gw_dash), and an operator session's value starts with "operator".
The session also holds a fingerprint of the operator token it was opened with: when the
token is changed (GATEWAY_ADMIN_TOKEN), every session opened with the old one has ended.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway.http.dashboard.sessions import cookie_token, token_hash
from gateway.store import Names, Store
from gateway.store.records import _text
from gateway.types import Scope

ADMIN_COOKIE = "gw_admin"
ADMIN_PATH = "/dashboard/admin"
MARK = "operator"


@dataclass(frozen=True, slots=True)
class AdminSession:
    token_hash: str
    csrf: str
    expires_us: int


def token_fingerprint(admin_token: str) -> str:
    return hashlib.sha256(b"dashboard-admin:" + admin_token.encode()).hexdigest()[:32]


class AdminSessions:
    def __init__(self, store: Store, admin_token: str) -> None:
        self.store = store
        self.fingerprint = token_fingerprint(admin_token)

    async def open(self, digest: str, csrf: str, ttl_seconds: int) -> AdminSession:
        expires = await self.store.now_us() + ttl_seconds * 1_000_000
        await self.store._cmd("SET", Names.dash_admin_session(digest),
                              f"{MARK} {self.fingerprint} {csrf} {expires}", "EX",
                              ttl_seconds, "NX")
        return AdminSession(digest, csrf, expires)

    async def get(self, digest: str) -> AdminSession | None:
        value = await self.store._cmd("GET", Names.dash_admin_session(digest))
        if value is None:
            return None
        parts = _text(value).split(" ")
        if len(parts) != 4 or parts[0] != MARK or not parts[3].isdigit():
            return None
        if not hmac.compare_digest(parts[1].encode(), self.fingerprint.encode()):
            await self.close(digest)  # opened with an operator token no longer configured
            return None
        return AdminSession(digest, parts[2], int(parts[3]))

    async def current(self, scope: Scope) -> AdminSession | None:
        token = cookie_token(scope, ADMIN_COOKIE)
        return None if token is None else await self.get(token_hash(token))

    async def close(self, digest: str) -> None:
        await self.store._cmd("DEL", Names.dash_admin_session(digest))
