"""Every inference route is metered, in both shapes: the usage each API reports is billed,
priced by the model the upstream says it served."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config.routes import Kind as RouteKind
from gateway.config.routes import Route
from gateway.config.settings import Price, Settings
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import bearer, client_for, gateway, new_key, serving

SERVED = Price(1_000_000, 2_000_000, 250_000)


async def _body(receive: Receive) -> dict[str, Any]:
    data = b""
    while True:
        message = await receive()
        data += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _json(send: Send, doc: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(doc)})


async def _sse(send: Send, events: list[tuple[str | None, Any]]) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    for name, doc in events:
        head = b"event: " + name.encode() + b"\n" if name else b""
        await send({"type": "http.response.body", "more_body": True,
                    "body": head + b"data: " + orjson.dumps(doc) + b"\n\n"})
    await send({"type": "http.response.body", "body": b""})


class ApiUpstream:
    """Answers each API in its own shape, serving the model `served`, and records paths."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _body(receive)
        path = scope["path"]
        self.paths.append(path)
        self.bodies.append(body)
        stream = body.get("stream") is True
        if path == "/v1/responses":
            usage = {"input_tokens": 30, "output_tokens": 5,
                     "input_tokens_details": {"cached_tokens": 10}}
            response = {"object": "response", "model": "served", "usage": usage}
            if stream:
                await _sse(send, [(None, {"type": "response.created",
                                          "response": {"model": "served"}}),
                                  (None, {"type": "response.output_text.delta", "delta": "a"}),
                                  (None, {"type": "response.completed", "response": response})])
            else:
                await _json(send, response)
        elif path == "/v1/messages":
            if stream:
                await _sse(send, [
                    ("message_start", {"type": "message_start", "message": {
                        "model": "served", "usage": {"input_tokens": 20,
                                                     "cache_read_input_tokens": 10,
                                                     "output_tokens": 1}}}),
                    ("content_block_delta", {"type": "content_block_delta",
                                             "delta": {"type": "text_delta", "text": "hi"}}),
                    ("message_delta", {"type": "message_delta",
                                       "usage": {"output_tokens": 5}}),
                    ("message_stop", {"type": "message_stop"})])
            else:
                await _json(send, {"type": "message", "model": "served", "usage": {
                    "input_tokens": 20, "cache_read_input_tokens": 10, "output_tokens": 5}})
        elif path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            await _json(send, {"model": "served", "results": [], "usage": {"total_tokens": 30}})
        elif path in ("/v1/score", "/score", "/pooling", "/classify", "/v1/embeddings"):
            await _json(send, {"model": "served", "data": [],
                               "usage": {"prompt_tokens": 30, "total_tokens": 30}})
        elif path.startswith("/v1/audio/"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"text": "hello"}'})
        else:  # chat and completions (and /invocations dispatching to them)
            usage = {"prompt_tokens": 30, "completion_tokens": 5,
                     "prompt_tokens_details": {"cached_tokens": 10}}
            if stream:
                await _sse(send, [(None, {"model": "served", "choices": [
                    {"index": 0, "delta": {"content": "a"}}]}),
                    (None, {"model": "served", "choices": [], "usage": usage})])
            else:
                await _json(send, {"model": "served", "choices": [], "usage": usage})


def config(**extra: Any) -> Settings:
    return Settings(**{"api_plan_keys": True, "model_prices": {"served": SERVED},
                       **extra})


@contextlib.asynccontextmanager
async def shape(name: str, upstream: ASGIApp, store: Store, settings: Settings,
                metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    if name == "middleware":
        async with client_for(gateway(upstream, store, settings, metrics)) as client:
            yield client
        return
    async with serving(upstream) as base:
        proxy = UpstreamProxy(base, routes=settings.routes)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            yield client
        await proxy.close()


CALLS = [
    ("/v1/responses", {"input": "hello", "max_output_tokens": 5}, (30, 5, 10)),
    ("/v1/responses", {"input": "hello", "max_output_tokens": 5, "stream": True}, (30, 5, 10)),
    ("/v1/messages", {"messages": [], "max_tokens": 5}, (30, 5, 10)),
    ("/v1/messages", {"messages": [], "max_tokens": 5, "stream": True}, (30, 5, 10)),
    ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}, (30, 0, 0)),
    ("/v2/rerank", {"query": "q", "documents": ["a"]}, (30, 0, 0)),
    ("/rerank", {"query": "q", "documents": ["a"]}, (30, 0, 0)),
    ("/v1/score", {"text_1": "a", "text_2": "b"}, (30, 0, 0)),
    ("/score", {"text_1": "a", "text_2": "b"}, (30, 0, 0)),
    ("/pooling", {"input": "a"}, (30, 0, 0)),
    ("/classify", {"input": "a"}, (30, 0, 0)),
    ("/v1/embeddings", {"input": "a"}, (30, 0, 0)),
    ("/invocations", {"messages": [], "max_tokens": 5}, (30, 5, 10)),
    ("/invocations", {"prompt": "p", "max_tokens": 5, "stream": True}, (30, 5, 10)),
    ("/v1/chat/completions", {"messages": [], "max_tokens": 5}, (30, 5, 10)),
    ("/v1/completions", {"prompt": "p", "max_tokens": 5, "stream": True}, (30, 5, 10)),
]


@pytest.mark.parametrize("shape_name", ["middleware", "proxy"])
async def test_every_inference_route_is_billed_its_reported_usage(
        store: Store, metrics: Metrics, shape_name: str) -> None:
    settings = config()
    secret, key_id, _ = await new_key(store, settings)
    upstream = ApiUpstream()
    async with shape(shape_name, upstream, store, settings, metrics) as client:
        for path, body, (prompt, completion, cached) in CALLS:
            before = (await store.get_key(key_id)).total_spent
            response = await client.post(path, json=body, headers=bearer(secret))
            assert response.status_code == 200, (path, response.text)
            after = (await store.get_key(key_id)).total_spent
            assert after - before == SERVED.cost_micro(prompt, completion, cached), path
    assert upstream.paths == [path for path, _, _ in CALLS]


@pytest.mark.parametrize("shape_name", ["middleware", "proxy"])
async def test_audio_is_billed_per_request_at_the_configured_price(
        store: Store, metrics: Metrics, shape_name: str) -> None:
    settings = Settings.from_mapping({"pricing": {"per_request": "0.004"},
                                      "routes": {"/v1/audio/speech": {"request_usd": 0.01}}})
    secret, key_id, _ = await new_key(store, Settings(api_plan_keys=True))
    upstream = ApiUpstream()
    async with shape(shape_name, upstream, store, settings, metrics) as client:
        upload = await client.post("/v1/audio/transcriptions", headers=bearer(secret),
                                   files={"file": ("a.wav", b"RIFF" + b"\0" * 64)},
                                   data={"model": "whisper"})
        assert upload.status_code == 200, upload.text
        assert (await store.get_key(key_id)).total_spent == 4000
        speech = await client.post("/v1/audio/speech", headers=bearer(secret),
                                   json={"model": "tts", "input": "hello", "voice": "x"})
        assert speech.status_code == 200
    assert (await store.get_key(key_id)).total_spent == 4000 + 10_000


async def test_a_route_added_in_the_config_is_metered_and_forwarded(
        store: Store, metrics: Metrics) -> None:
    settings = Settings.from_mapping({
        "routes": {"/v1/custom/chat": {"kind": "chat"}},
        "pricing": {"models": {"served": {"input": 1, "output": 2, "cached_input": 0.25}}}})
    assert settings.routes["/v1/custom/chat"] == Route("/v1/custom/chat", RouteKind.CHAT)
    secret, key_id, _ = await new_key(store, Settings(api_plan_keys=True))
    upstream = ApiUpstream()
    async with shape("proxy", upstream, store, settings, metrics) as client:
        response = await client.post("/v1/custom/chat", json={"messages": [], "max_tokens": 5},
                                     headers=bearer(secret))
    assert response.status_code == 200
    assert (await store.get_key(key_id)).total_spent == SERVED.cost_micro(30, 5, 10)


async def test_cached_prompt_tokens_cost_their_own_price(store: Store,
                                                         metrics: Metrics) -> None:
    settings = config()
    secret, key_id, _ = await new_key(store, settings)
    async with client_for(gateway(ApiUpstream(), store, settings, metrics)) as client:
        await client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 5},
                          headers=bearer(secret))
    # 20 uncached at $1, 10 cached at $0.25, 5 out at $2 per million
    assert (await store.get_key(key_id)).total_spent == -(-(20 + 2.5 + 10) // 1)


async def test_unknown_models_can_be_refused(store: Store, metrics: Metrics) -> None:
    settings = config(unknown_models="reject")
    secret, _, _ = await new_key(store, settings)
    upstream = ApiUpstream()
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        unknown = await client.post("/v1/chat/completions",
                                    json={"model": "gpt-9", "messages": []},
                                    headers=bearer(secret))
        known = await client.post("/v1/chat/completions",
                                  json={"model": "served", "messages": []},
                                  headers=bearer(secret))
        typed = await client.post("/v1/chat/completions", json={"model": 7, "messages": []},
                                  headers=bearer(secret))
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "model_not_allowed"
    assert known.status_code == 200
    assert typed.status_code == 400 and "model" in typed.json()["error"]["message"]
    assert upstream.paths == ["/v1/chat/completions"]


async def test_a_model_less_request_reserves_the_highest_price(store: Store,
                                                               metrics: Metrics) -> None:
    settings = config(model_prices={"served": SERVED, "big": Price(100_000_000, 200_000_000)})
    secret, _, account = await new_key(store, settings, credit=True)
    await store.add_credits(account, 30_000)  # pays the request at SERVED, not at "big"
    upstream = ApiUpstream()
    body = {"messages": [{"role": "user", "content": "x" * 20}], "max_tokens": 100}
    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        named = await client.post("/v1/chat/completions", json={**body, "model": "served"},
                                  headers=bearer(secret))
        unnamed = await client.post("/v1/chat/completions", json=body, headers=bearer(secret))
    assert named.status_code == 200
    # at the highest price the budget pays fewer tokens: the bound forwarded is lowered
    assert unnamed.status_code == 200
    assert upstream.bodies[1]["max_tokens"] < 100 == upstream.bodies[0]["max_tokens"]


async def test_websockets_are_refused_unless_a_route_allows_them(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await receive()
        await send({"type": "websocket.accept"})

    allowed = Settings(api_plan_keys=True, routes={
        **settings.routes, "/v1/realtime": Route("/v1/realtime", RouteKind.CHAT,
                                                  websocket=True)})

    async def connect(config_: Settings, path: str, key: str | None) -> str:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "websocket.connect"}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "websocket.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {"type": "websocket", "path": path, "headers": headers,
                 "query_string": b"", "raw_path": path.encode()}
        await gateway(app, store, config_, metrics)(scope, receive, send)
        return str(sent[0]["type"])

    assert await connect(settings, "/v1/chat/completions", secret) == "websocket.close"
    assert await connect(settings, "/anything", secret) == "websocket.close"
    assert await connect(allowed, "/v1/realtime", None) == "websocket.close"
    assert await connect(allowed, "/v1/realtime", "sk_live_wrong") == "websocket.close"
    assert await connect(allowed, "/v1/realtime", secret) == "websocket.accept"
    assert reached == ["/v1/realtime"]
