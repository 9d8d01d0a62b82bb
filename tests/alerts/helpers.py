"""What the alert tests share: settings with alerts on, an upstream that reports exactly
the completion it was allowed, two gateways on one Redis, the outbox as a test reads it."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from gateway.alerts.outbox import AlertEvent, _event, enable_alerts
from gateway.config.settings import Settings
from gateway.store import Store
from gateway.store.names import Names
from gateway.types import Receive, Scope, Send

SECRET = "webhook-secret-0123456789"
BIG = {"rpm": 100_000, "tpm": 10_000_000}


def alert_settings(url: str = "http://127.0.0.1:9/hook", **alerts: Any) -> Settings:
    hooks = alerts.pop("webhooks", [{"url": url, "secret": SECRET}])
    data = {"plans": {"big": BIG}, "credit": BIG,
            "alerts": {"webhooks": hooks, **alerts}}
    return dataclasses.replace(Settings.from_mapping(data), api_plan_keys=True)


def with_alerts(store: Store, settings: Settings) -> Store:
    enable_alerts(store, settings.alerts)
    return store


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """Completes with as many tokens as max_tokens allows (1 prompt token): a request costs
    what its bound says, 300 micro-USD at max_tokens 200 and the default price."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    tokens = int(orjson.loads(body or b"{}").get("max_tokens") or 16)
    payload = orjson.dumps({"id": "x", "object": "chat.completion", "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": "w " * tokens}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                                      "total_tokens": tokens + 1}})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


def chat(max_tokens: int = 200) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens}


async def outbox(store: Store, account_id: str) -> list[AlertEvent]:
    raw = await store._cmd("XRANGE", Names.alerts(account_id), "-", "+")
    return [_event(account_id, stream_id, flat) for stream_id, flat in raw]


async def of_type(store: Store, account_id: str, event_type: str) -> list[AlertEvent]:
    return [e for e in await outbox(store, account_id) if e.type == event_type]
