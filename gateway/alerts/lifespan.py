"""The alert sender inside `gateway serve`: started at the ASGI lifespan's startup, stopped
at its shutdown, in each worker (each a consumer of its own name in the senders' group).

It wraps the app the GatewayMiddleware forwards to, so the middleware's lifespan handling
is unchanged; `attach` gives it the middleware's store once that exists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from gateway.alerts.metrics import AlertMetrics
from gateway.alerts.outbox import Outbox, enable_alerts
from gateway.alerts.sender import AlertSender
from gateway.config.alerts import AlertSettings
from gateway.store import Store
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.alerts")

_METRICS: AlertMetrics | None = None


def process_metrics() -> AlertMetrics:
    """One set per process, on the default registry that `gateway serve`'s /metrics reads."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import REGISTRY

        _METRICS = AlertMetrics(REGISTRY)
    return _METRICS


def consumer_name(role: str, per_process: bool = True) -> str:
    """`gateway serve`'s workers: one name each (host, role, pid); `gateway alerts send`: the
    host's, so that a run after a stop (or `--once` after `--once`) reads again the events
    it had been given and not finished."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}-{role}-{os.getpid()}" if per_process else f"{host}-{role}"


class AlertsInServe:
    """An ASGI app around `app` whose lifespan runs the alert sender beside the server."""

    def __init__(self, app: ASGIApp, settings: AlertSettings, interval: float = 1.0) -> None:
        self.app = app
        self.settings = settings
        self.interval = interval
        self.sender: AlertSender | None = None
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def attach(self, store: Store) -> None:
        enable_alerts(store, self.settings)
        self._store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        await self.app(scope, lifespan_receive, send)

    def start(self) -> None:
        if self._task is not None or self._store is None:
            return
        self.sender = AlertSender(Outbox(self._store, consumer_name("serve")), self.settings,
                                  process_metrics())
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(self.sender))

    async def _run(self, sender: AlertSender) -> None:
        try:
            await sender.run(self._stop, self.interval)
        except Exception:  # never take the server down; say so loudly
            log.exception("the alert sender stopped")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5.0)
        if self.sender is not None:
            await self.sender.close()
