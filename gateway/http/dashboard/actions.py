"""The key actions a signed-in account may take, through the very functions the management
API uses (create_key, Store.update_key, Store.rotate_key), so they behave the same."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_consumption_secret
from gateway.errors import ConfigError, LimitReached, NotFound, Rejected
from gateway.http.admin import KeySpec, create_key
from gateway.http.management_body import checked_name
from gateway.store import KeyRecord, Store
from gateway.types import Headers, Scope


class ActionRefused(Exception):
    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def allow(scope: Scope, *methods: str) -> None:
    """A 405 naming what the route takes (GET takes HEAD too: the server sends no body)."""
    allowed = (*methods, "HEAD") if "GET" in methods else methods
    if scope["method"] not in allowed:
        raise ActionRefused(405, "Method not allowed.",
                            [(b"allow", ", ".join(allowed).encode())])


@dataclass(frozen=True, slots=True)
class NewSecret:
    record: KeyRecord
    secret: str


def _not_found() -> ActionRefused:
    return ActionRefused(404, "No key with this id in your account.")


def _name(value: str | None) -> str:
    try:
        return checked_name(value)
    except Rejected as exc:
        raise ActionRefused(400, exc.message) from None


async def create(store: Store, settings: Settings, account_id: str,
                 name: str | None) -> NewSecret:
    """A credit key with the credit limits, as POST /api/keys {"credit": true} makes."""
    try:
        record, secret = await create_key(store, settings, account_id,
                                          KeySpec(name=_name(name), credit=True))
    except ConfigError as exc:
        raise ActionRefused(400, str(exc)) from None
    except LimitReached as exc:
        raise ActionRefused(403, str(exc)) from None
    except NotFound:
        raise ActionRefused(404, "This account no longer exists.") from None
    return NewSecret(record, secret)


async def change(store: Store, account_id: str, key_id: str, *, name: str | None = None,
                 active: bool | None = None) -> KeyRecord:
    """Rename, activate or deactivate, as PATCH /api/keys/{keyId}."""
    try:
        record = await store.update_key(account_id, key_id, name=name, active=active)
    except ConfigError as exc:  # a deleted key
        raise ActionRefused(409, str(exc)) from None
    if record is None:
        raise _not_found()
    return record


async def rename(store: Store, account_id: str, key_id: str, name: str | None) -> KeyRecord:
    return await change(store, account_id, key_id, name=_name(name))


async def rotate(store: Store, account_id: str, key_id: str) -> NewSecret:
    """A new secret, as POST /api/keys/{keyId}/rotate: the old one stops working at once."""
    secret = new_consumption_secret()
    try:
        record = await store.rotate_key(account_id, key_id, hash_secret(secret))
    except ConfigError as exc:
        raise ActionRefused(409, str(exc)) from None
    if record is None:
        raise _not_found()
    return NewSecret(record, secret)
