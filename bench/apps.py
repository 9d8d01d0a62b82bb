"""ASGI factories served by uvicorn in their own processes.

`mock` is gateway.demo.mock_upstream.MockUpstream alone; `gateway_mock` is the same app wrapped in
GatewayMiddleware (settings and Redis from GATEWAY_* environment), as a user embeds it.

Two yardsticks make the gateway's CPU comparable across machines, because they are measured
in the same run on the same cores: `bare`, uvicorn answering a canned JSON body (the floor
of any ASGI app), and `naive`, the parts of a gateway composed the obvious way (redis-py
EVALSHA before and after, aiohttp's client forwarding to BENCH_UPSTREAM).
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import redis.asyncio as redis

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.types import ASGIApp, Message, Receive, Scope, Send

_BARE_BODY = (b'{"id":"cmpl-bare","object":"chat.completion","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}')
_JSON_HEADERS = [(b"content-type", b"application/json"),
                 (b"content-length", str(len(_BARE_BODY)).encode())]


def mock() -> ASGIApp:
    return MockUpstream()


def gateway_mock() -> ASGIApp:
    return GatewayMiddleware(MockUpstream(), settings=Settings.load())


async def _lifespan(receive: Receive, send: Send) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message: Message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _bare(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await _read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": _BARE_BODY})


def bare() -> ASGIApp:
    return _bare


class NaiveGateway:
    """Admission script, forward, settlement script: no caching, pooling or batching beyond
    what redis-py and aiohttp do by themselves."""

    def __init__(self, upstream: str, redis_url: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.redis = redis.Redis.from_url(redis_url)
        self.script = self.redis.register_script(
            (Path(__file__).parent / "naive.lua").read_text())
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if self.session is None:
            self.session = aiohttp.ClientSession()
        body = await _read_body(receive)
        await self.script(keys=["naive"], args=["requests", 1])
        headers = {"content-type": "application/json"}
        async with self.session.post(self.upstream + scope["path"], data=body,
                                     headers=headers) as response:
            kind = response.headers.get("content-type", "application/json")
            start = {"type": "http.response.start", "status": response.status,
                     "headers": [(b"content-type", kind.encode())]}
            if not kind.startswith("text/event-stream"):
                data = await response.read()
                await self.script(keys=["naive"], args=["tokens", 16])
                await send(start)
                await send({"type": "http.response.body", "body": data})
                return
            await send(start)
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await self.script(keys=["naive"], args=["tokens", 16])
        await send({"type": "http.response.body", "body": b""})


def naive() -> ASGIApp:
    return NaiveGateway(os.environ["BENCH_UPSTREAM"], os.environ["GATEWAY_REDIS_URL"])
