"""The exporter's own metrics (it is a process of its own: `gateway ledger export`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ExporterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lag_entries = Gauge(
            "gateway_ledger_lag_entries",
            "Entries in the account streams not yet stored in PostgreSQL", registry=r)
        self.oldest_unexported = Gauge(
            "gateway_ledger_oldest_unexported_seconds",
            "Age of the oldest entry not yet stored in PostgreSQL (0: none)", registry=r)
        self.fill_ratio = Gauge(
            "gateway_ledger_stream_fill_ratio",
            "The fullest account stream's length over its cap (at 1 the oldest are dropped)",
            registry=r)
        self.dropped = Gauge(
            "gateway_ledger_dropped_entries_total",
            "Entries dropped at the stream cap, over all accounts, ever (read from Redis)",
            registry=r)
        self.exported = Counter(
            "gateway_ledger_exported", "Rows inserted into PostgreSQL", registry=r)
        self.duplicates = Counter(
            "gateway_ledger_duplicates",
            "Entries delivered again and already stored (skipped by ON CONFLICT)", registry=r)
        self.errors = Counter(
            "gateway_ledger_export_errors", "Failed export steps, by the side that failed",
            ["stage"], registry=r)
        self.batch_seconds = Histogram(
            "gateway_ledger_batch_seconds",
            "One batch: PostgreSQL insert and commit, then the acknowledgement in Redis",
            registry=r)
        self.accounts = Gauge("gateway_ledger_accounts", "Account streams watched", registry=r)
