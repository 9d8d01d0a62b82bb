"""A request's body and path as the middleware reads them: bounded, canonical, replayable."""

from __future__ import annotations

from gateway.errors import Rejected
from gateway.types import Message, Receive


class ClientGone(Exception):
    """The client disconnected before its request was admitted."""


def too_large() -> Rejected:
    return Rejected(413, "request_too_large", "Request body is larger than the gateway allows.")


def not_json() -> Rejected:
    return Rejected(400, "invalid_request", "Request body must be a valid JSON object.")


def limiter_unavailable() -> Rejected:
    return Rejected(503, "limiter_unavailable",
                    "The rate limiter is unavailable; the request was not forwarded.", "api_error")


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def canonical(path: str) -> bool:
    if "/." not in path and "//" not in path and not path.endswith("/") and ";" not in path \
            and "\\" not in path:
        return True  # the common case, without splitting
    segments = path.split("/")[1:]
    return all(segment not in ("", ".", "..") for segment in segments) and not any(
        c in path for c in ";\\")


def replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
