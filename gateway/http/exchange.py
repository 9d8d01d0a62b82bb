"""One admitted request on its way back: decorate the response, read its usage, settle once."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING

from gateway.core import metering
from gateway.core.bounds import Bound
from gateway.core.metering import Usage
from gateway.core.request_id import REQUEST_ID_HEADER
from gateway.errors import ClientDisconnected
from gateway.http.ratelimit import rate_headers
from gateway.http.settlement import Settlement
from gateway.obs.logs import RequestRecord
from gateway.obs.metrics import CANCELLED, ERROR, OTHER_MODEL, status_class
from gateway.store import Decision, KeyRef, SpendDetail
from gateway.types import ASGIApp, Headers, Message, Receive, Scope, Send
from gateway.upstream.proxy import OWN_ANSWER

# A route or a model name is client text: the ledger keeps at most this much of it.
LEDGER_TEXT_CHARS = 200

if TYPE_CHECKING:
    from gateway.http.middleware import GatewayMiddleware

_JSON_TAIL_BYTES = 256 * 1024


class Exchange:
    """One admitted request: decorates the response and settles exactly once."""

    def __init__(self, gateway: GatewayMiddleware, send: Send, ref: KeyRef, request_id: str,
                 decision: Decision, bound: Bound | None, request_micro: int,
                 record: RequestRecord) -> None:
        """`bound`: what an inference request was admitted for (None for other paths);
        `request_micro`: its route's price per request, for answers without usage."""
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
        self.bound = bound
        # the completion tokens forwarded: every sequence at the bound admission granted
        self.completion_bound = 0 if bound is None else decision.per_sequence * bound.sequences
        self.request_micro = request_micro
        self.status = 0
        self.started = False
        self.finished = False
        self.settled = False
        self.sse: metering.SseUsage | None = None
        self.json: metering.JsonUsage | None = None
        self.forwarded = 0.0  # perf_counter() when the request went to the upstream
        self.answer = CANCELLED  # what the upstream answered: an index of STATUS_CLASSES
        self.awaiting_token = False  # a stream whose first output is yet to come
        self.model: str | None = None  # the model priced: as served, else as asked

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
        status = self.status = self.record.status = int(message["status"])
        if message.get(OWN_ANSWER):  # the proxy's own 502/504: the upstream gave no answer
            self.answer = ERROR
        else:
            self.answer = status_class(status)
            self.record.upstream_status = status
        bound = self.bound
        strip = bound is not None and (bound.inject_usage or bound.inject_running)
        headers: Headers = []
        encoded = False
        for name, value in message.get("headers", []):
            lowered = name.lower()
            if lowered == REQUEST_ID_HEADER:
                continue  # ours replaces it
            if lowered == b"content-type" and bound is not None:
                media = value.lower()
                if media.startswith(b"text/event-stream"):
                    if self.sse is None:
                        self.sse = metering.SseUsage(
                            bound.kind, bound.inject_usage, bound.inject_running,
                            bound.choices)
                        self.json = None
                        self._watch()
                        self.awaiting_token = True
                        self.gateway.metrics.first_byte.observe(
                            time.perf_counter() - self.forwarded)
                elif b"json" in media and self.sse is None:
                    self.json = metering.JsonUsage(_JSON_TAIL_BYTES)
            elif lowered == b"content-length" and strip:
                continue  # the body may shrink by the usage chunk we remove
            elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
                encoded = True
            elif lowered.startswith(b"x-ratelimit-"):
                continue
            headers.append((name, value))
        if encoded and (self.sse is not None or self.json is not None):
            # A compressed body (an app's own gzip, in the middleware shape) cannot be read
            # for its usage: it is billed as unread, at the bound forwarded.
            self.sse = self.json = None
        if self.sse is None and strip:
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
            if self.awaiting_token and self.sse.streamed_chunks:
                self._first_token()
            if not more:
                chunk += self.sse.flush()
            settle_now = self.sse.ended  # the stream's end marker: before the client sees it
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

    def _first_token(self) -> None:
        self.awaiting_token = False
        elapsed = self.record.ttft_seconds = time.perf_counter() - self.forwarded
        self.gateway.metrics.first_token.observe(elapsed)

    async def forward(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        """Runs the app (the upstream) for this request, observes its part by what it
        answered, and settles."""
        self.forwarded = time.perf_counter()
        try:
            await app(scope, receive, self.send)
        except ClientDisconnected:
            pass
        except Exception:
            if not self.started:
                self.answer = ERROR  # it raised before answering: no answer came
            raise
        finally:
            self.stop_watching()
            self.gateway.metrics.upstream[self.answer].observe(
                time.perf_counter() - self.forwarded)
            await self.settle()

    async def _send_settling(self, message: Message) -> None:
        """Settles and sends `message`, which lets the client see the end of the answer."""
        await self.gateway.settlements.settle_before(
            self._settlement(), functools.partial(self.downstream, message))

    def _reported(self) -> tuple[Usage | None, str | None]:
        sse = self.sse
        if sse is not None:
            found = sse.usage()
            if found is not None and sse.prompt_missing and self.bound is not None:
                # The stream never said its prompt count: bill the prompt's bound.
                found = Usage(self.bound.prompt_tokens, found.completion, found.cached)
            return found, sse.model
        if self.json is not None and self.finished:
            return self.json.result()
        return None, None

    def bill(self) -> tuple[Usage, int]:
        """The usage to settle and its cost in micro-USD: priced as served, and never more
        than admission reserved. A model served under another name than the one asked
        (a llama.cpp alias, a router) may cost more than was reserved for: what the budget
        and the credits let through is the reservation, so the bill stops there (counted in
        gateway_cost_over_reservation_total)."""
        usage, cost = self._bill()
        bound = self.bound
        if bound is None or cost == 0:
            return usage, cost
        reserved = (self.gateway.settings.reservation_price(bound.model).cost_micro(
            bound.prompt_tokens, self.completion_bound) + self.request_micro)
        if cost > reserved:
            self.gateway.metrics.over_reservation.inc()
            return usage, reserved
        return usage, cost

    def _bill(self) -> tuple[Usage, int]:
        bound = self.bound
        if bound is None:
            return Usage(0, 0), 0
        settings = self.gateway.settings
        found, model = self._reported()
        self.model = model = model or bound.model
        price = settings.price_for(model)
        limit = self.completion_bound
        if found is not None:
            if self.json is not None and self.json.first_result_only and bound.sequences > 1:
                # The others' usage is missing: bill what they may have used, their bound.
                prompt = found.prompt if bound.prompts == 1 else max(found.prompt,
                                                                     bound.prompt_tokens)
                found = Usage(prompt, limit, found.cached)
            if found.completion > limit:
                # The upstream was told the bound: more cannot be true work we owe it for.
                self.gateway.metrics.over_bound.inc()
                found = Usage(found.prompt, limit, found.cached)
            if self.request_micro and not (found.prompt or found.completion):
                return found, self.request_micro
            return found, price.cost_micro(found.prompt, found.completion, found.cached)
        if self.status >= 400:
            return Usage(0, 0), 0  # the upstream refused or failed: no work to bill
        if self.request_micro:
            return Usage(0, 0), self.request_micro
        usage = self._estimate(bound)
        return usage, price.cost_micro(usage.prompt, usage.completion)

    def _estimate(self, bound: Bound) -> Usage:
        """No usage reported: the bound, or what the stream showed of the work done."""
        if not self.started:
            return Usage(bound.prompt_tokens, 0)  # gone before any answer: the prompt was sent
        sse = self.sse
        if sse is not None and not (self.finished and sse.skipped):
            prompt = sse.known_prompt() or bound.prompt_tokens
            return Usage(prompt, min(sse.streamed_tokens(), self.completion_bound))
        return Usage(bound.prompt_tokens, self.completion_bound)

    def _settlement(self) -> Settlement:
        self.settled = True
        if self.decision.slots:
            self.gateway.leases.drop(self.request_id)
        usage, cost = self.bill()
        record = self.record
        record.prompt_tokens, record.completion_tokens = usage.prompt, usage.completion
        record.cost_micro = cost
        model = self.model
        if model is not None:
            record.model = model
        label = (model if model is not None and model in self.gateway.settings.model_prices
                 else OTHER_MODEL)
        detail = SpendDetail(record.path[:LEDGER_TEXT_CHARS],
                             (model or "")[:LEDGER_TEXT_CHARS], usage.cached, self.status)
        return Settlement(self.ref, self.request_id, usage.prompt, usage.completion, cost,
                          self.decision.plan, model=label, detail=detail)

    async def settle(self) -> None:
        """Settles exactly once; cancelling the request (a client disconnect, a shutdown
        deadline) cannot cancel the settlement half-way (see settle_shielded)."""
        if self.settled:
            return
        await self.gateway.settlements.settle_shielded(self._settlement())
