"""Prometheus metrics. Labels are bounded: never a key, key id or account id."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True, slots=True)
class Metrics:
    requests: Counter
    tokens: Counter
    spend: Counter
    admission_seconds: Histogram
    upstream_seconds: Histogram
    store_errors: Counter
    settlements: Counter
    fail_open: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry = REGISTRY) -> Metrics:
        return cls(
            requests=Counter("gateway_requests_total", "Requests by admission decision",
                             ["decision", "reason", "plan"], registry=registry),
            tokens=Counter("gateway_tokens_total", "Settled tokens", ["kind", "plan"],
                           registry=registry),
            spend=Counter("gateway_spend_usd_total", "Settled spend in USD", ["plan"],
                          registry=registry),
            admission_seconds=Histogram("gateway_admission_duration_seconds",
                                        "Admission round trip", buckets=_LATENCY_BUCKETS,
                                        registry=registry),
            upstream_seconds=Histogram("gateway_upstream_duration_seconds",
                                       "Upstream time to the last byte",
                                       buckets=_UPSTREAM_BUCKETS, registry=registry),
            store_errors=Counter("gateway_store_errors_total", "Limiter store errors", ["op"],
                                 registry=registry),
            settlements=Counter("gateway_settlements_total", "Settlements by outcome",
                                ["outcome"], registry=registry),
            fail_open=Counter("gateway_fail_open_requests_total",
                              "Requests forwarded unenforced while the store was down",
                              registry=registry),
        )


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics on the default registry, created once."""
    global _default
    if _default is None:
        _default = Metrics.create()
    return _default
