"""The upstream app of `gateway serve`: forwards to an OpenAI-compatible server with aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.errors import error_body, send_json
from gateway.metering import METERED_PATHS
from gateway.types import Headers, Message, Receive, Scope, Send

# RFC 9110 hop-by-hop headers, plus the ones the client connection defines for itself.
_DROP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"authorization",
    b"accept-encoding", b"content-length",
})
_DROP_RESPONSE = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "server", "date",
})


class UpstreamProxy:
    def __init__(self, upstream: str, api_key: str | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.base = upstream.rstrip("/")
        self._auth = f"Bearer {api_key}" if api_key else None
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not _proxied(scope["method"], scope["path"]):
            # Only what the gateway meters reaches the upstream (and its key): the metered
            # POST routes and the model list. Anything else could be inference unbilled.
            await send_json(send, 404, error_body(
                "Not found: the gateway forwards POST /v1/chat/completions, /v1/completions, "
                "/v1/embeddings and GET /v1/models.", "invalid_request_error", "not_found"))
            return
        body = await _request_body(receive)
        if body is None:
            return
        dropped = _DROP_REQUEST | _connection_tokens(scope["headers"])
        headers = {k.decode("latin-1"): v.decode("latin-1")
                   for k, v in scope["headers"] if k not in dropped}
        headers["accept-encoding"] = "identity"  # usage is read from the body
        if self._auth:
            headers["authorization"] = self._auth
        # The decoded path the gateway metered, re-quoted: what is billed is what is served.
        url = self.base + quote(scope["path"])
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            response = await self._client().request(
                scope["method"], URL(url, encoded=True), headers=headers, data=body,
                allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError, OSError):
            await send_json(send, 502, error_body(
                "The upstream inference server is unreachable.", "api_error",
                "upstream_unavailable"))
            return
        async with response:
            out: Headers = [(k.encode("latin-1"), v.encode("latin-1"))
                            for k, v in response.headers.items()
                            if k.lower() not in _DROP_RESPONSE]
            await send({"type": "http.response.start", "status": response.status,
                        "headers": out})
            try:
                if response.content_type == "text/event-stream":
                    await _stream_until_disconnect(response, receive, send)
                else:
                    await send({"type": "http.response.body", "body": await response.read()})
            except (TimeoutError, aiohttp.ClientError):
                return  # upstream broke mid-body: end without completing the response

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _proxied(method: str, path: str) -> bool:
    if path in METERED_PATHS:
        return method == "POST"
    return method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/"))


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Headers the client named in `Connection:` are hop-by-hop too (RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


async def _request_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _stream_until_disconnect(response: aiohttp.ClientResponse, receive: Receive,
                                   send: Send) -> None:
    async def pump() -> None:
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def disconnected() -> Message:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return message

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
        raise pumping.exception()  # type: ignore[misc]
