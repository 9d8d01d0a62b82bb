"""The gateway's error hierarchy, and the one place errors become HTTP responses."""

from __future__ import annotations

import orjson

from gateway.types import Headers, Send


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class StoreUnavailable(GatewayError):
    """The limiter store (Redis) could not be reached or answered with an error."""


class StoreAmbiguous(StoreUnavailable):
    """The store failed after the command was sent: it may or may not have been applied."""


class StoreCommandError(StoreUnavailable):
    """Redis answered, with an error: retrying the same command cannot help."""


class LedgerUnavailable(GatewayError):
    """The ledger's PostgreSQL could not be reached or refused the statement; the message
    never carries the URL (it may hold a password)."""


class ClientDisconnected(OSError):
    """The client went away; raised from `send` so a streaming app stops producing."""


class ConfigError(GatewayError):
    """Invalid settings or command-line input; the message is meant for the operator."""


class LimitReached(GatewayError):
    """An operator's cap (keys per account) would be exceeded; the message says which."""


class NotFound(GatewayError):
    """A named record (account, key) does not exist."""


class Rejected(GatewayError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        error_type: str = "invalid_request_error",
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.error_type = error_type
        self.headers = headers or []


def error_body(message: str, error_type: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "code": code}})


JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


async def send_json(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    all_headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if headers:
        all_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_rejection(send: Send, rejected: Rejected) -> None:
    body = error_body(rejected.message, rejected.error_type, rejected.code)
    await send_json(send, rejected.status, body, rejected.headers)
