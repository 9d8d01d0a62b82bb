"""What a management request body may say: read (bounded), checked field by field, turned
into a KeySpec; every mistake a 400 naming the field."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from gateway.config.units import parse_duration, usd_to_micro
from gateway.core.timefmt import parse_iso_to_us
from gateway.errors import ConfigError, Rejected
from gateway.http.admin import KeySpec, check_key_name
from gateway.http.key_changes import MAX_BUDGET_MICRO
from gateway.types import Receive, Scope

MAX_BODY_BYTES = 64 * 1024
MAX_DURATION_SECONDS = 3650 * 86400
CREATE_FIELDS = ("name", "plan", "credit", "rpm", "tpm", "budget", "budget_duration",
                 "expires_at", "expires_in")

_LATEST_EXPIRY_US = 253_402_214_400 * 1_000_000  # 9999-12-31: still printable as ISO 8601


MAX_REASON_LENGTH = 500  # a credit adjustment's reason, in the CLI and over HTTP


def bad_request(message: str) -> Rejected:
    return Rejected(400, "invalid_request", message)


def allow(method: str, allowed: str) -> None:
    """405 with an Allow header unless `method` is one of `allowed` ("GET, POST")."""
    if method not in allowed.split(", "):
        raise Rejected(405, "method_not_allowed", "Method not allowed.",
                       "invalid_request_error", [(b"allow", allowed.encode())])


def uuid_text(text: str, what: str) -> str:
    """`text` as a canonical UUID, or a 400 naming `what`."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise bad_request(f"{what} must be a UUID") from None


async def json_object(scope: Scope, receive: Receive) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "invalid_request", "The client went away.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Rejected(413, "request_too_large", "Request body is larger than 64 KiB.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    return body


def only_fields(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for field in body:
        if field not in allowed:
            raise bad_request(f"unknown field {field[:50]!r} (allowed: {', '.join(allowed)})")


def checked_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_request("name must be a non-empty string")
    try:
        return check_key_name(value)
    except ConfigError as exc:
        raise bad_request(str(exc)) from None


def optional_str(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{field} must be a string")
    return value


def optional_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_request(f"{field} must be an integer")
    return value


def checked_duration(body: dict[str, Any], field: str) -> str | None:
    text = optional_str(body, field)
    if text is not None:
        try:
            seconds = parse_duration(text)
        except ConfigError:
            raise bad_request(f"{field} must be a positive integer with s, m, h or d, like '30d'") \
                from None
        if seconds > MAX_DURATION_SECONDS:
            raise bad_request(f"{field} must be at most 3650d")
    return text


def key_spec(body: dict[str, Any]) -> KeySpec:
    """A POST /api/keys body as the KeySpec the CLI builds from its options."""
    only_fields(body, CREATE_FIELDS)
    if "name" not in body:
        raise bad_request("name is required")
    name = checked_name(body["name"])
    plan = optional_str(body, "plan")
    credit = body.get("credit", False)
    if credit is None:
        credit = False
    if not isinstance(credit, bool):
        raise bad_request("credit must be true or false")
    if credit == (plan is not None):
        raise bad_request("give exactly one of plan (a plan slug) or credit: true")
    budget = body.get("budget")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | float | str):
            raise bad_request("budget must be a USD amount (number or string)")
        try:
            micro = usd_to_micro(budget, "budget")
        except ConfigError:
            raise bad_request("budget must be a non-negative USD amount, like 10 or \"10.50\"") \
                from None
        if micro > MAX_BUDGET_MICRO:
            raise bad_request("budget must be at most 1000000000 USD")
        budget = str(budget)
    duration = checked_duration(body, "budget_duration")
    expires_in = checked_duration(body, "expires_in")
    expires_at = optional_str(body, "expires_at")
    if expires_at is not None:
        try:
            moment = parse_iso_to_us(expires_at)
        except (ValueError, OverflowError):
            raise bad_request("expires_at must be an ISO 8601 date-time") from None
        if not 0 <= moment <= _LATEST_EXPIRY_US:
            raise bad_request("expires_at must be between 1970 and 9999")
    if expires_at is not None and expires_in is not None:
        raise bad_request("give expires_at or expires_in, not both")
    if credit and (expires_at is not None or expires_in is not None):
        raise bad_request("expires_at and expires_in apply to plan keys; credit keys do not expire")
    return KeySpec(name=name, plan=plan, credit=credit, rpm=optional_int(body, "rpm"),
                   tpm=optional_int(body, "tpm"), budget_usd=budget,
                   budget_duration=duration or "30d", expires_at=expires_at,
                   expires_in=expires_in)

