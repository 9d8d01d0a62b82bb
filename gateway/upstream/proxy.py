"""The upstream app of `gateway serve`: forwards to an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Collection
from urllib.parse import quote

from gateway.config.limits import Deadlines
from gateway.config.routes import DEFAULT_ROUTES
from gateway.errors import Rejected, send_rejection
from gateway.hooks import HOOKS, RequestHooks
from gateway.types import Headers, Message, Receive, Scope, Send
from gateway.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse

# Set (True) on the response start of an answer the proxy makes because the upstream gave
# none (502, 504): the metrics count it as no answer, not as the upstream's 5xx.
OWN_ANSWER = "gateway.own_answer"

# RFC 9110 hop-by-hop headers, plus the ones the client connection defines for itself.
_DROP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"authorization",
    b"accept-encoding", b"content-length",
})
_DROP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"server", b"date",
})
_IDENTITY = (b"accept-encoding", b"identity")  # usage is read from the body


class UpstreamProxy:
    def __init__(self, upstream: str, api_key: str | None = None,
                 connect_timeout: float | None = None,
                 routes: Collection[str] = frozenset(DEFAULT_ROUTES),
                 deadlines: Deadlines | None = None) -> None:
        """Raises ValueError for an upstream URL that is not http(s)://host[:port][/path].
        `routes`: the inference paths the gateway meters, the only POSTs forwarded."""
        self._client = UpstreamClient(upstream, deadlines=deadlines,
                                      connect_timeout=connect_timeout)
        self._routes = frozenset(routes)
        self._auth = (b"authorization", f"Bearer {api_key}".encode("latin-1")) \
            if api_key else None

    async def close(self) -> None:
        await self._client.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        if not self._proxied(method, scope["path"]):
            # Only what the gateway meters reaches the upstream (and its key): the metered
            # POST routes and the model list. Anything else could be inference unbilled.
            await send_rejection(send, Rejected(
                404, "not_found", "Not found: the gateway forwards POST to its inference "
                "routes (such as /v1/chat/completions) and GET /v1/models."))
            return
        body = await _request_body(receive)
        if body is None:
            return
        headers = _forwarded_headers(scope["headers"])
        if self._auth:
            headers.append(self._auth)
        # The decoded path the gateway metered, re-quoted: what is billed is what is served.
        target = _quoted(scope["path"])
        if scope.get("query_string"):
            target += "?" + quote(scope["query_string"], safe="=&;%+,/:@!$'()*?~")
        # With the gateway's own server, a client that leaves is seen at once, without a
        # task per request: the upstream exchange is abandoned (its connection closed, so
        # the upstream stops), whether it is waiting for the head or sending the body.
        hooks: RequestHooks | None = scope.get("extensions", {}).get(HOOKS)
        try:
            response = await self._client.request(
                method, target, headers, body,
                attach=None if hooks is None else functools.partial(setattr, hooks, "on_lost"))
        except UpstreamError as exc:
            if hooks is not None and hooks.lost:
                return  # the client left: nobody to answer
            send = _own_answer(send)
            if exc.timed_out:
                await send_rejection(send, Rejected(
                    504, "upstream_timeout",
                    "The upstream inference server did not answer in time.", "api_error"))
            else:
                await send_rejection(send, Rejected(
                    502, "upstream_unavailable",
                    "The upstream inference server is unreachable.", "api_error"))
            return
        async with response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": _end_to_end(response.headers, _DROP_RESPONSE)})
            whole = response.ready()
            if whole is not None:  # the usual small answer, come with its head
                await send({"type": "http.response.body", "body": whole})
                return
            streamed = response.content_type == b"text/event-stream"
            try:
                if hooks is None and streamed:
                    await _stream_until_disconnect(response, receive, send)
                else:
                    if hooks is not None:
                        hooks.on_lost = response.release
                    await _relay(response, send)
            except UpstreamError:
                # The upstream broke or fell silent mid-body. A stream ends cleanly (what was
                # delivered is settled); any other body is cut short for the client to see.
                if streamed:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                elif hooks is not None:
                    hooks.abort()

    def _proxied(self, method: str, path: str) -> bool:
        if path in self._routes:
            return method == "POST"
        return method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


@functools.lru_cache(maxsize=1024)
def _quoted(path: str) -> str:
    return quote(path)




def _own_answer(send: Send) -> Send:
    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, OWN_ANSWER: True}
        await send(message)

    return marked


def _forwarded_headers(headers: Headers) -> Headers:
    forwarded = _end_to_end(headers, _DROP_REQUEST)
    forwarded.append(_IDENTITY)
    return forwarded


def _end_to_end(headers: Headers, dropped: frozenset[bytes]) -> Headers:
    """`headers` without the hop-by-hop ones: `dropped`, and those the peer named in its
    `Connection:` header (RFC 9110 7.6.1), in requests and responses alike."""
    for name, value in headers:
        if name == b"connection":
            dropped = dropped | {token.strip().lower() for token in value.split(b",")}
    return [h for h in headers if h[0] not in dropped]


async def _request_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _relay(response: UpstreamResponse, send: Send) -> None:
    """The body piece by piece, as it arrives: never held whole (the upstream client reads
    at most its high-water mark ahead)."""
    async for piece in response.chunks():
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _stream_until_disconnect(response: UpstreamResponse, receive: Receive,
                                   send: Send) -> None:
    """Forwards the stream piece by piece. A client that leaves closes the upstream
    connection at once (the upstream stops generating), even between two events."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        response.release()  # the body is unfinished: this closes the connection

    watcher = asyncio.ensure_future(watch())
    try:
        async for piece in response.chunks():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
