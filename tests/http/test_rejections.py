"""Every rejection: status, OpenAI-style body, headers, and that the upstream never sees it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest

import gateway.http.auth as auth_module
from gateway.config.settings import Settings
from gateway.core.keys import hash_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import StoreUnavailable
from gateway.http.auth import KeyResolver
from gateway.http.ratelimit import (
    BUDGET_EXHAUSTED,
    CREDITS_EXHAUSTED,
    DEACTIVATED,
    EXPIRED,
    RPM_EXHAUSTED,
    TPM_EXHAUSTED,
    UNKNOWN_KEY,
    format_reset,
    rate_headers,
    rejection,
)
from gateway.obs.metrics import Metrics
from gateway.store import Decision, Names, Store, connect
from gateway.store.lifecycle import KeyChange
from tests.conftest import bearer, client_for, gateway, new_key, prompt_bound_of
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


async def test_deactivated_key_is_403_at_once_even_when_cached(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings)
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        ok = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert ok.status_code == 200
        await store.change_key(key_id, KeyChange(active=False))
        for path in ("/v1/chat/completions", "/v1/usage"):
            method = client.post if path != "/v1/usage" else client.get
            kwargs = {"json": CHAT} if path != "/v1/usage" else {}
            response = await method(path, headers=bearer(secret), **kwargs)  # type: ignore[operator]
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "key_deactivated"
        await store.change_key(key_id, KeyChange(active=True))
        again = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert again.status_code == 200
    assert upstream.requests == 2


async def test_cached_key_lookups_expire_after_auth_cache_seconds(
        store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission re-checks a cached key every time (above); the cache itself must still
    forget a secret whose mapping is gone once auth_cache_seconds have passed."""
    secret, _, _ = await new_key(store, settings)
    clock = SimpleNamespace(monotonic=lambda: 1000.0)
    monkeypatch.setattr(auth_module, "time", clock)  # this module's clock only
    resolver = KeyResolver(store, ttl_seconds=5.0)
    secret_hash = hash_secret(secret)
    assert await resolver.resolve(secret_hash) is not None
    await redis_of(store).delete(Names.secret(secret_hash))
    clock.monotonic = lambda: 1004.9
    assert await resolver.resolve(secret_hash) is not None  # still cached
    clock.monotonic = lambda: 1005.1
    assert await resolver.resolve(secret_hash) is None


async def test_expired_subscription_is_403_but_usage_still_answers(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, expires_in="1s")
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        await asyncio.sleep(1.1)
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "subscription_expired"
        usage = await client.get("/v1/usage", headers=bearer(secret))
    assert usage.status_code == 200
    assert usage.json()["plan"]["status"] == "expired"
    assert upstream.requests == 0


async def test_rpm_retry_after_is_the_true_wait(store: Store, settings: Settings,
                                               metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, rpm=1)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        first = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        second = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.status_code == 429
    assert 58 <= int(second.headers["retry-after"]) <= 60
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")
    error = second.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")


async def test_request_larger_than_the_tpm_bucket_is_admitted_once_then_waits(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, tpm=60)
    big = {**CHAT, "max_tokens": 600}  # far more than the whole bucket
    upstream = MockUpstream(max_words=100)
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        first = await client.post("/v1/chat/completions", json=big, headers=bearer(secret))
        second = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    # actual usage 2 + 100 tokens left the 60-token bucket 42 in debt; it refills at one
    # token per second, and the next request (its prompt's bound and 8 tokens, more than
    # the bucket) waits for the whole bucket: 42 + 60 seconds
    assert 100 <= int(second.headers["retry-after"]) <= 102
    assert upstream.requests == 1


async def test_other_v1_paths_need_a_key_and_count_one_request(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, rpm=2)
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        assert (await client.get("/v1/models")).status_code == 401
        statuses = [(await client.get("/v1/models", headers=bearer(secret))).status_code
                    for _ in range(3)]
        usage = await client.get("/v1/usage", headers=bearer(secret))
    assert statuses == [200, 200, 429]
    assert usage.status_code == 200  # /v1/usage does not count against the RPM
    assert usage.json()["budget"]["spent"] == 0


async def test_a_rotated_secret_is_dropped_from_the_lookup_cache(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings)
    cached = Settings(api_plan_keys=True, auth_cache_seconds=3600)
    app = gateway(MockUpstream(), store, cached, metrics)
    authorization = f"Bearer {secret}".encode()
    async with client_for(app) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT,
                                  headers=bearer(secret))).status_code == 200
        assert app.resolver.cached(authorization) is not None
        await store.rotate_key(account_id, key_id, hash_secret("sk_live_" + "N" * 40))
        stale = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert stale.status_code == 401
    # The admission said the secret names no key: it is not trusted from the cache again.
    assert app.resolver.cached(authorization) is None


async def test_usage_is_404_when_the_record_is_gone(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    secret, key_id, account_id = await new_key(store, settings)
    await redis_of(store).delete(Names.key(account_id, key_id))
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.get("/v1/usage", headers=bearer(secret))
        missing = await client.get("/v1/usage", headers=bearer("sk_live_" + "Z" * 40))
    assert response.status_code == 404
    assert missing.status_code == 401


async def test_store_down_means_503_for_inference_and_502_for_usage(
        tmp_path: object, settings: Settings, metrics: Metrics) -> None:
    dead = connect(f"unix://{tmp_path}/no-redis.sock", timeout_seconds=0.2)
    upstream = MockUpstream()
    secret = "sk_live_" + "Q" * 40
    async with client_for(gateway(upstream, dead, settings, metrics)) as client:
        inference = await client.post("/v1/chat/completions", json=CHAT,
                                      headers=bearer(secret))
        usage = await client.get("/v1/usage", headers=bearer(secret))
        ready = await client.get("/readyz")
    assert inference.status_code == 503
    assert inference.json()["error"]["code"] == "limiter_unavailable"
    assert usage.status_code == 502
    assert usage.json()["error"]["code"] == "usage_unavailable"
    assert ready.status_code == 503
    assert upstream.requests == 0
    try:
        await dead.ping()
    except StoreUnavailable as exc:
        assert "Q" * 10 not in str(exc)
    await dead.close()


async def test_plans_and_health(store: Store, settings: Settings, metrics: Metrics) -> None:
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        plans = (await client.get("/api/plans")).json()
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/v1/usage")).status_code == 405
    assert plans == [
        {"slug": "standard", "name": "Standard", "priceUsdc": "20",
         "rateLimits": {"tpm_limit": 3333, "rpm_limit": 60}, "models": []},
        {"slug": "pro", "name": "Pro", "priceUsdc": "60",
         "rateLimits": {"tpm_limit": 13333, "rpm_limit": 200}, "models": []},
    ]


async def test_only_public_paths_pass_without_a_key(store: Store, settings: Settings,
                                              metrics: Metrics) -> None:
    seen: list[str] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    secret, _, _ = await new_key(store, settings)
    async with client_for(gateway(app, store, settings, metrics)) as client:
        assert (await client.get("/health")).status_code == 204  # public by default
        # anything else could be inference unbilled (vLLM's /tokenize, /pooling...): a key
        assert (await client.get("/docs")).status_code == 401
        assert (await client.post("/tokenize", json={})).status_code == 401
        assert (await client.get("/docs", headers=bearer(secret))).status_code == 204
    assert seen == ["/health", "/docs"]
    public = Settings(api_plan_keys=True, public_paths=("/health", "/docs*"))
    async with client_for(gateway(app, store, public, metrics)) as client:
        assert (await client.get("/docs/index.html")).status_code == 204
        assert (await client.get("/other")).status_code == 401


async def test_unbelievable_usage_falls_back_to_the_estimate(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, account_id = await new_key(store, settings)

    def upstream_reporting(usage: object):  # type: ignore[no-untyped-def]
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            while (await receive()).get("more_body"):
                pass
            body = orjson.dumps({"choices": [], "usage": usage})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
        return app

    # the bound reserved: the prompt's bytes (and the template allowance), max_tokens 4
    estimate = settings.default_price.cost_micro(prompt_bound_of(CHAT), 4)
    for usage in ({"prompt_tokens": 1, "completion_tokens": True},
                  {"prompt_tokens": -1000, "completion_tokens": 3},
                  {"prompt_tokens": "7", "completion_tokens": 3},
                  {"prompt_tokens": 1, "completion_tokens": 10**18},
                  {"prompt_tokens": 1.5, "completion_tokens": 3}):
        before = (await store.get_key((await store.list_keys(account_id))[0].id)).spent
        app = gateway(upstream_reporting(usage), store, settings, metrics)
        async with client_for(app) as client:
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
        assert response.status_code == 200, usage
        after = (await store.get_key((await store.list_keys(account_id))[0].id)).spent
        assert after - before == estimate, usage
    reservations = Names.reservation(account_id, "*")
    assert [k async for k in redis_of(store).scan_iter(match=reservations)] == []


async def test_listing_survives_a_key_record_deleted_by_hand(
        store: Store, settings: Settings) -> None:
    _, gone, account_id = await new_key(store, settings, name="gone")
    _, kept, _ = await new_key(store, settings, account_id, name="kept")
    await redis_of(store).delete(Names.key(account_id, gone))
    assert [k.id for k in await store.list_keys(account_id)] == [kept]


async def test_absurd_reservations_are_400_and_n_multiplies_the_reservation(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, tpm=1000)
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for extra in ({"max_tokens": 10**18}, {"max_tokens": -1}, {"max_tokens": "8"},
                      {"n": 0}, {"n": 10**6}, {"best_of": True}):
            response = await client.post("/v1/chat/completions", json={**CHAT, **extra},
                                         headers=bearer(secret))
            assert response.status_code == 400, extra
            assert next(iter(extra)) in response.json()["error"]["message"]
        # 2 + 100 x 16 choices = 1602 tokens: more than the 1000-token bucket holds, so the
        # request is admitted once (the bucket is full) and the next one must wait
        first = await client.post("/v1/chat/completions",
                                  json={**CHAT, "max_tokens": 100, "n": 16},
                                  headers=bearer(secret))
        assert first.status_code == 200
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 0
    assert upstream.requests == 1


@pytest.mark.parametrize("wait_us,header", [
    (1, b"1"), (999_999, b"1"), (1_000_000, b"1"), (1_000_001, b"2"), (29_500_000, b"30"),
    (0, b"1"),  # never 0: a client that retries at once would only be refused again
])
def test_retry_after_rounds_the_wait_up_to_whole_seconds(wait_us: int, header: bytes) -> None:
    decision = Decision(RPM_EXHAUSTED, 60, 0, 1_000_000, 1000, 900, 0, wait_us, "standard",
                        "plan")
    refused = rejection(decision)
    assert refused.status == 429
    assert dict(refused.headers)[b"retry-after"] == header


@pytest.mark.parametrize("micros,text", [
    (-5, "0ms"), (0, "0ms"), (1, "1ms"), (999_000, "999ms"), (999_001, "1s"),
    (1_000_000, "1s"), (1_500_000, "1.5s"), (1_234_567, "1.235s"), (59_999_000, "59.999s"),
    (60_000_000, "1m0s"), (360_000_000, "6m0s"), (3_600_000_000, "1h0m0s"),
    (3_723_000_000, "1h2m3s"), (3_723_500_000, "1h2m3.5s"),
])
def test_reset_is_formatted_like_openai_and_rounded_up(micros: int, text: str) -> None:
    assert format_reset(micros) == text


def test_rate_headers_report_each_bucket_separately() -> None:
    decision = Decision(0, 60, 59, 1_000_000, 3333, 3000, 18_000_000, -1, "standard", "plan")
    assert rate_headers(decision) == [
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s"),
        (b"x-ratelimit-limit-tokens", b"3333"),
        (b"x-ratelimit-remaining-tokens", b"3000"),
        (b"x-ratelimit-reset-tokens", b"18s"),
    ]


@pytest.mark.parametrize("code,status,error_code,error_type,message", [
    (UNKNOWN_KEY, 401, "invalid_api_key", "invalid_request_error", "Invalid API key."),
    (DEACTIVATED, 403, "key_deactivated", "permission_error", "deactivated"),
    (EXPIRED, 403, "subscription_expired", "permission_error", "expired"),
    (RPM_EXHAUSTED, 429, "rate_limit_exceeded", "requests", "60 requests per minute"),
    (TPM_EXHAUSTED, 429, "rate_limit_exceeded", "tokens", "3333 tokens per minute"),
    (BUDGET_EXHAUSTED, 429, "budget_exceeded", "insufficient_quota", "budget"),
    (CREDITS_EXHAUSTED, 429, "insufficient_credits", "insufficient_quota", "credit balance"),
])
def test_each_refusal_has_its_status_code_type_and_message(
        code: int, status: int, error_code: str, error_type: str, message: str) -> None:
    decision = Decision(code, 60, 0, 1_000_000, 3333, 0, 18_000_000, 2_000_000, "standard",
                        "plan")
    refused = rejection(decision)
    assert (refused.status, refused.code, refused.error_type) == (status, error_code, error_type)
    assert message in refused.message
    headers = dict(refused.headers)
    if status == 429:
        assert headers[b"retry-after"] == b"2"
        assert headers[b"x-ratelimit-limit-tokens"] == b"3333"
    else:
        assert b"retry-after" not in headers
