"""The sidecar shape: GatewayMiddleware over UpstreamProxy, against real HTTP upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import orjson

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Names, Store
from gateway.types import Message, Receive, Scope, Send
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import (
    RedisServer,
    bearer,
    client_for,
    free_port,
    gateway,
    new_key,
    prompt_bound_of,
    serving,
    stream_then_leave,
)
from tests.redis_inspect import redis_of

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 8}


class EchoUpstream:
    """Answers with what it received, and a usage block."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        doc = {"path": scope["path"], "query": scope["query_string"].decode(),
               "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
               "body": body.decode(), "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        data = orjson.dumps(doc)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"x-upstream", b"yes"), (b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": data})


class Recorder(EchoUpstream):
    """EchoUpstream that also records every path it served."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(scope["path"])
        await super().__call__(scope, receive, send)


async def test_forwarding_replaces_auth_and_drops_hop_by_hop(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    async with serving(EchoUpstream()) as upstream:
        proxy = UpstreamProxy(upstream, api_key="upstream-secret")
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            response = await client.post(
                "/v1/chat/completions?x=1", json=CHAT,
                headers={**bearer(secret), "Connection": "keep-alive", "TE": "trailers",
                         "X-Custom": "kept"})
            usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
        await proxy.close()
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/v1/chat/completions" and echoed["query"] == "x=1"
    assert echoed["headers"]["authorization"] == "Bearer upstream-secret"
    assert echoed["headers"]["x-custom"] == "kept"
    assert "te" not in echoed["headers"]
    assert json.loads(echoed["body"]) == CHAT
    assert response.headers["x-upstream"] == "yes"
    assert round(usage["budget"]["spent"] * 1e6) == settings.default_price.cost_micro(3, 4)


async def test_the_clients_key_never_reaches_the_upstream(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """With no upstream key configured, the upstream sees no Authorization at all: the
    client's sk_live_ key is the gateway's to check, never the upstream's to see."""
    secret, _, _ = await new_key(store, settings)
    async with serving(EchoUpstream()) as upstream:
        proxy = UpstreamProxy(upstream)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers={**bearer(secret), "Proxy-Authorization": "x"})
        await proxy.close()
    assert response.status_code == 200
    echoed = response.json()
    assert "authorization" not in echoed["headers"]
    assert "proxy-authorization" not in echoed["headers"]
    assert secret not in response.text


async def test_upstream_down_is_502_and_not_billed(store: Store, settings: Settings,
                                                    metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    proxy = UpstreamProxy(f"http://127.0.0.1:{free_port()}")
    async with client_for(gateway(proxy, store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    await proxy.close()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert "x-ratelimit-remaining-requests" in response.headers
    assert usage["budget"]["spent"] == 0


async def test_proxied_stream_disconnect_is_billed(store: Store, settings: Settings,
                                                   metrics: Metrics) -> None:
    secret, _, account_id = await new_key(store, settings)
    reservations = Names.reservation(account_id, "*")
    upstream_app = MockUpstream(max_words=300, chunk_delay=0.01)
    body = {**CHAT, "stream": True, "max_tokens": 300}
    async with serving(upstream_app) as upstream:
        proxy = UpstreamProxy(upstream)
        async with serving(gateway(proxy, store, settings, metrics)) as base, \
                aiohttp.ClientSession() as session:
            streamed = await stream_then_leave(session, f"{base}/v1/chat/completions", body,
                                               bearer(secret), 4)
            # Admission debited the estimate; settlement (when the server notices) deletes
            # the reservation and replaces the estimate with what was streamed.
            for _ in range(200):
                if not [k async for k in redis_of(store).scan_iter(match=reservations)]:
                    break
                await asyncio.sleep(0.02)
            async with session.get(f"{base}/v1/usage", headers=bearer(secret)) as usage:
                spent = round((await usage.json())["budget"]["spent"] * 1e6)
        await proxy.close()
    price = settings.default_price
    prompt = prompt_bound_of(body)  # the server's count is unknown: the prompt's bound
    assert price.cost_micro(prompt, streamed) <= spent <= price.cost_micro(prompt, streamed + 20)


async def raw_asgi(app: GatewayMiddleware, method: str, path: str, body: bytes,
                   headers: dict[str, str]) -> tuple[int, bytes]:
    """Calls the ASGI app with exactly this path, as a raw HTTP client could send it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("gw", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    messages: list[dict[str, object]] = []
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    status = int(messages[0]["status"])  # type: ignore[call-overload]
    return status, b"".join(m.get("body", b"") for m in messages[1:])  # type: ignore[misc]


def _wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def test_gateway_serve_as_a_user_runs_it(redis_server: RedisServer, redis_url: str,
                                         tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_REDIS_URL": redis_url}
    created = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "--name", "cli", "--plan",
         "standard", "--rpm", "3", "--json"], env=env, capture_output=True, text=True,
        check=True, timeout=60)
    secret = json.loads(created.stdout)["key"]
    upstream_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "gateway.demo.mock_upstream", "--port",
                                 str(upstream_port)], env=env)
    served = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--upstream",
         f"http://127.0.0.1:{upstream_port}", "--port", str(gateway_port),
         "--metrics-port", str(metrics_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{gateway_port}"
    try:
        deadline = time.monotonic() + 30
        _wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", deadline)
        _wait_http(f"{base}/healthz", deadline)
        statuses = [httpx.post(f"{base}/v1/chat/completions", json=CHAT,
                               headers=bearer(secret), timeout=10).status_code
                    for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        usage = httpx.get(f"{base}/v1/usage", headers=bearer(secret), timeout=10).json()
        # spend per plan is revenue: /metrics only on its own loopback listener
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scraped.status_code == 200 and "gateway_requests_total" in scraped.text
        assert round(usage["budget"]["spent"] * 1e6) == 3 * Settings().default_price.cost_micro(
            10, 8)
    finally:
        served.send_signal(signal.SIGINT)
        _, err = served.communicate(timeout=30)
        upstream.terminate()
        upstream.wait(timeout=30)
    assert served.returncode == 0
    assert secret.encode() not in err
    assert b"Traceback" not in err


async def test_only_metered_paths_reach_the_upstream(store: Store, settings: Settings,
                                                        metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    recorder = Recorder()
    async with serving(recorder) as upstream:
        proxy = UpstreamProxy(upstream, api_key="upstream-secret")
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            for path in ("/tokenize", "/sleep", "/health", "/foo/bar?x=1"):
                response = await client.post(path, json=CHAT, headers=bearer(secret))
                assert response.status_code == 404, path
                assert "upstream-secret" not in response.text
            app = gateway(proxy, store, settings, metrics)
            for path in ("/v1/./chat/completions", "/v1/../v1/chat/completions",
                         "/v1//chat/completions", "/v1/chat/completions/",
                         "/v1/chat/completions;a=b"):
                # httpx would normalise these paths; a raw client need not
                status, body = await raw_asgi(app, "POST", path, orjson.dumps(CHAT),
                                              bearer(secret))
                assert status == 400, path
                assert orjson.loads(body)["error"]["code"] == "invalid_request"
            response = await client.put("/v1/chat/completions", json=CHAT,
                                        headers=bearer(secret))
            assert response.status_code == 405
            assert response.headers["allow"] == "POST"
            ok = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
            assert ok.status_code == 200
        await proxy.close()
    assert recorder.seen == ["/v1/chat/completions"]


async def test_headers_named_in_connection_are_not_forwarded(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    async with serving(EchoUpstream()) as upstream:
        proxy = UpstreamProxy(upstream)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            response = await client.post(
                "/v1/chat/completions", json=CHAT,
                headers={**bearer(secret), "Connection": "keep-alive, X-Hop",
                         "X-Hop": "drop me", "X-End": "keep me"})
        await proxy.close()
    echoed = response.json()["headers"]
    assert "x-hop" not in echoed and echoed["x-end"] == "keep me"


class HopByHopUpstream(EchoUpstream):
    """Answers with hop-by-hop headers that describe its own connection only."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_hop_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message["headers"], (b"keep-alive", b"timeout=5, max=100"),
                    (b"proxy-authenticate", b"Basic realm=upstream"),
                    (b"upgrade", b"h2c"), (b"trailer", b"x-checksum"),
                    (b"x-ratelimit-remaining-requests", b"999999"),
                    (b"x-ratelimit-limit-tokens", b"1")]}
            await send(message)

        await super().__call__(scope, receive, with_hop_headers)


async def test_hop_by_hop_and_rate_headers_of_the_upstream_stay_there(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    async with serving(HopByHopUpstream()) as upstream:
        proxy = UpstreamProxy(upstream)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
        await proxy.close()
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "yes"  # end-to-end headers are forwarded
    for name in ("keep-alive", "proxy-authenticate", "upgrade", "trailer", "connection"):
        assert name not in response.headers, name
    # The rate headers the client sees are the gateway's, each once.
    assert response.headers.get_list("x-ratelimit-remaining-requests") == ["59"]
    assert response.headers.get_list("x-ratelimit-limit-tokens") == ["3333"]


async def test_only_the_model_list_routes_are_forwarded_by_get(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    recorder = Recorder()
    async with serving(recorder) as upstream:
        proxy = UpstreamProxy(upstream)
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            statuses = {path: (await client.get(path, headers=bearer(secret))).status_code
                        for path in ("/v1/models", "/v1/models/m", "/v1/models-admin",
                                     "/v1/modelsx/y", "/v1/files")}
        await proxy.close()
    assert statuses == {"/v1/models": 200, "/v1/models/m": 200, "/v1/models-admin": 404,
                        "/v1/modelsx/y": 404, "/v1/files": 404}
    assert recorder.seen == ["/v1/models", "/v1/models/m"]


async def test_response_headers_named_in_the_upstreams_connection_are_not_forwarded(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    """RFC 9110 7.6.1: a proxy removes the headers its peer named in `Connection:`, in
    responses as in requests (above)."""
    secret, _, _ = await new_key(store, settings)
    body = orjson.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"connection: keep-alive, x-hop\r\nx-hop: upstream-internal\r\n"
                     b"x-end: kept\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = UpstreamProxy(f"http://127.0.0.1:{port}")
    try:
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
    assert response.status_code == 200
    assert response.headers["x-end"] == "kept"
    assert "x-hop" not in response.headers
