"""The money path against hostile clients: no budget, credit or TPM overshoot whatever the
request says, in both shapes (middleware, and the proxy in front of a real HTTP upstream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config.settings import Price, Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import bearer, client_for, gateway, new_key, prompt_bound_of, serving

PRICE = Price(1_000_000, 2_000_000)  # $1 in, $2 out per million tokens


class Generous(MockUpstream):
    """Generates every token it is allowed (no 16-word cap), and remembers each body."""

    def __init__(self) -> None:
        super().__init__(max_words=1_000_000)
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            received = b""
            while True:
                message = await receive()
                received += message.get("body", b"")
                if not message.get("more_body"):
                    break
            self.bodies.append(orjson.loads(received))
            replayed = False

            async def again() -> Any:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": received, "more_body": False}
                return await receive()

            await super().__call__(scope, again, send)
            return
        await super().__call__(scope, receive, send)


def limit_of(body: dict[str, Any]) -> int:
    """What a vLLM-like upstream would generate for this body, at most."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or 1_000_000)


@contextlib.asynccontextmanager
async def shape(name: str, upstream: ASGIApp, store: Store, settings: Settings,
                metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway: as middleware around `upstream`, or as the proxy in front
    of it served over real HTTP."""
    if name == "middleware":
        async with client_for(gateway(upstream, store, settings, metrics)) as client:
            yield client
        return
    async with serving(upstream) as base:
        proxy = UpstreamProxy(base)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            yield client
        await proxy.close()


HOSTILE = [
    {"max_tokens": 5000, "max_completion_tokens": 0},
    {"max_tokens": 5000, "max_completion_tokens": None},
    {},  # no limit at all: the upstream would generate up to its context length
    {"max_tokens": 3000, "n": 3},
    {"max_completion_tokens": 2000, "n_predict": -1},
    {"max_tokens": 4000, "min_tokens": 4000},
]


def chat(extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi " * 10}], **extra}


@pytest.mark.parametrize("shape_name", ["middleware", "proxy"])
@pytest.mark.parametrize("trick", range(len(HOSTILE)))
async def test_no_budget_overshoot_under_concurrent_tricks(
        store: Store, metrics: Metrics, shape_name: str, trick: int) -> None:
    settings = Settings(default_price=PRICE, max_output_tokens=8000, api_plan_keys=True)
    secret, key_id, _ = await new_key(store, settings, budget_usd="0.01", rpm=100_000,
                                      tpm=100_000_000)
    upstream = Generous()
    body = chat(HOSTILE[trick])
    async with shape(shape_name, upstream, store, settings, metrics) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for _ in range(50)))
    assert {r.status_code for r in responses} <= {200, 429}
    served = [r for r in responses if r.status_code == 200]
    assert served
    for forwarded in upstream.bodies:  # the upstream was told the bound it could generate
        assert limit_of(forwarded) <= 8000
    key = await store.get_key(key_id)
    assert key.spent <= 10_000  # $0.01, to the micro-dollar
    billed = sum(PRICE.cost_micro(r.json()["usage"]["prompt_tokens"],
                                  r.json()["usage"]["completion_tokens"]) for r in served)
    assert key.spent == billed


@pytest.mark.parametrize("shape_name", ["middleware", "proxy"])
async def test_no_credit_overshoot_and_the_balance_never_goes_negative(
        store: Store, metrics: Metrics, shape_name: str) -> None:
    settings = Settings(default_price=PRICE, max_output_tokens=8000, api_plan_keys=True)
    secret, _, account = await new_key(store, settings, credit=True, rpm=100_000,
                                       tpm=100_000_000)
    await store.add_credits(account, 10_000)  # $0.01
    upstream = Generous()
    async with shape(shape_name, upstream, store, settings, metrics) as client:
        tricks = [chat(HOSTILE[i % len(HOSTILE)]) for i in range(60)]
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for body in tricks))
    assert {r.status_code for r in responses} <= {200, 429}
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} \
        <= {"insufficient_credits"}
    balance = (await store.get_account(account)).credits
    assert balance >= 0
    served = [r for r in responses if r.status_code == 200]
    billed = sum(PRICE.cost_micro(r.json()["usage"]["prompt_tokens"],
                                  r.json()["usage"]["completion_tokens"]) for r in served)
    assert balance == 10_000 - billed


async def test_a_clamped_request_is_forwarded_with_the_bound_that_was_paid(
        store: Store, metrics: Metrics) -> None:
    settings = Settings(default_price=PRICE, max_output_tokens=8000, api_plan_keys=True)
    secret, key_id, _ = await new_key(store, settings, budget_usd="0.001")  # 1000 micro-USD
    upstream = Generous()
    body = chat({"max_tokens": 5000, "max_completion_tokens": 0})
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
    assert response.status_code == 200
    prompt = prompt_bound_of(body)
    affordable = (1000 - PRICE.prompt_micro(prompt)) // 2  # $2 per million: 2 micro a token
    assert upstream.bodies[0]["max_tokens"] == affordable
    assert upstream.bodies[0]["max_completion_tokens"] == affordable
    assert response.json()["usage"]["completion_tokens"] == affordable
    assert (await store.get_key(key_id)).spent <= 1000


async def test_reject_mode_refuses_what_the_budget_cannot_pay_in_full(
        store: Store, metrics: Metrics) -> None:
    settings = Settings(default_price=PRICE, on_insufficient="reject", api_plan_keys=True)
    secret, _, _ = await new_key(store, settings, budget_usd="0.001")
    upstream = Generous()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        too_big = await client.post("/v1/chat/completions", json=chat({"max_tokens": 5000}),
                                    headers=bearer(secret))
        fits = await client.post("/v1/chat/completions", json=chat({"max_tokens": 10}),
                                 headers=bearer(secret))
    assert too_big.status_code == 429
    assert too_big.json()["error"]["code"] == "budget_exceeded"
    assert fits.status_code == 200
    assert len(upstream.bodies) == 1


async def test_not_even_the_prompt_affordable_is_refused(store: Store,
                                                         metrics: Metrics) -> None:
    settings = Settings(default_price=PRICE, api_plan_keys=True)
    secret, _, account = await new_key(store, settings, credit=True)
    body = chat({"max_tokens": 10})
    await store.add_credits(account, PRICE.prompt_micro(prompt_bound_of(body)))
    upstream = Generous()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert upstream.bodies == []


@pytest.mark.parametrize("shape_name", ["middleware", "proxy"])
async def test_tokens_served_in_a_minute_stay_within_tpm_and_one_request(
        store: Store, settings: Settings, metrics: Metrics, shape_name: str) -> None:
    secret, _, _ = await new_key(store, settings, rpm=100_000, tpm=13_333)
    upstream = Generous()
    body = chat({"max_tokens": 5000, "max_completion_tokens": 0})
    started = await store.now_us()
    async with shape(shape_name, upstream, store, settings, metrics) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for _ in range(50)))
    elapsed = (await store.now_us() - started) / 1e6
    served = [r for r in responses if r.status_code == 200]
    tokens = sum(r.json()["usage"]["total_tokens"] for r in served)
    one_request = prompt_bound_of(body) + 1024  # the settings' default maximum
    assert tokens <= 13_333 + elapsed * 13_333 / 60 + one_request
    assert {r.json()["error"]["type"] for r in responses if r.status_code == 429} == {"tokens"}


async def test_usage_above_the_forwarded_bound_is_billed_at_the_bound(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings)

    async def liar(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        body = orjson.dumps({"model": "m", "choices": [], "usage": {
            "prompt_tokens": 9, "completion_tokens": 100_000}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async with client_for(gateway(liar, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=chat({"max_tokens": 20}),
                                     headers=bearer(secret))
    assert response.status_code == 200
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(9, 20)
    assert metrics.registry.get_sample_value("gateway_usage_over_bound_total") == 1


def reporting(model: str, prompt_tokens: int, completion_tokens: int) -> ASGIApp:
    """An upstream that answers as `model` with the given usage, whatever was asked."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        body = orjson.dumps({"model": model, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_model_served_dearer_than_the_one_asked_is_billed_at_most_the_reservation(
        store: Store, metrics: Metrics) -> None:
    """A llama.cpp alias: the request names a cheap model, the server answers as a dear
    one. Priced as served, the bill would pass what the budget let through."""
    cheap, dear = Price(100_000, 200_000), Price(10_000_000, 20_000_000)
    config = Settings(model_prices={"cheap": cheap, "dear": dear})
    secret, key_id, _ = await new_key(store, config, budget_usd="0.01")
    body = chat({"model": "cheap", "max_tokens": 20})
    async with client_for(gateway(reporting("dear", 9, 20), store, config, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body,
                                     headers=bearer(secret))
    assert response.status_code == 200
    reserved = cheap.cost_micro(prompt_bound_of(body), 20)
    assert dear.cost_micro(9, 20) > reserved  # the case this test is about
    assert (await store.get_key(key_id)).spent == reserved
    assert metrics.registry.get_sample_value("gateway_cost_over_reservation_total") == 1


async def test_a_prompt_counted_above_its_bound_is_billed_within_the_reservation(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings)
    body = chat({"max_tokens": 20})
    bound = prompt_bound_of(body)
    async with client_for(gateway(reporting("m", bound * 10, 5), store, settings,
                                  metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body,
                                     headers=bearer(secret))
    assert response.status_code == 200
    price = settings.default_price
    assert (await store.get_key(key_id)).spent == price.cost_micro(bound, 20)
    # within the reservation, the bill is the server's own count
    async with client_for(gateway(reporting("m", bound + 3, 5), store, settings,
                                  metrics)) as client:
        await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
    assert (await store.get_key(key_id)).spent == (price.cost_micro(bound, 20)
                                                   + price.cost_micro(bound + 3, 5))


async def test_a_prompt_list_stream_with_best_of_bills_every_prompt(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """best_of makes more sequences but answers one per prompt: the blocks' indices run one
    per prompt, and each prompt is billed, not one in best_of."""
    secret, key_id, _ = await new_key(store, settings)

    async def completions(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index, prompt in enumerate((40, 50, 60)):
            chunk = {"model": "m", "choices": [
                {"index": index, "text": "x", "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": 2}}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(chunk) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    body = {"model": "m", "prompt": ["a" * 40, "b" * 50, "c" * 60], "max_tokens": 2,
            "best_of": 2, "stream": True}
    async with client_for(gateway(completions, store, settings, metrics)) as client:
        response = await client.post("/v1/completions", json=body, headers=bearer(secret))
    assert response.status_code == 200
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(150, 6)


@pytest.mark.parametrize("media", [b"application/json", b"text/event-stream"])
async def test_a_compressed_answer_is_billed_at_the_bound(
        store: Store, settings: Settings, metrics: Metrics, media: bytes) -> None:
    """An app that compresses its own answers (middleware shape): the usage inside cannot
    be read, so the bill is the bound forwarded, never the prompt alone or nothing."""
    import gzip

    secret, key_id, _ = await new_key(store, settings)
    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    if media == b"text/event-stream":
        plain = b"data: " + orjson.dumps({"model": "m", "choices": [], "usage": usage}) + \
            b"\n\ndata: [DONE]\n\n"
    else:
        plain = orjson.dumps({"model": "m", "choices": [], "usage": usage})

    async def compressing(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", media), (b"content-encoding", b"gzip")]})
        await send({"type": "http.response.body", "body": gzip.compress(plain)})

    body = chat({"max_tokens": 20, "stream": media == b"text/event-stream"})
    async with client_for(gateway(compressing, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body,
                                     headers=bearer(secret))
    assert response.status_code == 200
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(
        prompt_bound_of(body), 20)


@pytest.mark.parametrize("n", [1, 2])
async def test_a_large_llama_cpp_answer_in_pieces_reporting_its_first_result_only(
        store: Store, settings: Settings, metrics: Metrics, n: int) -> None:
    """llama.cpp's non-streamed n > 1 answer carries the first choice's usage only; over the
    256 KiB the middleware holds, its head (the choices) is gone: `timings` in the tail
    still tell, and the bill is the bound forwarded. With n = 1 the usage is exact."""
    secret, key_id, _ = await new_key(store, settings)

    async def llama(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        choices = [{"index": i, "message": {"role": "assistant", "content": "x" * 200_000},
                    "finish_reason": "length"} for i in range(n)]
        doc = orjson.dumps({"choices": choices, "model": "m", "object": "chat.completion",
                            "usage": {"prompt_tokens": 9, "completion_tokens": 5},
                            "timings": {"predicted_n": 5}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        for start in range(0, len(doc), 64 * 1024):
            await send({"type": "http.response.body", "body": doc[start:start + 64 * 1024],
                        "more_body": start + 64 * 1024 < len(doc)})

    body = chat({"max_tokens": 20, "n": n})
    async with client_for(gateway(llama, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=body,
                                     headers=bearer(secret))
    assert response.status_code == 200
    price = settings.default_price
    expected = price.cost_micro(9, 5) if n == 1 else price.cost_micro(9, 20 * n)
    assert (await store.get_key(key_id)).spent == expected


async def test_a_messages_stream_without_message_start_bills_the_prompt_bound(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """llama.cpp sometimes leaves message_start out: the prompt count never arrives, and the
    prompt is billed at its bound, not at 0."""
    secret, key_id, _ = await new_key(store, settings)

    async def messages(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        events = [("message_delta", {"type": "message_delta",
                                     "usage": {"output_tokens": 5}}),
                  ("message_stop", {"type": "message_stop"})]
        for name, doc in events:
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc)
                        + b"\n\n"})
        await send({"type": "http.response.body", "body": b""})

    body = {"model": "m", "messages": [{"role": "user", "content": "hello " * 60}],
            "max_tokens": 5, "stream": True}
    async with client_for(gateway(messages, store, settings, metrics)) as client:
        response = await client.post("/v1/messages", json=body, headers=bearer(secret))
    assert response.status_code == 200
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(
        prompt_bound_of(body), 5)
