"""Consumption-key resolution with a short in-process cache.

The cache maps a secret's hash to its key reference only; whether the key may be used
(active, same secret after a rotation) is decided by the admission script every time, so
revocation takes effect at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TypeVar

from gateway.core.keys import CONSUMPTION_PREFIX, SECRET_LENGTH, bearer_token, hash_secret
from gateway.store import KeyRef, Store

_K = TypeVar("_K")
_V = TypeVar("_V")
MAX_ENTRIES = 10_000
# "Bearer " + a key and some room for spaces: anything longer names no key, and is refused
# before it is hashed or looked up.
MAX_AUTHORIZATION_BYTES = 16 + len(CONSUMPTION_PREFIX) + SECRET_LENGTH + 32


class KeyResolver:
    """Both caches are LRUs of bounded size that hold only keys that resolved: nothing a
    client sends makes them grow past MAX_ENTRIES, and unknown keys are never kept."""

    def __init__(self, store: Store, ttl_seconds: float,
                 max_entries: int = MAX_ENTRIES) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[KeyRef, float]] = OrderedDict()
        # Authorization header -> secret hash: parsing and SHA-256 once per client key,
        # not once per request. In memory only, like the request that carried it.
        self._hashes: OrderedDict[bytes, str] = OrderedDict()

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
        if authorization is None or len(authorization) > MAX_AUTHORIZATION_BYTES:
            return None
        secret_hash = self._hashes.get(authorization)
        known = secret_hash is not None
        if secret_hash is None:
            secret_hash = consumption_secret_hash(authorization)
            if secret_hash is None:
                return None
        ref = await self.resolve(secret_hash)
        if ref is None:
            return None
        if not known:
            self._remember(self._hashes, authorization, secret_hash)
        return secret_hash, ref

    async def resolve(self, secret_hash: str) -> KeyRef | None:
        ref = self._fresh(secret_hash)
        if ref is not None:
            return ref
        ref = await self._store.lookup(secret_hash)
        if ref is not None:
            self._remember(self._cache, secret_hash, (ref, time.monotonic() + self._ttl))
        return ref

    def _remember(self, cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._max:
            cache.popitem(last=False)  # the least recently resolved

    def _fresh(self, secret_hash: str) -> KeyRef | None:
        hit = self._cache.get(secret_hash)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def forget(self, secret_hash: str) -> None:
        self._cache.pop(secret_hash, None)

    def __len__(self) -> int:
        return max(len(self._cache), len(self._hashes))


def consumption_secret_hash(authorization: bytes | None) -> str | None:
    if authorization is None or len(authorization) > MAX_AUTHORIZATION_BYTES:
        return None
    token = bearer_token(authorization)
    if token is None or not token.startswith(CONSUMPTION_PREFIX):
        return None
    return hash_secret(token)


def header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in scope_headers:
        if key == name:
            return value
    return None
