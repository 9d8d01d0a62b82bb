"""The gateway's own endpoints: /v1/usage, /api/plans, /healthz, /readyz, /metrics (and
the routes to /api/*, /admin/* and /dashboard/*)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import REGISTRY, CollectorRegistry

from gateway.config.settings import Settings
from gateway.config.units import format_duration, micro_to_usd
from gateway.config.windows import next_reset_us
from gateway.core.timefmt import iso_from_us
from gateway.errors import Rejected, StoreUnavailable, send_json, send_rejection
from gateway.http.auth import KeyResolver, header
from gateway.http.dashboard import Dashboard
from gateway.http.management import Management, Verifier
from gateway.http.operator import Operator
from gateway.http.ratelimit import invalid_key
from gateway.obs.metrics import exposition
from gateway.store import KeyUsage, Store
from gateway.store.codes import UsageCode
from gateway.store.records import WindowState
from gateway.types import Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def usage_document(u: KeyUsage, settings: Settings) -> dict[str, Any]:
    rpm, tpm = settings.limits_for(u.plan, u.rpm, u.tpm)
    subscription = u.key_type == "subscription"
    expired = subscription and u.expires_at_us is not None and u.now_us >= u.expires_at_us
    return {
        "budget": {
            "spent": micro_to_usd(u.spent),
            "limit": None if u.budget_limit is None else micro_to_usd(u.budget_limit),
            "duration": format_duration(u.budget_duration),
            "resets_at": iso_from_us(u.resets_at_us),
        },
        "rate_limits": {"rpm": rpm, "tpm": tpm},
        "plan": {
            "slug": u.plan if subscription else None,
            "status": "expired" if expired else "active",
            "expires_at": iso_from_us(u.expires_at_us) if u.expires_at_us else None,
        },
        "credits": {"balance": micro_to_usd(u.credits)},
        "key": {"name": u.name, "type": u.key_type, "created_at": iso_from_us(u.created_at_us)},
        # Beyond the seed's fields: every budget window of the key, the primary one (the
        # seed's `budget`) first, then its own or its plan's, then its account's.
        "budgets": [{"scope": "key", "primary": True, "limit": (
            None if u.budget_limit is None else micro_to_usd(u.budget_limit)),
            "duration": format_duration(u.budget_duration), "reset": "rolling",
            "spent": micro_to_usd(u.spent), "resets_at": iso_from_us(u.resets_at_us)},
            *(_window_document(w, u.now_us) for w in u.windows)],
    }


def _window_document(w: WindowState, now_us: int) -> dict[str, Any]:
    resets = next_reset_us(w.seconds, w.calendar, w.resets_at_us, now_us)
    spent = w.spent if resets == w.resets_at_us else 0  # a rollover due: a new period
    return {"scope": w.scope, "primary": False, "limit": micro_to_usd(w.limit),
            "duration": format_duration(w.seconds),
            "reset": "calendar" if w.calendar else "rolling", "spent": micro_to_usd(spent),
            "resets_at": None if resets is None else iso_from_us(resets)}


class Endpoints:
    def __init__(self, store: Store, settings: Settings, resolver: KeyResolver,
                 registry: CollectorRegistry = REGISTRY,
                 verifier: Verifier | None = None) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.resolver = resolver
        self.plans_body = orjson.dumps([
            {"slug": p.slug, "name": p.name, "priceUsdc": p.price_usdc,
             "rateLimits": {"tpm_limit": p.tpm, "rpm_limit": p.rpm},
             # Beyond the seed's fields: the models a key on the plan may ask for ([]: any).
             "models": list(p.models)}
            for p in settings.plans.values()
        ])
        self.management = Management(store, settings, verifier)
        self.operator = Operator(store, settings)
        self.dashboard = Dashboard(store, settings)
        self._routes: dict[str, Handler] = {
            "/v1/usage": self.usage,
            "/api/plans": self.plans,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
        }

    def route(self, path: str) -> Handler | None:
        handler = self._routes.get(path)
        if handler is None and (path.startswith("/api/") or path == "/openapi.json"):
            return self.management.route(path)  # the management API owns the rest of /api/
        if handler is None and (path == "/admin" or path.startswith("/admin/")):
            return self.operator.handle  # never forwarded: 404 when no admin token is set
        if handler is None and (path == "/dashboard" or path.startswith("/dashboard/")):
            return self.dashboard.handle  # never forwarded
        return handler

    async def usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            await _method_not_allowed(send)
            return
        try:
            found = await self.resolver.authenticate(header(scope["headers"], b"authorization"))
            usage = None if found is None else await self.store.key_usage(
                found[1], found[0], self.settings.admission.windows)
        except StoreUnavailable:
            await send_rejection(send, Rejected(
                502, "usage_unavailable", "Usage data is temporarily unavailable.", "api_error"))
            return
        if usage is None or usage.code == UsageCode.SECRET_MISMATCH:
            await send_rejection(send, invalid_key())
        elif usage.code == UsageCode.DEACTIVATED:
            await send_rejection(send, Rejected(
                403, "key_deactivated", "This API key has been deactivated.", "permission_error"))
        elif usage.code == UsageCode.RECORD_GONE:
            await send_rejection(send, Rejected(
                404, "key_not_found", "This API key is not known to the gateway.",
                "invalid_request_error"))
        else:
            await send_json(send, 200, orjson.dumps(usage_document(usage, self.settings)))

    async def plans(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.plans_body)

    async def healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, b'{"status":"ok"}')

    async def readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Ready means admission can run now: Redis answers and holds the Lua scripts. Asked
        # again once when that fails: the first command on a connection Redis dropped (a
        # restart this worker has not noticed yet) fails and closes it, and the second goes
        # over a new connection, so the answer is Redis's at this moment.
        redis, scripts = await self._ready()
        if not (redis and scripts):
            redis, scripts = await self._ready()
        status = 200 if redis and scripts else 503
        body = orjson.dumps({"status": "ready" if status == 200 else "unavailable",
                             "redis": redis, "scripts": scripts})
        await send_json(send, status, body, [(b"cache-control", b"no-store")])

    async def _ready(self) -> tuple[bool, bool]:
        redis = False
        try:
            redis = await self.store.ping()
            await self.store.ensure_scripts()
        except StoreUnavailable:
            return redis, False
        return redis, True

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self.settings.metrics_token
        if token is None:  # served on its own listener only (gateway serve --metrics-port)
            await send_rejection(send, Rejected(404, "not_found", "Not found."))
            return
        given = header(scope["headers"], b"authorization") or b""
        if not hmac.compare_digest(given, b"Bearer " + token.encode()):
            await send_rejection(send, Rejected(
                401, "invalid_metrics_token",
                "The metrics need 'Authorization: Bearer <metrics_token>'."))
            return
        body, content_type = exposition(self.registry)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _method_not_allowed(send: Send) -> None:
    await send_rejection(send, Rejected(405, "method_not_allowed", "Method not allowed.",
                                        headers=[(b"allow", b"GET")]))
