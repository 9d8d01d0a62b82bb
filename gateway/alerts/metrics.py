"""The alert sender's metrics (on the gateway's registry inside `gateway serve`, on their own
listener for `gateway alerts send`). Labels are bounded: the event type only."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.config.alerts import EVENT_TYPES


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.delivered = Counter(
            "gateway_alerts_delivered", "Alert events delivered to a webhook (2xx), by type",
            ["type"], registry=r)
        for name in EVENT_TYPES:  # every type has a series (at 0) from the start
            self.delivered.labels(name)
        self.failed = Counter(
            "gateway_alerts_failed",
            "Webhook calls that failed (not 2xx, timed out, no connection); retried",
            registry=r)
        self.given_up = Counter(
            "gateway_alerts_given_up",
            "Alert events given up (max_attempts or give_up_after reached) and deleted",
            registry=r)
        self.outbox_events = Gauge(
            "gateway_alerts_outbox_events",
            "Alert events waiting in the account outboxes (the sender's lag)",
            registry=r, multiprocess_mode="max")
        self.oldest_seconds = Gauge(
            "gateway_alerts_oldest_event_seconds",
            "Age of the oldest alert event not yet delivered (0: none)",
            registry=r, multiprocess_mode="max")
        self.dropped = Gauge(
            "gateway_alerts_dropped_events",
            "Alert events trimmed at the outbox cap, over all accounts, ever (from Redis)",
            registry=r, multiprocess_mode="max")
