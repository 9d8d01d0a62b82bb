"""Hostile clients and odd upstream answers in the middleware shape: one error boundary,
no injected line in the logs, no leaked usage chunk."""

from __future__ import annotations

import logging

import orjson
import pytest

from gateway.config.settings import Settings
from gateway.errors import StoreUnavailable
from gateway.obs.logs import TextFormatter
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.types import Receive, Scope, Send
from tests.conftest import bearer, client_for, gateway, new_key

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_a_bug_in_the_app_path_is_the_gateways_own_500_logged_once(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    secret, key_id, _ = await new_key(store, settings)

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    async with client_for(gateway(broken, store, settings, metrics)) as client:
        with caplog.at_level(logging.ERROR, logger="gateway"):
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert [r.getMessage() for r in caplog.records if r.name == "gateway"] == [
        f"unexpected AttributeError on POST /v1/chat/completions "
        f"(request {response.headers['x-request-id']})"]
    assert (await store.get_key(key_id)).spent > 0  # settled: the prompt's bound


async def test_an_error_from_the_store_anywhere_is_a_503(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    app = gateway(lambda *_: None, store, settings, metrics)  # type: ignore[arg-type, return-value]

    async def failing(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("Redis client error: AttributeError")

    app.store.admit = failing  # type: ignore[method-assign, assignment]
    async with client_for(app) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "limiter_unavailable"


def test_text_logs_escape_control_characters() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "request", None, None)
    record.fields = {"path": "/v1/x\nFAKE LINE level=error", "key_name": "\x1b[31mred"}
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    assert "path=/v1/x\\x0aFAKE LINE" in line and "key_name=\\x1b[31mred" in line


@pytest.mark.parametrize("content_types", [
    [(b"Content-Type", b"TEXT/EVENT-STREAM")],
    [(b"content-type", b"text/event-stream; charset=utf-8"),
     (b"content-type", b"text/event-stream")],
    [(b"content-type", b"application/json"), (b"content-type", b"text/event-stream")],
])
async def test_the_injected_usage_chunk_never_leaks_whatever_the_content_type_header(
        store: Store, settings: Settings, metrics: Metrics,
        content_types: list[tuple[bytes, bytes]]) -> None:
    secret, _, _ = await new_key(store, settings)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": content_types})
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        await send({"type": "http.response.body", "more_body": True, "body":
                    b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r\r'})
        await send({"type": "http.response.body", "body":
                    b"data: " + orjson.dumps(usage) + b"\r\rdata: [DONE]\r\r"})

    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                     headers=bearer(secret))
    assert b"usage" not in response.content
    assert response.content.endswith(b"data: [DONE]\r\r")


async def test_sse_events_separated_by_bare_cr_are_relayed_and_billed(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings)

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        for piece in (b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r',
                      b'\rdata: {"choices":[{"index":0,"delta":{"content":"b"}}]}\r\r',
                      b"data: " + orjson.dumps(usage) + b"\r\r", b"data: [DONE]\r\r"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with client_for(gateway(upstream, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions",
                                     json={**CHAT, "stream": True,
                                           "stream_options": {"include_usage": True}},
                                     headers=bearer(secret))
    assert response.content.count(b"data: ") == 4
    assert (await store.get_key(key_id)).spent == settings.default_price.cost_micro(3, 2)
