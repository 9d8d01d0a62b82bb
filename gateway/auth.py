"""Consumption-key resolution with a short in-process cache.

The cache maps a secret's hash to its key reference only; whether the key may be used
(active, same secret after a rotation) is decided by the admission script every time, so
revocation takes effect at once.
"""

from __future__ import annotations

import time

from gateway.keys import CONSUMPTION_PREFIX, bearer_token, hash_secret
from gateway.store import KeyRef, Store

_MAX_ENTRIES = 100_000


class KeyResolver:
    def __init__(self, store: Store, ttl_seconds: float) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._cache: dict[str, tuple[KeyRef, float]] = {}
        # Authorization header -> secret hash: parsing and SHA-256 once per client key,
        # not once per request. In memory only, like the request that carried it.
        self._hashes: dict[bytes, str] = {}

    def cached(self, authorization: bytes | None) -> tuple[str, KeyRef] | None:
        """authenticate()'s answer when the cache has it, without a coroutine: the hot path."""
        secret_hash = self._hashes.get(authorization) if authorization is not None else None
        if secret_hash is None:
            return None
        ref = self._fresh(secret_hash)
        return None if ref is None else (secret_hash, ref)

    async def authenticate(self, authorization: bytes | None) -> tuple[str, KeyRef] | None:
        """(secret hash, key) for an `Authorization: Bearer sk_live_...` header, or None
        when it names no key. Raises StoreUnavailable when the lookup cannot be made."""
        if authorization is None:
            return None
        secret_hash = self._hashes.get(authorization)
        if secret_hash is None:
            secret_hash = consumption_secret_hash(authorization)
            if secret_hash is None:
                return None
            if len(self._hashes) >= _MAX_ENTRIES:
                self._hashes.clear()
            self._hashes[authorization] = secret_hash
        ref = await self.resolve(secret_hash)
        return None if ref is None else (secret_hash, ref)

    async def resolve(self, secret_hash: str) -> KeyRef | None:
        ref = self._fresh(secret_hash)
        if ref is not None:
            return ref
        ref = await self._store.lookup(secret_hash)
        if ref is not None:
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[secret_hash] = (ref, time.monotonic() + self._ttl)
        return ref

    def _fresh(self, secret_hash: str) -> KeyRef | None:
        hit = self._cache.get(secret_hash)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def forget(self, secret_hash: str) -> None:
        self._cache.pop(secret_hash, None)


def consumption_secret_hash(authorization: bytes | None) -> str | None:
    token = bearer_token(authorization)
    if token is None or not token.startswith(CONSUMPTION_PREFIX):
        return None
    return hash_secret(token)


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in scope_headers:
        if key == name:
            return value
    return None
