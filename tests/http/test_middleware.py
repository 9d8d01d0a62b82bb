"""End-to-end behaviour of GatewayMiddleware in front of the mock upstream, on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.config.settings import Settings
from gateway.core.bounds import prompt_bound
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.types import Message, Receive, Scope, Send
from tests.conftest import bearer, client_for, gateway, new_key, post_scope, prompt_bound_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}


async def test_chat_is_admitted_billed_and_reported(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert response.status_code == 200
        assert response.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 8,
                                             "total_tokens": 18}
        assert response.headers["x-ratelimit-limit-requests"] == "60"
        assert response.headers["x-ratelimit-remaining-requests"] == "59"
        assert response.headers["x-ratelimit-limit-tokens"] == "3333"
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    # default price: 0.50 in / 1.50 out per million -> ceil(10*0.5 + 8*1.5) = 17 micro-USD
    assert usage["budget"]["spent"] == pytest.approx(17e-6)
    assert usage["rate_limits"] == {"rpm": 60, "tpm": 3333}
    assert usage["plan"]["slug"] == "standard"
    assert usage["plan"]["status"] == "active"
    assert usage["key"]["type"] == "subscription"
    # The seed's fields, and the budget windows beyond them (issue 16): the primary alone.
    assert set(usage) == {"budget", "rate_limits", "plan", "credits", "key", "budgets"}
    assert usage["budgets"] == [{"scope": "key", "primary": True, "reset": "rolling",
                                 **usage["budget"]}]


async def test_missing_and_unknown_keys_are_401(store: Store, settings: Settings,
                                                metrics: Metrics) -> None:
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
                        bearer("sk_live_" + "a" * 40), bearer("nope")):
            response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key"
            assert "sk_live_aaaa" not in response.text
    assert upstream.requests == 0


async def test_bad_bodies_are_rejected_before_the_upstream(store: Store, settings: Settings,
                                                           metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    upstream = MockUpstream()
    small = Settings(max_body_bytes=1000)
    async with client_for(gateway(upstream, store, small, metrics)) as client:
        for body in (b"not json", b"[1, 2]", b"", b'"text"'):
            response = await client.post("/v1/chat/completions", content=body,
                                         headers=bearer(secret))
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "invalid_request"
        big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 2000}]})
        response = await client.post("/v1/chat/completions", content=big,
                                     headers=bearer(secret))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    assert upstream.requests == 0



async def test_usage_is_the_response_usage_object_not_an_earlier_usage_string(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "usage"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})

    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        assert response.status_code == 200
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    # the reported 10 + 1 tokens, not the estimate of 10 + 8
    assert round(usage["budget"]["spent"] * 1e6) == settings.default_price.cost_micro(10, 1)


async def test_a_client_gone_before_any_answer_is_billed_its_prompt(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        while (await receive())["type"] != "http.disconnect":
            pass  # still working on the prompt when the client leaves

    body = orjson.dumps(CHAT)
    inbound: list[Message] = [{"type": "http.request", "body": body, "more_body": False},
                              {"type": "http.disconnect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbound.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    app = gateway(upstream, store, settings, metrics)
    await app(post_scope("/v1/chat/completions", secret, body), receive, send)
    assert sent == []  # no answer was started
    # the upstream read the prompt: it is billed at its bound (never below the server's
    # count), the completion is not
    prompt = prompt_bound(body, settings.media_part_tokens)
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(prompt, 0)


async def test_a_body_over_the_limit_is_413_without_a_content_length(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    upstream = MockUpstream()
    small = Settings(max_body_bytes=1000)
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 2000}]})

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 100):  # no Content-Length: Transfer-Encoding: chunked
            yield big[start:start + 100]

    async with client_for(gateway(upstream, store, small, metrics)) as client:
        response = await client.post("/v1/chat/completions", content=chunked(),
                                     headers=bearer(secret))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert upstream.requests == 0


async def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    upstream = MockUpstream()
    small = Settings(max_body_bytes=1000)
    scope = post_scope("/v1/chat/completions", secret, b"")
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    scope["headers"].append((b"content-length", b"%d" % (10 * 1024**3)))
    reads = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal reads
        reads += 1  # a client announcing 10 GiB must not be read from at all
        return {"type": "http.request", "body": b"{" * 100, "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    await gateway(upstream, store, small, metrics)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert reads == 0
    assert upstream.requests == 0


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "PATCH"])
async def test_metered_paths_accept_post_only(store: Store, settings: Settings,
                                              metrics: Metrics, method: str) -> None:
    secret, _, _ = await new_key(store, settings)
    upstream = MockUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            response = await client.request(method, path, headers=bearer(secret))
            assert response.status_code == 405, path
            assert response.headers["allow"] == "POST"
    assert upstream.requests == 0


async def test_the_configured_max_output_tokens_sizes_the_reservation(
        store: Store, metrics: Metrics) -> None:
    settings = Settings(max_output_tokens=100)
    secret, _, _ = await new_key(store, settings)
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}  # no max_tokens
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
    assert response.status_code == 200
    # A full 3333-token bucket less the reservation: the prompt's bound + the 100 maximum
    reserved = prompt_bound_of(body) + 100
    assert response.headers["x-ratelimit-remaining-tokens"] == str(3333 - reserved)


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_an_upstream_refusal_is_not_billed(store: Store, settings: Settings,
                                                 metrics: Metrics, status: int) -> None:
    secret, key_id, _ = await new_key(store, settings)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body",
                    "body": b'{"error": {"message": "bad request", "type": "invalid"}}'})

    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert response.status_code == status
    assert (await store.get_key(key_id)).spent == 0
