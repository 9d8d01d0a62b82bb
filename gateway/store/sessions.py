"""Dashboard sessions and sign-in attempts in Redis, so every replica knows them.

The browser holds a random token; Redis holds only its SHA-256 as the session's name, with
the account and management key it acts for, its CSRF token and its expiry (also the key's
time to live). Composed over the Store like LedgerStreams: its commands and scripts.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.client import Script
from gateway.store.names import Names
from gateway.store.records import _text
from gateway.store.scripts import lua_source
from gateway.store.store import Store


@dataclass(frozen=True, slots=True)
class DashSession:
    account_id: str
    mgmt_id: str  # the management key it was opened with: revoking that key ends it
    csrf: str
    expires_us: int


@dataclass(frozen=True, slots=True)
class SigninAttempt:
    allowed: bool
    attempts: int
    retry_after_us: int


class DashSessions:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._signin = Script.of(lua_source("dash_signin"))
        store.client.register((self._signin,))

    async def signin_attempt(self, client: str, limit: int,
                             window_seconds: int) -> SigninAttempt:
        raw = await self.store._evalsha(self._signin, [Names.dash_signin(client)],
                                        [limit, window_seconds])
        return SigninAttempt(int(raw[0]) == 1, int(raw[1]), int(raw[2]))

    async def open(self, token_hash: str, account_id: str, mgmt_id: str, csrf: str,
                   ttl_seconds: int) -> DashSession:
        expires = await self.store.now_us() + ttl_seconds * 1_000_000
        # One SET with its expiry: the session exists whole, or not at all.
        await self.store._cmd("SET", Names.dash_session(token_hash),
                              f"{account_id} {mgmt_id} {csrf} {expires}", "EX", ttl_seconds,
                              "NX")
        return DashSession(account_id, mgmt_id, csrf, expires)

    async def get(self, token_hash: str) -> DashSession | None:
        """The session, while it lasts and its management key still exists."""
        value = await self.store._cmd("GET", Names.dash_session(token_hash))
        if value is None:
            return None
        parts = _text(value).split(" ")
        if len(parts) != 4 or not parts[3].isdigit():
            return None
        session = DashSession(parts[0], parts[1], parts[2], int(parts[3]))
        if await self.store._cmd("GET", Names.mgmt_index(session.mgmt_id)) is None:
            await self.close(token_hash)  # its management key was revoked
            return None
        return session

    async def first_use(self, account_id: str, token: str, ttl_seconds: int) -> bool:
        """True the first time a form's single-use token is presented, False after."""
        return await self.store._cmd("SET", Names.dash_once(account_id, token), "1", "EX",
                                     ttl_seconds, "NX") is not None

    async def forget_use(self, account_id: str, token: str) -> None:
        """The token may be used again: the change it was spent on did not happen."""
        await self.store._cmd("DEL", Names.dash_once(account_id, token))

    async def close(self, token_hash: str) -> None:
        await self.store._cmd("DEL", Names.dash_session(token_hash))
