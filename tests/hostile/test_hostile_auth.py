"""Unauthenticated clients cannot grow the process: the key caches hold only keys that
resolved, in bounded LRUs, and an Authorization longer than any key is refused unhashed."""

from __future__ import annotations

import resource

import pytest

import gateway.http.auth as auth_module
from gateway.config.settings import Settings
from gateway.core.keys import new_consumption_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.auth import MAX_AUTHORIZATION_BYTES, KeyResolver
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.conftest import bearer, client_for, gateway, new_key

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_unknown_keys_are_never_cached(store: Store, settings: Settings,
                                             metrics: Metrics) -> None:
    app = gateway(MockUpstream(), store, settings, metrics)
    async with client_for(app) as client:
        for _ in range(300):
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(new_consumption_secret()))
            assert response.status_code == 401
    assert len(app.resolver) == 0


async def test_the_caches_are_bounded_lrus_of_resolved_keys(store: Store,
                                                            settings: Settings) -> None:
    resolver = KeyResolver(store, 60.0, max_entries=5)
    secrets = [(await new_key(store, settings, name=f"k{i}"))[0] for i in range(8)]
    for secret in secrets:
        assert await resolver.authenticate(f"Bearer {secret}".encode()) is not None
    assert len(resolver) == 5
    assert resolver.cached(f"Bearer {secrets[0]}".encode()) is None  # the oldest: evicted
    assert resolver.cached(f"Bearer {secrets[-1]}".encode()) is not None


async def test_an_overlong_authorization_is_refused_before_hashing(
        store: Store, settings: Settings, metrics: Metrics,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = auth_module.hash_secret
    monkeypatch.setattr(auth_module, "hash_secret",
                        lambda secret: hashed.append(secret) or real(secret))
    app = gateway(MockUpstream(), store, settings, metrics)
    huge = "sk_live_" + "a" * MAX_AUTHORIZATION_BYTES
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(huge))
        usage = await client.get("/v1/usage", headers=bearer(huge))
    assert response.status_code == 401 and usage.status_code == 401
    assert hashed == []


async def test_400_fake_1mb_keys_leave_the_process_as_it_was(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """The attack that took the process from 50 to 434 MB: now refused unhashed, unkept."""
    app = gateway(MockUpstream(), store, settings, metrics)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    async with client_for(app) as client:
        for i in range(400):
            fake = f"sk_live_{i:06d}" + "x" * (1024 * 1024)
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(fake))
            assert response.status_code == 401
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(app.resolver) == 0
    assert grown_mb < 64  # a few transient request buffers, not 400 MB kept
