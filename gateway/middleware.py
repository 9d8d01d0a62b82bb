"""GatewayMiddleware: authenticate, admit, forward, observe usage, settle. Pure ASGI."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson

from gateway import metering
from gateway.auth import KeyResolver, header
from gateway.embedded import embedded_store
from gateway.endpoints import Endpoints
from gateway.errors import (
    ClientDisconnected,
    Rejected,
    StoreAmbiguous,
    StoreUnavailable,
    send_rejection,
)
from gateway.logs import REQUEST_ID_HEADER, RequestRecord, log_request
from gateway.management import Verifier
from gateway.metrics import Metrics, default_metrics
from gateway.ratelimit import ADMITTED, UNKNOWN_KEY, invalid_key, rate_headers, rejection
from gateway.settings import Price, Settings
from gateway.settlement import Settlement, SettlementQueue, release
from gateway.store import Decision, KeyRef, Store, connect
from gateway.types import ASGIApp, Headers, Message, Receive, Scope, Send

log = logging.getLogger("gateway")

_JSON_TAIL_BYTES = 256 * 1024


class _ClientGone(Exception):
    pass


def _too_large() -> Rejected:
    return Rejected(413, "request_too_large", "Request body is larger than the gateway allows.")


def _not_json() -> Rejected:
    return Rejected(400, "invalid_request", "Request body must be a valid JSON object.")


def _limiter_unavailable() -> Rejected:
    return Rejected(503, "limiter_unavailable",
                    "The rate limiter is unavailable; the request was not forwarded.", "api_error")


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Exchange:
    """One admitted request: decorates the response and settles exactly once."""

    def __init__(self, gateway: GatewayMiddleware, send: Send, ref: KeyRef, request_id: str,
                 decision: Decision, prompt_estimate: int, completion_estimate: int,
                 price: Price | None, strip_usage: bool, record: RequestRecord) -> None:
        self.gateway = gateway
        self.record = record
        self.downstream = send
        self.client_receive: Receive | None = None
        self.body: bytes | None = None
        self.gone = False  # the client disconnected
        self._gone_event: asyncio.Event | None = None  # made only when someone waits for it
        self.watcher: asyncio.Task[None] | None = None
        self.ref = ref
        self.request_id = request_id
        self.decision = decision
        self.prompt_estimate = prompt_estimate
        self.completion_estimate = completion_estimate
        self.price = price
        self.strip_usage = strip_usage
        self.status = 0
        self.started = False
        self.finished = False
        self.settled = False
        self.sse: metering.SseUsage | None = None
        self.json: metering.JsonUsage | None = None

    def own_receive(self, body: bytes, receive: Receive) -> Receive:
        """After replaying the body, the exchange is the only reader of the client's
        `receive`, so it can notice a disconnect whatever the app does."""
        self.body = body
        self.client_receive = receive
        return self.receive

    async def receive(self) -> Message:
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        self._watch()
        if not self.gone:
            if self._gone_event is None:
                self._gone_event = asyncio.Event()
            await self._gone_event.wait()
        return {"type": "http.disconnect"}

    def _watch(self) -> None:
        if self.watcher is None and self.client_receive is not None:
            self.watcher = asyncio.ensure_future(self._wait_for_disconnect(self.client_receive))

    async def _wait_for_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._gone_event is not None:
            self._gone_event.set()

    def stop_watching(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()

    async def send(self, message: Message) -> None:
        if self.gone:
            raise ClientDisconnected
        if message["type"] == "http.response.start":
            await self._start(message)
        elif message["type"] == "http.response.body":
            await self._body(message)
        else:
            await self.downstream(message)

    async def _start(self, message: Message) -> None:
        self.started = True
        self.status = self.record.status = int(message["status"])
        headers: Headers = []
        for name, value in message.get("headers", []):
            lowered = name.lower()
            if lowered == REQUEST_ID_HEADER:
                continue  # ours replaces it
            if lowered == b"content-type" and self.price is not None:
                if value.startswith(b"text/event-stream"):
                    self.sse = metering.SseUsage(self.strip_usage)
                    self._watch()
                elif b"json" in value:
                    self.json = metering.JsonUsage(_JSON_TAIL_BYTES)
            elif lowered == b"content-length" and self.strip_usage:
                continue  # the body may shrink by the usage chunk we remove
            elif lowered.startswith(b"x-ratelimit-"):
                continue
            headers.append((name, value))
        if self.sse is None and self.strip_usage:
            original = message.get("headers", [])
            headers.extend(h for h in original if h[0].lower() == b"content-length")
        headers.extend(rate_headers(self.decision))
        headers.append((REQUEST_ID_HEADER, self.record.request_id.encode()))
        await self.downstream({**message, "headers": headers})

    async def _body(self, message: Message) -> None:
        chunk: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        settle_now = False
        if self.sse is not None:
            chunk = self.sse.feed(chunk)
            if not more:
                chunk += self.sse.flush()
            settle_now = self.sse.final  # the usage chunk: before the client sees the end
        elif self.json is not None:
            self.json.feed(chunk)
        out = {"type": "http.response.body", "body": chunk, "more_body": more}
        if not more:
            self.finished = True
            settle_now = True
        if settle_now and not self.settled:
            await self._send_settling(out)
        else:
            await self.downstream(out)

    async def _send_settling(self, message: Message) -> None:
        """Settles and sends `message`, which lets the client see the end of the answer."""
        item = self._settlement()
        answer = self.gateway.settlements.begin(item)
        if answer is None:
            await self.gateway.settlements.settle_detached(item)  # spend lands first
            await self.downstream(message)
            return
        # Read-your-writes without waiting a round trip: one turn of the loop writes the
        # settlement (with the others queued in this turn: one system call for all) before
        # the client can see the message, so its next question to any replica reaches
        # Redis after the spend.
        try:
            await asyncio.sleep(0)
            await self.downstream(message)
        finally:
            await answer

    def usage(self) -> tuple[int, int]:
        if self.price is None:
            return 0, 0
        if self.sse is not None and self.sse.found is not None:
            return self.sse.found
        if self.json is not None and self.finished:
            found = self.json.usage()
            if found is not None:
                return found
        if self.status >= 400:
            return 0, 0  # the upstream refused or failed: no work to bill
        if not self.started:
            return self.prompt_estimate, 0  # gone before any answer: the prompt was sent
        if self.sse is not None and not (self.finished and self.sse.skipped):
            return self.prompt_estimate, self.sse.streamed_tokens()
        return self.prompt_estimate, self.completion_estimate  # no usage reported

    def _settlement(self) -> Settlement:
        self.settled = True
        prompt, completion = self.usage()
        cost = self.price.cost_micro(prompt, completion) if self.price else 0
        self.record.prompt_tokens, self.record.completion_tokens = prompt, completion
        self.record.cost_micro = cost
        return Settlement(self.ref, self.request_id, prompt, completion, cost,
                          self.decision.plan)

    async def settle(self) -> None:
        """Settles exactly once; cancelling the request (a client disconnect, a shutdown
        deadline) cannot cancel the settlement half-way (see settle_shielded)."""
        if self.settled:
            return
        await self.gateway.settlements.settle_shielded(self._settlement())


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
        self.store = store
        self.metrics = metrics or default_metrics()
        self.resolver = KeyResolver(store, self.settings.auth_cache_seconds)
        # verifier: dashboard sessions for /api/* (token -> account id); README "Management API"
        self.endpoints = Endpoints(store, self.settings, self.resolver, self.metrics.registry,
                                   verifier)
        self.settlements = SettlementQueue(store, self.metrics)
        self._outage = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._closing_on_shutdown(receive)
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        record = RequestRecord.start(scope)
        raw_send, send = send, record.wrap(send)
        try:
            handler = self.endpoints.route(path)
            if handler is not None:
                await handler(scope, receive, send)
            elif path.startswith("/v1/"):
                try:
                    await self._metered(scope, receive, send, raw_send, record)
                except Rejected as rejected:
                    record.decision, record.reason = "rejected", rejected.code
                    await send_rejection(send, rejected)
                except _ClientGone:
                    return
            else:
                await self.app(record.outbound_scope(scope), receive, send)
        finally:
            log_request(record)

    def _reject(self, rejected: Rejected, plan: str = "") -> Rejected:
        self.metrics.child(self.metrics.requests, "rejected", rejected.code, plan).inc()
        return rejected

    async def _metered(self, scope: Scope, receive: Receive, send: Send, raw_send: Send,
                       record: RequestRecord) -> None:
        """`send` records the response for the log line; `raw_send` is the server's own,
        for the exchange, which records the response itself (one header pass, not two)."""
        path: str = scope["path"]
        metered = path in metering.METERED_PATHS
        if not metered and not _canonical(path):
            # The upstream would resolve `/v1/./chat/completions` to a metered route that
            # the gateway would meter as some other path: refuse rather than guess.
            raise self._reject(Rejected(400, "invalid_request",
                                        "Request path must be in canonical form."))
        if metered and scope["method"] != "POST":
            raise self._reject(Rejected(405, "method_not_allowed",
                                        f"{path} accepts POST only.",
                                        headers=[(b"allow", b"POST")]))
        authorization = header(scope["headers"], b"authorization")
        try:
            found = (self.resolver.cached(authorization)
                     or await self.resolver.authenticate(authorization))
        except StoreUnavailable:
            await self._store_down(record.outbound_scope(scope), receive, send, record)
            return
        if found is None:
            raise self._reject(invalid_key())
        secret_hash, ref = found
        record.key_id = ref.key_id

        price: Price | None = None
        prompt_estimate = completion_estimate = 0
        strip_usage = False
        body = b""
        if metered:
            body = await self._read_limited(scope, receive)
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
            if not isinstance(payload, dict):
                raise self._reject(_not_json())
            price = self.settings.price_for(payload.get("model"))
            prompt_estimate = metering.estimate_prompt_tokens(payload)
            try:
                completion_estimate = metering.completion_reservation(
                    payload, scope["path"], self.settings.default_max_tokens)
            except metering.InvalidEstimate as exc:
                raise self._reject(Rejected(400, "invalid_request", str(exc))) from None
            strip_usage = metering.prepare_stream(payload)
            if strip_usage:
                body = orjson.dumps(payload)
            scope = record.outbound_scope(scope, len(body))
        else:
            scope = record.outbound_scope(scope)

        # The reservation id is always ours: a client-chosen X-Request-Id must never let two
        # requests share one reservation (and so one settlement).
        reservation_id = os.urandom(16).hex()
        estimate = prompt_estimate + completion_estimate
        cost = price.cost_micro(prompt_estimate, completion_estimate) if price else 0
        started = time.perf_counter()
        try:
            decision = await self.store.admit(ref, secret_hash, reservation_id, estimate, cost)
        except StoreUnavailable as exc:
            if isinstance(exc, StoreAmbiguous):  # undo a debit whose reply was lost
                self.settlements.submit(release(ref, reservation_id))
            if price is not None:  # fail open forwards the body we already read
                receive = _replay(body, receive)
            await self._store_down(scope, receive, send, record)
            return
        record.admission_seconds = time.perf_counter() - started
        self.metrics.admission_seconds.observe(record.admission_seconds)
        record.plan = decision.plan or ("credits" if decision.key_type == "credit" else "")
        self._outage = False
        if decision.code != ADMITTED:
            if decision.code == UNKNOWN_KEY:
                self.resolver.forget(secret_hash)
            rejected = rejection(decision)
            raise self._reject(rejected, record.plan)
        self.metrics.child(self.metrics.requests, "allowed", "ok", record.plan).inc()
        record.decision, record.reason = "allowed", "ok"

        exchange = _Exchange(self, raw_send, ref, reservation_id, decision, prompt_estimate,
                             completion_estimate, price, strip_usage, record)
        if price is not None:
            receive = exchange.own_receive(body, receive)
        forwarded = time.perf_counter()
        try:
            await self.app(scope, receive, exchange.send)
        except ClientDisconnected:
            pass
        finally:
            exchange.stop_watching()
            self.metrics.upstream_seconds.observe(time.perf_counter() - forwarded)
            await exchange.settle()

    async def _read_limited(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.max_body_bytes
        declared = header(scope["headers"], b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._reject(_too_large())
        try:
            return await _read_body(receive, limit)
        except Rejected as rejected:
            raise self._reject(rejected) from None

    async def _store_down(self, scope: Scope, receive: Receive, send: Send,
                          record: RequestRecord) -> None:
        self.metrics.child(self.metrics.store_errors, "admit").inc()
        if not self._outage:
            self._outage = True
            log.error("limiter store unavailable (fail_mode=%s)", self.settings.fail_mode)
        if self.settings.fail_mode == "open":
            self.metrics.fail_open.inc()
            record.decision, record.reason = "allowed", "fail_open"
            await self.app(scope, receive, send)
            return
        raise self._reject(_limiter_unavailable())

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
        await self.store.close()


def _canonical(path: str) -> bool:
    if "/." not in path and "//" not in path and not path.endswith("/") and ";" not in path \
            and "\\" not in path:
        return True  # the common case, without splitting
    segments = path.split("/")[1:]
    return all(segment not in ("", ".", "..") for segment in segments) and not any(
        c in path for c in ";\\")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
