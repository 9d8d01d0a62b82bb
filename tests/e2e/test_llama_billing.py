"""Billing against a real llama.cpp server: what the gateway settles equals what the server
says it did, in its answers and in its own Prometheus counters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from gateway.config.limits import RunningUsage
from gateway.config.settings import Price, Settings
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import bearer, new_key, prompt_bound_of, serving
from tests.e2e.conftest import MODEL_ALIAS, LlamaServer
from tests.processes import gateway_serve
from tests.redis_inspect import redis_of

TINY = Price(1_000_000, 2_000_000, 100_000)  # what the server reports it serves
BIG = Price(10_000_000, 20_000_000)  # the highest configured price


def settings(**extra: Any) -> Settings:
    return Settings(**{"api_plan_keys": True, "max_output_tokens": 256,
                       "model_prices": {MODEL_ALIAS: TINY, "big": BIG}, **extra})


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[Store]:
    store = connect(redis_url, timeout_seconds=5.0)
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def gateway_in_front(server: LlamaServer, store: Store, config: Settings,
                           metrics: Metrics) -> AsyncIterator[str]:
    proxy = UpstreamProxy(server.url, routes=config.routes)
    app = GatewayMiddleware(proxy, settings=config, store=store, metrics=metrics)
    async with serving(app) as base:
        yield base
    await proxy.close()


def chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hello there, tiny model"}],
            "temperature": 0, **extra}


def sse(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(block[6:]) for block in raw.split(b"\n\n")
            if block.startswith(b"data: {")]


async def spent(store: Store, key_id: str) -> int:
    return (await store.get_key(key_id)).total_spent


async def spend_settled(store: Store, key_id: str) -> None:
    """Waits (up to 10 s) for a request whose client left to be settled."""
    for _ in range(200):
        if await spent(store, key_id):
            return
        await asyncio.sleep(0.05)


def served(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[int, int, int]:
    """(prompt tokens, of them cached, completion tokens) the server counted in between."""
    evaluated, cached, predicted = (b - a for a, b in zip(before, after, strict=True))
    return evaluated + cached, cached, predicted


async def test_a_chat_answer_is_billed_the_servers_own_count(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=9),
                                     headers=bearer(secret))
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    prompt, cached, completion = served(before, llama.settled())
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion) \
        == (usage["prompt_tokens"], 9)
    assert usage["prompt_tokens_details"]["cached_tokens"] == cached
    assert await spent(redis_store, key_id) == TINY.cost_micro(prompt, completion, cached)


async def test_a_stream_that_did_not_ask_for_usage_is_billed_and_keeps_its_timings(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/chat/completions",
                                     json=chat(max_tokens=11, stream=True),
                                     headers=bearer(secret))
    events = sse(response.content)
    assert not any("usage" in e for e in events)  # the client did not ask: not shown
    assert any("timings" in e for e in events)  # what llama.cpp put beside it is kept
    assert response.content.endswith(b"data: [DONE]\n\n")
    prompt, cached, completion = served(before, llama.settled())
    assert completion == 11
    assert await spent(redis_store, key_id) == TINY.cost_micro(prompt, completion, cached)


@pytest.mark.parametrize("value", ["yes", 1, "true", "True", 0])
async def test_lax_stream_values_are_refused_before_the_server(
        llama: LlamaServer, redis_store: Store, metrics: Metrics, value: object) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/chat/completions",
                                     json=chat(max_tokens=5, stream=value),
                                     headers=bearer(secret))
    assert response.status_code == 400
    assert "stream" in response.json()["error"]["message"]
    assert llama.counters() == before
    assert await spent(redis_store, key_id) == 0


async def test_every_usage_block_of_an_n2_stream_is_billed(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat(max_tokens=7, n=2, stream=True,
                                              stream_options={"include_usage": True}),
            headers=bearer(secret))
    blocks = [e["usage"] for e in sse(response.content) if e.get("usage")]
    assert len(blocks) == 2  # llama.cpp: one per choice
    prompt, cached, completion = served(before, llama.settled())
    assert completion == 14 == sum(b["completion_tokens"] for b in blocks)
    # the prompt is evaluated once for both choices, as the server counts it
    assert {b["prompt_tokens"] for b in blocks} == {prompt}
    assert await spent(redis_store, key_id) == TINY.cost_micro(prompt, 14, cached)


async def test_every_prompt_of_a_completions_prompt_list_stream_is_billed(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    body = {"prompt": ["hello there", "abc", "a third prompt"], "max_tokens": 4,
            "temperature": 0, "stream": True}
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/completions", json=body, headers=bearer(secret))
    assert response.status_code == 200
    assert not any("usage" in e for e in sse(response.content))
    prompt, cached, completion = served(before, llama.settled())
    assert completion == 12
    assert await spent(redis_store, key_id) == TINY.cost_micro(prompt, completion, cached)


async def test_a_non_streamed_n2_answer_is_never_billed_below_the_servers_count(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    """llama.cpp reports only the first choice's usage here: the gateway bills the bound
    it forwarded, which the server (generating to the bound) matches exactly."""
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=7, n=3),
                                     headers=bearer(secret))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 7  # the server's own report
    _prompt, _cached, completion = served(before, llama.settled())
    assert completion == 21
    billed = await spent(redis_store, key_id)
    reported = response.json()["usage"]
    assert billed == TINY.cost_micro(reported["prompt_tokens"], 21,
                                     reported["prompt_tokens_details"]["cached_tokens"])


async def test_a_request_without_a_model_is_priced_as_the_model_served(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        for body in (chat(max_tokens=5), chat(max_tokens=5, model="big")):
            before = await spent(redis_store, key_id)
            response = await client.post("/v1/chat/completions", json=body,
                                         headers=bearer(secret))
            assert response.json()["model"] == MODEL_ALIAS
            usage = response.json()["usage"]
            cost = TINY.cost_micro(usage["prompt_tokens"], usage["completion_tokens"],
                                   usage["prompt_tokens_details"]["cached_tokens"])
            assert await spent(redis_store, key_id) - before == cost


async def test_a_cheap_name_for_a_dear_model_never_spends_past_the_budget(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    """llama.cpp answers any model name with its own: a request naming a cheap model is
    reserved at that price and billed at most that reservation."""
    cheap = Price(10_000, 20_000)
    config = settings(model_prices={MODEL_ALIAS: TINY, "cheap": cheap})
    secret, key_id, _ = await new_key(redis_store, config, budget_usd="0.0005",
                                      rpm=100_000, tpm=100_000_000)
    body = chat(max_tokens=200, model="cheap")
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=120) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=body, headers=bearer(secret))
            for _ in range(20)))
    assert all(r.json()["model"] == MODEL_ALIAS for r in responses if r.status_code == 200)
    assert any(r.status_code == 200 for r in responses)
    assert (await redis_store.get_key(key_id)).spent <= 500
    assert metrics.registry.get_sample_value("gateway_cost_over_reservation_total") >= 1


async def test_hostile_bounds_on_a_small_budget_never_overshoot_the_servers_count(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings(max_output_tokens=2000)
    secret, key_id, _ = await new_key(redis_store, config, budget_usd="0.002", rpm=100_000,
                                      tpm=100_000_000)
    before = llama.counters()
    tricks = [chat(max_tokens=5000, max_completion_tokens=0), chat(), chat(n_predict=-1),
              chat(max_tokens=3000, n=2)]
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=120) as client:
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=tricks[i % len(tricks)],
                        headers=bearer(secret)) for i in range(24)))
    assert {r.status_code for r in responses} <= {200, 429}
    assert any(r.status_code == 200 for r in responses)
    prompt, _cached, completion = served(before, llama.settled())
    key = await redis_store.get_key(key_id)
    assert key.spent <= 2000  # micro-USD
    # the server's own count, priced without the cache discount: within the budget too
    assert TINY.cost_micro(prompt, completion) <= 2000 + prompt_bound_of(chat())


async def test_a_client_that_leaves_mid_stream_is_billed_tokens_not_chunks(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = Settings(api_plan_keys=True, max_output_tokens=4000,
                      model_prices={MODEL_ALIAS: TINY},
                      running_usage=RunningUsage(timings_per_token=True))
    secret, key_id, account_id = await new_key(redis_store, config)
    before = llama.counters()
    body = chat(max_tokens=3000, stream=True)
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", json=body,
                                headers=bearer(secret)) as response:
            received = b""
            while received.count(b"\n\n") < 30:
                received += await response.content.readany()
            response.close()
        await spend_settled(redis_store, key_id)
    events = sse(received)
    chunks = sum(1 for e in events for c in e.get("choices", [])
                 if (c.get("delta") or {}).get("content"))
    seen = max(e["timings"]["predicted_n"] for e in events if "timings" in e)
    prompt, cached, completion = served(before, llama.settled())
    billed = await spent(redis_store, key_id)
    # At least the tokens the client received (counted as tokens, not as chunks), at most
    # what the server generated before it noticed; the prompt at the server's count.
    low = TINY.cost_micro(prompt, max(seen, chunks), cached)
    high = TINY.cost_micro(prompt, completion, cached)
    assert chunks <= seen <= completion
    assert low <= billed <= high
    assert not [k async for k in redis_of(redis_store).scan_iter(
        match=f"gw:{{acct:{account_id}}}:res:*")]  # the key is not left holding anything


async def test_a_messages_stream_left_early_is_billed_what_it_streamed(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    """llama.cpp's message_start says output_tokens 0 and is no running count: a client
    that leaves before message_delta pays for the text it received, at least."""
    config = settings(max_output_tokens=4000)
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/messages", json=body,
                                headers=bearer(secret)) as response:
            received = b""
            while received.count(b"event: content_block_delta") < 200:
                received += await response.content.readany()
            response.close()
        await spend_settled(redis_store, key_id)
    deltas = received.count(b"event: content_block_delta")
    prompt, _cached, completion = served(before, llama.settled())
    billed = await spent(redis_store, key_id)
    assert deltas >= 200
    assert billed >= TINY.cost_micro(prompt, deltas)  # one token per delta at least
    assert billed <= TINY.cost_micro(prompt_bound_of(body), completion)


async def test_a_completions_stream_left_early_counts_a_token_per_chunk(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    """Without running usage: llama.cpp's completions send a chunk per token (its text
    empty while a character's bytes are incomplete), each counted; the prompt at its
    bound, never below the server's count."""
    config = settings(max_output_tokens=4000)
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    body = {"prompt": "hello there", "max_tokens": 3000, "temperature": 0, "stream": True}
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/completions", json=body,
                                headers=bearer(secret)) as response:
            received = b""
            while received.count(b"\n\n") < 40:
                received += await response.content.readany()
            response.close()
        await spend_settled(redis_store, key_id)
    chunks = sum(1 for e in sse(received) for c in e.get("choices", [])
                 if c.get("finish_reason") is None)
    prompt, _, completion = served(before, llama.settled())
    billed = await spent(redis_store, key_id)
    bound = prompt_bound_of(body)
    assert bound >= prompt
    assert TINY.cost_micro(bound, chunks) <= billed <= TINY.cost_micro(bound, completion)


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_and_messages_apis_are_billed_the_servers_count(
        llama: LlamaServer, redis_store: Store, metrics: Metrics, stream: bool) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    calls = [("/v1/responses", {"input": "hello there", "max_output_tokens": 6,
                                "temperature": 0, "stream": stream}),
             ("/v1/messages", {"messages": [{"role": "user", "content": "hello"}],
                               "max_tokens": 6, "temperature": 0, "stream": stream})]
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        for path, body in calls:
            before_spent = await spent(redis_store, key_id)
            before = llama.counters()
            response = await client.post(path, json=body, headers=bearer(secret))
            assert response.status_code == 200, (path, response.text)
            prompt, cached, completion = served(before, llama.settled())
            assert completion == 6, path
            assert await spent(redis_store, key_id) - before_spent == TINY.cost_micro(
                prompt, completion, cached), path


async def test_a_response_is_bounded_in_every_field_llama_cpp_reads(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    """llama.cpp serves /v1/responses by copying the body into a chat request: its chat
    fields (n_predict first) bound a response too."""
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    tricks = [{"max_output_tokens": 6, "n_predict": 200},
              {"max_output_tokens": 6, "max_completion_tokens": 200, "max_tokens": 200},
              {"n_predict": 6}]
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        for trick in tricks:
            before_spent = await spent(redis_store, key_id)
            before = llama.counters()
            body = {"input": "hello there", "temperature": 0, **trick}
            response = await client.post("/v1/responses", json=body, headers=bearer(secret))
            assert response.status_code == 200, response.text
            prompt, cached, completion = served(before, llama.settled())
            assert completion == 6, trick
            assert await spent(redis_store, key_id) - before_spent == TINY.cost_micro(
                prompt, completion, cached)
        before = llama.counters()
        for path, body in (("/v1/responses", {"input": "hi", "n": 2}),
                           ("/v1/responses", {"input": "hi", "n_cmpl": 3}),
                           ("/v1/completions", {"prompt": ["a", "b"], "n": 3, "n_cmpl": 1,
                                                "stream": True})):
            response = await client.post(path, json=body, headers=bearer(secret))
            assert response.status_code == 400, body
            assert response.json()["error"]["code"] == "invalid_request"
    assert llama.counters() == before  # refused before the server


async def test_a_completions_prompt_list_with_n_cmpl_bills_each_prompt_once(
        llama: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    before = llama.counters()
    body = {"prompt": ["hello there", "abc", "a third prompt"], "max_tokens": 3,
            "n_cmpl": 2, "temperature": 0, "stream": True}
    async with gateway_in_front(llama, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/completions", json=body, headers=bearer(secret))
    assert response.status_code == 200
    prompt, cached, completion = served(before, llama.settled())
    assert completion == 18
    assert await spent(redis_store, key_id) == TINY.cost_micro(prompt, completion, cached)


async def test_embeddings_are_billed_the_servers_prompt_count(
        llama_embeddings: LlamaServer, redis_store: Store, metrics: Metrics) -> None:
    config = settings()
    secret, key_id, _ = await new_key(redis_store, config)
    async with gateway_in_front(llama_embeddings, redis_store, config, metrics) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/v1/embeddings",
                                     json={"input": ["hello there", "a second input"]},
                                     headers=bearer(secret))
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 0
    assert await spent(redis_store, key_id) == TINY.cost_micro(usage["prompt_tokens"], 0)


def test_gateway_serve_in_front_of_llama_server(llama: LlamaServer, redis_url: str) -> None:
    """As an operator runs it: `gateway serve` processes, the CLI's key, curl-like calls."""
    import json
    import subprocess
    import sys

    created = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--redis", redis_url, "--name",
         "e2e", "--plan", "pro", "--json"], capture_output=True, text=True, check=True,
        timeout=60)
    secret = json.loads(created.stdout)["key"]
    before = llama.counters()
    (served_gateway,) = gateway_serve(llama.url, redis_url)
    try:
        with httpx.Client(base_url=served_gateway.url, timeout=60) as client:
            streamed = client.post("/v1/chat/completions",
                                   json=chat(max_tokens=12, n=2, stream=True),
                                   headers=bearer(secret))
            plain = client.post("/v1/completions",
                                json={"prompt": ["one", "two"], "max_tokens": 3,
                                      "temperature": 0}, headers=bearer(secret))
            usage = client.get("/v1/usage", headers=bearer(secret)).json()
    finally:
        assert served_gateway.terminate() in (0, -15, 143)
    assert streamed.status_code == 200 and plain.status_code == 200
    _prompt, _cached, completion = served(before, llama.settled())
    assert completion == 2 * 12 + 2 * 3
    assert usage["budget"]["spent"] > 0
