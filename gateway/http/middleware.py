"""GatewayMiddleware: authenticate, admit, forward, observe usage, settle. Pure ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson

from gateway.config.routes import (
    AUDIO,
    INVOCATIONS,
    PublicPaths,
    Route,
    invocation_kind,
    route_path,
)
from gateway.config.settings import Settings
from gateway.core.bounds import Bound, InvalidRequest, analyse
from gateway.core.request_id import new_request_id
from gateway.errors import (
    Rejected,
    StoreAmbiguous,
    StoreUnavailable,
    send_rejection,
)
from gateway.hooks import HOOKS, RequestHooks
from gateway.http.auth import KeyResolver, header
from gateway.http.body import (
    ClientGone,
    canonical,
    limiter_unavailable,
    not_json,
    read_body,
    replay,
    too_large,
)
from gateway.http.endpoints import Endpoints
from gateway.http.exchange import Exchange
from gateway.http.leases import LeaseKeeper
from gateway.http.management import Verifier
from gateway.http.queueing import QUEUED_CODES, AdmissionQueue, readmission
from gateway.http.ratelimit import (
    ADMITTED,
    UNKNOWN_KEY,
    WOULD_REJECT_REASONS,
    invalid_key,
    rejection,
)
from gateway.http.settlement import Settlement, SettlementQueue, release
from gateway.obs import access_log
from gateway.obs.logs import RequestRecord, log_request
from gateway.obs.metrics import Metrics, default_metrics, rejection_reason
from gateway.store import Ask, Decision, KeyRef, Store, connect
from gateway.store.embedded import embedded_store
from gateway.store.records import NO_MODEL
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway")

_NOTHING = Ask(0, 0, 1, 0, 0, 0)  # what a keyed request that is not inference reserves


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, settings: Settings | None = None,
                 store: Store | None = None, metrics: Metrics | None = None,
                 verifier: Verifier | None = None) -> None:
        self.app = app
        self.settings = settings or Settings.load()
        if store is None:
            url = self.settings.redis_url
            store = (connect(url, self.settings.redis_timeout_seconds) if url
                     else embedded_store())
        if self.settings.ledger.stream_cap:
            store.ledger_cap = self.settings.ledger.stream_cap
        self.store = store
        self.metrics = metrics or default_metrics()
        self.resolver = KeyResolver(store, self.settings.auth_cache_seconds)
        # verifier: dashboard sessions for /api/* (token -> account id); README "Management API"
        self.endpoints = Endpoints(store, self.settings, self.resolver, self.metrics.registry,
                                   verifier)
        self.settlements = SettlementQueue(store, self.metrics)
        self.queue = AdmissionQueue(self.settings.plans.values(), self.metrics, ClientGone)
        self.leases = LeaseKeeper(store, self.settings.concurrency_lease)
        self._outage = False
        writer = access_log.installed()  # gateway serve's; else the stdlib logger
        self._log_request = log_request if writer is None else writer.write
        self._routes = self.settings.routes
        self._public = PublicPaths(self.settings.public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, self._closing_on_shutdown(receive), send)
            elif scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = route_path(scope)
        record = RequestRecord.start(scope)
        raw_send, send = send, record.wrap(send)
        try:
            handler = self.endpoints.route(path)
            if handler is not None:
                await handler(scope, receive, send)
            elif path in self._public:
                await self.app(record.outbound_scope(scope), receive, send)
            else:
                self.metrics.in_flight.enter()
                try:
                    await self._metered(scope, receive, send, raw_send, record)
                except Rejected as rejected:
                    record.decision, record.reason = "rejected", rejection_reason(rejected)
                    await send_rejection(send, rejected)
                except ClientGone:
                    return
                finally:
                    self.metrics.in_flight.leave()
        except Exception as exc:
            await self._unexpected(scope, send, record, exc)
        except asyncio.CancelledError:
            # The server's shutdown deadline passed with this request still waiting (a hung
            # upstream): the settlement has run; answer with our own 503, never a 500.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._shutting_down(scope, send, record)
        finally:
            self._log_request(record)

    async def _shutting_down(self, scope: Scope, send: Send, record: RequestRecord) -> None:
        record.decision, record.reason = "error", "shutting_down"
        if record.status == 0:
            with contextlib.suppress(Exception):
                await send_rejection(send, Rejected(
                    503, "shutting_down", "The gateway is shutting down; retry.", "api_error",
                    [(b"retry-after", b"1")]))
            return
        hooks: RequestHooks | None = scope.get("extensions", {}).get(HOOKS)
        if hooks is not None:
            hooks.abort()

    async def _unexpected(self, scope: Scope, send: Send, record: RequestRecord,
                          exc: Exception) -> None:
        """A bug or an error nobody mapped: logged once with its traceback, answered with
        the gateway's own error (503 when it came from the store), never uvicorn's."""
        from_store = isinstance(exc, StoreUnavailable)
        log.error("unexpected %s on %s %s (request %s)", type(exc).__name__, scope["method"],
                  scope["path"], record.request_id, exc_info=exc)
        record.decision, record.reason = "error", "internal_error"
        if record.status == 0:
            rejected = (limiter_unavailable() if from_store else Rejected(
                500, "internal_error", "The gateway failed to handle the request.",
                "api_error"))
            with contextlib.suppress(Exception):
                await send_rejection(send, rejected)
            return
        hooks: RequestHooks | None = scope.get("extensions", {}).get(HOOKS)
        if hooks is not None:
            hooks.abort()  # the answer had started: cut it short for the client to see

    def _reject(self, rejected: Rejected, plan: str = "") -> Rejected:
        self.metrics.child(self.metrics.requests, "rejected", rejection_reason(rejected),
                           plan).inc()
        return rejected

    async def _metered(self, scope: Scope, receive: Receive, send: Send, raw_send: Send,
                       record: RequestRecord) -> None:
        """Every path but the public ones needs a key; inference routes are metered.
        `send` records the response for the log line; `raw_send` is the server's own, for
        the exchange, which records the response itself (one header pass, not two)."""
        path = route_path(scope)
        route = self._routes.get(path)
        if route is None and not canonical(path):
            # The upstream would resolve `/v1/./chat/completions` to a metered route that
            # the gateway would meter as some other path: refuse rather than guess.
            raise self._reject(Rejected(400, "invalid_request",
                                        "Request path must be in canonical form."))
        if route is not None and scope["method"] != "POST":
            raise self._reject(Rejected(405, "method_not_allowed",
                                        f"{path} accepts POST only.",
                                        headers=[(b"allow", b"POST")]))
        authorization = header(scope["headers"], b"authorization")
        try:
            found = (self.resolver.cached(authorization)
                     or await self.resolver.authenticate(authorization))
        except StoreUnavailable as exc:
            await self._store_down(record.outbound_scope(scope), receive, send, record, exc)
            return
        if found is None:
            raise self._reject(invalid_key())
        secret_hash, ref = found
        record.key_id, record.account_id = ref.key_id, ref.account_id

        body = b""
        ask, bound = _NOTHING, None
        if route is not None:
            body = await self._read_limited(scope, receive)
            ask, bound = self._bound(route, scope, body)
            record.model = bound.model

        # The reservation id is always ours: a client-chosen X-Request-Id must never let two
        # requests share one reservation (and so one settlement). One random id serves
        # both when the request id is ours too.
        reservation_id = record.request_id if record.ours else new_request_id()
        started = time.perf_counter()
        try:
            decision = await self.store.admit(ref, secret_hash, reservation_id, ask,
                                              self.settings.admission.for_model(ask.model))
        except StoreUnavailable as exc:
            if isinstance(exc, StoreAmbiguous):  # undo a debit whose reply was lost
                self.settlements.submit(release(ref, reservation_id))
            if bound is not None:  # fail open forwards the body we already read
                body = bound.forwarded_body(body, ask.per_sequence)
                scope = record.outbound_scope(scope, len(body))
                receive = replay(body, receive)
            else:
                scope = record.outbound_scope(scope)
            await self._store_down(scope, receive, send, record, exc)
            return
        record.admission_seconds = time.perf_counter() - started
        self.metrics.admission_seconds.observe(record.admission_seconds)
        record.plan = decision.plan or ("credits" if decision.key_type == "credit" else "")
        self._outage = False
        if decision.code != ADMITTED and decision.plan in self.queue.waits:
            if route is not None:
                again = readmission(self.store, self.settlements, ref, secret_hash,
                                    reservation_id, ask,
                                    self.settings.admission.for_model(ask.model))
                decision, receive = await self.queue.wait(decision, ref.key_id, receive, ask,
                                                          again)
            if decision.code in QUEUED_CODES:  # admit.lua left this refusal to us to count
                await self._count_refusal(ref)
        if decision.code != ADMITTED:
            if decision.code == UNKNOWN_KEY:
                self.resolver.forget(secret_hash)
            rejected = rejection(decision)
            raise self._reject(rejected, record.plan)
        self.metrics.child(self.metrics.requests, "allowed", "ok", record.plan).inc()
        record.decision, record.reason = "allowed", "ok"
        if decision.slots:
            self.leases.hold(ref, reservation_id)
        if decision.would_reject:
            self.metrics.child(self.metrics.would_reject, WOULD_REJECT_REASONS.get(
                decision.would_reject, "other"), record.plan).inc()

        if bound is not None:
            body = bound.forwarded_body(body, decision.per_sequence)
            scope = record.outbound_scope(scope, len(body))
        else:
            scope = record.outbound_scope(scope)
        exchange = Exchange(self, raw_send, ref, reservation_id, decision, bound,
                            0 if route is None else route.request_micro, record)
        if bound is not None:
            receive = exchange.own_receive(body, receive)
        await exchange.forward(self.app, scope, receive)

    def _bound(self, route: Route, scope: Scope,
               body: bytes) -> tuple[Ask, Bound]:
        """What a request on an inference route reserves; 400 for a body whose price
        cannot be read."""
        settings = self.settings
        payload: dict[str, Any] | None = None
        if route.kind is not AUDIO or b"json" in (
                header(scope["headers"], b"content-type") or b"").lower():
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                raise self._reject(not_json())
            payload = parsed
        kind = route.kind
        if kind is INVOCATIONS and payload is not None:
            kind = invocation_kind(payload)
        model = payload.get("model") if payload is not None else None
        if model is not None and not isinstance(model, str):
            raise self._reject(Rejected(400, "invalid_request", "model must be a string"))
        if (model is not None and settings.unknown_models == "reject"
                and model not in settings.model_prices):
            raise self._reject(Rejected(400, "model_not_allowed",
                                        "The model is not offered by this gateway."))
        try:
            bound = analyse(route, kind, body, payload, settings.max_output_for(model),
                            settings.media_part_tokens, settings.running_usage)
        except InvalidRequest as exc:
            raise self._reject(Rejected(400, "invalid_request", str(exc))) from None
        price = settings.reservation_price(bound.model)
        extra = route.request_micro
        ask = Ask(bound.prompt_tokens, bound.per_sequence, bound.sequences,
                  price.cost_micro(bound.prompt_tokens, bound.completion_tokens) + extra,
                  price.prompt_micro(bound.prompt_tokens) + extra, price.output,
                  settings.on_insufficient == "clamp", bound.model or NO_MODEL)
        return ask, bound

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket cannot be metered: it reaches the app only on a route that allows it,
        and only with a valid key that admission lets through."""
        route = self.settings.routes.get(route_path(scope))
        if route is not None and route.websocket:
            found: tuple[str, Any] | None = None
            decision: Decision | None = None
            with contextlib.suppress(StoreUnavailable):
                found = await self.resolver.authenticate(
                    header(scope["headers"], b"authorization"))
            if found is not None:
                secret_hash, ref = found
                reservation_id = new_request_id()
                with contextlib.suppress(StoreUnavailable):
                    decision = await self.store.admit(ref, secret_hash, reservation_id,
                                                      _NOTHING, self.settings.plan_limits)
                if decision is not None and decision.code == ADMITTED:
                    try:
                        await self.app(scope, receive, send)
                    finally:
                        await self.settlements.settle_shielded(
                            Settlement(ref, reservation_id, 0, 0, 0, decision.plan))
                    return
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})

    async def _read_limited(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = header(scope["headers"], b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._reject(too_large())
        try:
            return await read_body(receive, limit)
        except Rejected as rejected:
            raise self._reject(rejected) from None

    async def _count_refusal(self, ref: KeyRef) -> None:
        # For the operator's view of the keys refused most: an outage only loses the count.
        with contextlib.suppress(StoreUnavailable):
            await self.store.count_refusal(ref)

    async def _store_down(self, scope: Scope, receive: Receive, send: Send,
                          record: RequestRecord, exc: StoreUnavailable) -> None:
        self.metrics.child(self.metrics.store_errors, "admit").inc()
        if not self._outage:
            self._outage = True
            # The store's errors name a node (host:port) and a cause, never a credential.
            log.error("limiter store unavailable (fail_mode=%s): %s", self.settings.fail_mode,
                      exc)
        if self.settings.fail_mode == "open":
            self.metrics.fail_open.inc()
            record.decision, record.reason = "allowed", "fail_open"
            await self.app(scope, receive, send)
            return
        raise self._reject(limiter_unavailable())

    def _closing_on_shutdown(self, receive: Receive) -> Receive:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        return lifespan_receive

    async def drain(self) -> None:
        """Waits for settlements still running, then flushes the retry queue (bounded)."""
        await self.settlements.drain()

    async def aclose(self) -> None:
        await self.drain()
        await self.leases.aclose()
        await self.store.close()
        access_log.flush()
