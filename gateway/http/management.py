"""The management API: /api/usage, /api/usage/{keyId}, /api/spend, /api/keys..., and
/openapi.json.

Callers authenticate as an account: with a management key (`mk_…`, the built-in verifier) or
with a dashboard session token that a pluggable verifier maps to an account id. Everything a
caller sees is scoped to that account; a key of another account is reported as not found.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config.routes import route_path
from gateway.config.settings import Settings
from gateway.config.units import micro_to_usd
from gateway.core.keys import (
    MANAGEMENT_PREFIX,
    bearer_token,
    hash_secret,
    looks_like,
    new_consumption_secret,
)
from gateway.core.timefmt import iso_from_us
from gateway.core.usage_windows import aggregate, usage_document
from gateway.errors import (
    ConfigError,
    LimitReached,
    NotFound,
    Rejected,
    StoreUnavailable,
    send_json,
    send_rejection,
)
from gateway.http import openapi
from gateway.http.admin import KeySpec, create_key, key_json
from gateway.http.auth import header
from gateway.http.management_body import (
    allow,
    bad_request,
    checked_name,
    json_object,
    key_spec,
    only_fields,
    uuid_text,
)
from gateway.http.ratelimit import format_reset
from gateway.http.spend import spend_body, spend_query, unconfigured
from gateway.store import KeyRecord, Store, Throttle
from gateway.types import Headers, Receive, Scope, Send

log = logging.getLogger("gateway")

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
# Maps a dashboard bearer token to the id of the account it acts for, or None. May be async.
Verifier = Callable[[str], "str | Awaitable[str | None] | None"]

USAGE_CAPACITY = 12
USAGE_PERIOD_SECONDS = 12 * 3600
PATCH_FIELDS = ("isActive", "name")


@dataclass(frozen=True, slots=True)
class Principal:
    account_id: str
    bucket: str  # whose usage-read allowance this request draws from


def _unauthorized() -> Rejected:
    return Rejected(401, "invalid_api_key", "Invalid or missing management key. Send "
                    "'Authorization: Bearer mk_...' or a dashboard session token.")



def _not_found() -> Rejected:
    return Rejected(404, "key_not_found", "No key with this id in your account.")


def usage_row(record: KeyRecord, periods: dict[str, Any], now_us: int) -> dict[str, Any]:
    subscription = record.key_type == "subscription"
    row: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "type": record.key_type,
        "plan": record.plan if subscription else "credits",
        "isActive": record.active,
        "usage": periods,
    }
    if subscription:
        expires = record.expires_at_us
        row["subscription"] = {
            "status": "expired" if expires is not None and now_us >= expires else "active",
            "expiresAt": None if expires is None else iso_from_us(expires),
        }
    row["createdAt"] = iso_from_us(record.created_at_us)
    # Beyond the seed's fields, after them: the key's lifetime spend (USD), as keys show says.
    row["total_spent"] = micro_to_usd(record.total_spent)
    return row


def throttle_headers(capacity: int, throttle: Throttle) -> Headers:
    headers: Headers = [
        (b"x-ratelimit-limit-requests", str(capacity).encode()),
        (b"x-ratelimit-remaining-requests", str(throttle.remaining).encode()),
        (b"x-ratelimit-reset-requests", format_reset(throttle.reset_us).encode()),
    ]
    if not throttle.allowed:
        seconds = max(1, -(-throttle.retry_after_us // 1_000_000))
        headers.append((b"retry-after", str(seconds).encode()))
    return headers


class Management:
    def __init__(self, store: Store, settings: Settings, verifier: Verifier | None = None) -> None:
        self.store = store
        self.settings = settings
        self.verifier = verifier
        self.usage_capacity = USAGE_CAPACITY
        self.usage_period_seconds = USAGE_PERIOD_SECONDS
        self.openapi_body = orjson.dumps(openapi.document())

    def route(self, path: str) -> Handler:
        return self.handle

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        usage = path.startswith("/api/usage")
        try:
            await self._dispatch(scope, receive, send)
        except Rejected as rejected:
            await send_rejection(send, rejected)
        except StoreUnavailable:
            if usage:
                await send_rejection(send, Rejected(
                    502, "usage_unavailable", "Usage data is temporarily unavailable.",
                    "api_error"))
            else:
                await send_rejection(send, Rejected(
                    503, "store_unavailable", "The gateway's store is temporarily unavailable.",
                    "api_error"))

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        method: str = scope["method"]
        if path == "/openapi.json":
            allow(method, "GET")
            await send_json(send, 200, self.openapi_body)
            return
        parts = path[len("/api/"):].split("/")
        if parts == ["usage"]:
            allow(method, "GET")
            await self._usage(scope, send, None)
        elif len(parts) == 2 and parts[0] == "usage":
            allow(method, "GET")
            await self._usage(scope, send, parts[1])
        elif parts == ["spend"]:
            allow(method, "GET")
            await self._spend(scope, send)
        elif parts == ["keys"]:
            allow(method, "GET, POST")
            principal = await self._authenticate(scope)
            if method == "GET":
                await self._list_keys(principal, send)
            else:
                await self._create_key(principal, await json_object(scope, receive), send)
        elif len(parts) == 2 and parts[0] == "keys":
            allow(method, "GET, PATCH")
            principal = await self._authenticate(scope)
            key_id = uuid_text(parts[1], "keyId")
            if method == "GET":
                await self._show_key(principal, key_id, send)
            else:
                await self._update_key(principal, key_id, await json_object(scope, receive),
                                       send)
        elif len(parts) == 3 and parts[0] == "keys" and parts[2] == "rotate":
            allow(method, "POST")
            principal = await self._authenticate(scope)
            await self._rotate(principal, uuid_text(parts[1], "keyId"), send)
        else:
            raise Rejected(404, "not_found", "No such endpoint.")

    # -- authentication -----------------------------------------------------------------------

    async def _authenticate(self, scope: Scope) -> Principal:
        token = bearer_token(header(scope["headers"], b"authorization"))
        if token is None:
            raise _unauthorized()
        if token.startswith(MANAGEMENT_PREFIX):
            if not looks_like(token, MANAGEMENT_PREFIX):
                raise _unauthorized()
            ref = await self.store.mgmt_lookup(hash_secret(token))
            if ref is None:
                raise _unauthorized()
            return Principal(ref.account_id, f"mk:{ref.mgmt_id}")
        if self.verifier is None:
            raise _unauthorized()
        try:
            result = self.verifier(token)
            account_id = await result if inspect.isawaitable(result) else result
        except Exception:
            log.exception("the management session verifier failed")
            raise Rejected(503, "auth_unavailable", "Session verification is temporarily "
                           "unavailable.", "api_error") from None
        if not isinstance(account_id, str) or not account_id:
            raise _unauthorized()
        if not await self.store.account_exists(account_id):
            raise _unauthorized()
        # Sessions come and go with logins, so their allowance is the account's.
        return Principal(account_id, "session")

    # -- usage ------------------------------------------------------------------------------

    async def _usage(self, scope: Scope, send: Send, raw_key_id: str | None) -> None:
        principal = await self._authenticate(scope)
        key_id = None if raw_key_id is None else uuid_text(raw_key_id, "keyId")
        headers = await self._throttle(principal)
        snapshot = await self.store.usage_snapshot(principal.account_id, key_id)
        now_s = snapshot.now_us // 1_000_000
        rows = [usage_row(k.record, usage_document(aggregate(now_s, k.minute_hashes,
                                                             k.hour_hashes)),
                          snapshot.now_us)
                for k in snapshot.keys]
        if key_id is None:
            await send_json(send, 200, orjson.dumps({"success": True, "data": rows}), headers)
        elif not rows:
            raise Rejected(404, "key_not_found", "No key with this id in your account.",
                           "invalid_request_error", headers)
        else:
            await send_json(send, 200, orjson.dumps(rows[0]), headers)

    async def _throttle(self, principal: Principal) -> Headers:
        """One request of the principal's usage allowance (shared by /api/usage[/{keyId}]
        and /api/spend): the rate headers, or a 429 with them."""
        throttle = await self.store.mgmt_throttle(principal.account_id, principal.bucket,
                                                  self.usage_capacity,
                                                  self.usage_period_seconds)
        headers = throttle_headers(self.usage_capacity, throttle)
        if not throttle.allowed:
            raise Rejected(429, "rate_limit_exceeded",
                           f"Rate limit reached: {self.usage_capacity} usage requests per "
                           f"{self.usage_period_seconds // 3600} hours. Cache the response.",
                           "requests", headers)
        return headers

    async def _spend(self, scope: Scope, send: Send) -> None:
        # Checked before the allowance is drawn: a bad query or a gateway without a ledger
        # costs the caller nothing; a database outage after it does (it shields PostgreSQL).
        principal = await self._authenticate(scope)
        query = spend_query(scope.get("query_string", b""), await self.store.now_us())
        url = self.settings.ledger.postgres_url
        if not url:
            raise unconfigured()
        headers = await self._throttle(principal)
        await send_json(send, 200, await spend_body(url, principal.account_id, query, headers),
                        headers)

    # -- key administration -------------------------------------------------------------------

    async def _list_keys(self, principal: Principal, send: Send) -> None:
        records = await self.store.list_keys(principal.account_id)
        await send_json(send, 200, orjson.dumps([key_json(r, self.settings) for r in records]))

    async def _show_key(self, principal: Principal, key_id: str, send: Send) -> None:
        record = await self.store.account_key(principal.account_id, key_id)
        if record is None:
            raise _not_found()
        await send_json(send, 200, orjson.dumps(key_json(record, self.settings)))

    async def _create_key(self, principal: Principal, body: dict[str, Any], send: Send) -> None:
        spec = key_spec(body)
        self._check_entitlement(spec)
        try:
            record, secret = await create_key(self.store, self.settings, principal.account_id,
                                              spec)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        except LimitReached as exc:
            raise Rejected(403, "key_limit_reached", str(exc), "permission_error") from None
        except NotFound:
            raise _unauthorized() from None
        await send_json(send, 201, orjson.dumps(key_json(record, self.settings, secret)))

    def _check_entitlement(self, spec: KeySpec) -> None:
        """Plans and limits are entitlements the operator grants: over HTTP a key gets at
        most what its plan (or the credit limits) give, and plan keys only when the operator
        allows it (api_plan_keys = true)."""
        if spec.plan is not None:
            plan = self.settings.plans.get(spec.plan)
            if plan is None:
                raise bad_request(f"plan: unknown plan {spec.plan!r}")
            if not self.settings.api_plan_keys:
                raise Rejected(403, "plan_keys_not_allowed",
                               "Plan keys are issued by the operator; the management API "
                               "creates credit keys (credit: true).", "permission_error")
            rpm, tpm = plan.rpm, plan.tpm
        else:
            rpm, tpm = self.settings.credit_rpm, self.settings.credit_tpm
        for field, asked, allowed in (("rpm", spec.rpm, rpm), ("tpm", spec.tpm, tpm)):
            if asked is not None and asked > allowed:
                raise bad_request(f"{field} must be at most {allowed} for this key type")

    async def _update_key(self, principal: Principal, key_id: str, body: dict[str, Any],
                          send: Send) -> None:
        only_fields(body, PATCH_FIELDS)
        if not body:
            raise bad_request("nothing to update: give isActive and/or name")
        active = body.get("isActive")
        if "isActive" in body and not isinstance(active, bool):
            raise bad_request("isActive must be true or false")
        name = checked_name(body["name"]) if "name" in body else None
        try:
            record = await self.store.update_key(principal.account_id, key_id, name=name,
                                                 active=active)
        except ConfigError as exc:  # a deleted key
            raise Rejected(409, "key_deleted", str(exc)) from None
        if record is None:
            raise _not_found()
        await send_json(send, 200, orjson.dumps(key_json(record, self.settings)))

    async def _rotate(self, principal: Principal, key_id: str, send: Send) -> None:
        secret = new_consumption_secret()
        try:
            record = await self.store.rotate_key(principal.account_id, key_id,
                                                 hash_secret(secret))
        except ConfigError as exc:  # a deleted key
            raise Rejected(409, "key_deleted", str(exc)) from None
        if record is None:
            raise _not_found()
        await send_json(send, 200, orjson.dumps(key_json(record, self.settings, secret)))
