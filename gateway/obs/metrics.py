"""Prometheus metrics. Labels are bounded: never a key, key id or account id, and a model
only by a name [pricing.models] configures (any other is `other`). docs/metrics.md lists them.

With several worker processes every metric lives in prometheus-client's multiprocess mode:
each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR and any worker's /metrics
reads all of them, so a scrape shows one view of the whole server. The variable must be set
before prometheus_client is imported in a worker (it picks its value store at import), which
`gateway serve` does through `multiprocess_dir` before uvicorn spawns its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.errors import ConfigError, Rejected

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)  # max_queue_wait <= 60 s

# What the upstream answered, the `status_class` of gateway_upstream_duration_seconds: its
# status class, ERROR when it gave no answer (unreachable, timed out, the app raised) and
# CANCELLED when the client left before it answered. Indices into Metrics.upstream.
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error", "cancelled")
ERROR, CANCELLED = 4, 5
OTHER_MODEL = "other"  # the model label of any model [pricing.models] does not name
# RPM and TPM refusals share the client's code (rate_limit_exceeded) and its error type
# tells them apart; the metrics and the log split them.
_RATE_LIMIT_REASONS = {"requests": "rate_limit_exceeded_rpm",
                       "tokens": "rate_limit_exceeded_tpm"}
IN_FLIGHT_PUBLISH_SECONDS = 0.05


def status_class(status: int) -> int:
    """The index in STATUS_CLASSES of an upstream's answer with `status`."""
    index = status // 100 - 2
    return index if 0 <= index <= 3 else ERROR


def rejection_reason(rejected: Rejected) -> str:
    """The `reason` of a refusal in the metrics and the log: its code, with RPM and TPM
    apart."""
    if rejected.code == "rate_limit_exceeded":
        return _RATE_LIMIT_REASONS.get(rejected.error_type, rejected.code)
    return rejected.code


class InFlight:
    """The requests this process is handling, written to its gauge at most every
    IN_FLIGHT_PUBLISH_SECONDS (and once the count stops changing): in multiprocess mode each
    write to a gauge is a locked write to a file mapping, which twice a request would cost
    more than the rest of the request's metrics."""

    def __init__(self, gauge: Gauge, delay: float = IN_FLIGHT_PUBLISH_SECONDS) -> None:
        self.gauge = gauge
        self.count = 0
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enter(self) -> None:
        self.count += 1
        self._schedule()

    def leave(self) -> None:
        self.count -= 1
        self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.publish()
            return
        if self._timer is None or self._loop is not loop:  # a test's closed loop never fires
            self._loop = loop
            self._timer = loop.call_later(self._delay, self.publish)

    def publish(self) -> None:
        self._timer = None
        self.gauge.set(self.count)


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
    would_reject: Counter  # shadow mode: refusals the plan's limits would have made
    over_bound: Counter
    over_reservation: Counter
    upstream: tuple[Histogram, ...]  # gateway_upstream_duration_seconds by STATUS_CLASSES
    first_byte: Histogram
    first_token: Histogram
    settlement_seconds: Histogram
    settlements_pending: Gauge
    settlement_lag: Gauge
    in_flight: InFlight
    queue_seconds: Histogram  # gateway_queue_seconds by outcome (gateway/http/queueing.py)
    queued: Gauge
    registry: CollectorRegistry
    _children: dict[tuple[Counter, tuple[str, ...]], Counter] = field(default_factory=dict)

    def child(self, metric: Counter, *labels: str) -> Counter:
        """`metric.labels(*labels)`, looked up once per label set: on the hot path the
        lookup (validation, a lock, a dict of tuples) costs more than the increment."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    @classmethod
    def create(cls, registry: CollectorRegistry = REGISTRY) -> Metrics:
        upstream = Histogram("gateway_upstream_duration_seconds",
                             "Upstream time to the last byte, by what it answered",
                             ["status_class"], buckets=_UPSTREAM_BUCKETS, registry=registry)
        in_flight = Gauge("gateway_requests_in_flight",
                          "Requests on the gateway's metered paths being handled now",
                          registry=registry, multiprocess_mode="livesum")
        return cls(
            requests=Counter("gateway_requests_total", "Requests by admission decision",
                             ["decision", "reason", "plan"], registry=registry),
            tokens=Counter("gateway_tokens_total", "Settled tokens",
                           ["kind", "plan", "model"], registry=registry),
            spend=Counter("gateway_spend_usd_total", "Settled spend in USD",
                          ["plan", "model"], registry=registry),
            admission_seconds=Histogram("gateway_admission_duration_seconds",
                                        "Admission round trip", buckets=_LATENCY_BUCKETS,
                                        registry=registry),
            upstream_seconds=upstream,
            store_errors=Counter("gateway_store_errors_total", "Limiter store errors", ["op"],
                                 registry=registry),
            settlements=Counter("gateway_settlements_total", "Settlements by outcome",
                                ["outcome"], registry=registry),
            fail_open=Counter("gateway_fail_open_requests_total",
                              "Requests forwarded unenforced while the store was down",
                              registry=registry),
            would_reject=Counter("gateway_would_reject_total",
                                 "Requests a plan in shadow mode (enforce = false) admitted "
                                 "that its limits would have refused", ["reason", "plan"],
                                 registry=registry),
            over_bound=Counter("gateway_usage_over_bound_total",
                               "Responses whose reported completion tokens exceeded the bound "
                               "forwarded (billed at the bound)", registry=registry),
            over_reservation=Counter(
                "gateway_cost_over_reservation_total",
                "Answers whose cost, priced as served, exceeded what admission reserved "
                "(billed at the reservation)", registry=registry),
            # Created at once, so that every class has a series (at 0) from the start.
            upstream=tuple(upstream.labels(name) for name in STATUS_CLASSES),
            first_byte=Histogram("gateway_stream_first_byte_seconds",
                                 "Streams: forwarding to the upstream's response head",
                                 buckets=_UPSTREAM_BUCKETS, registry=registry),
            first_token=Histogram("gateway_stream_first_token_seconds",
                                  "Streams: forwarding to the first event carrying output",
                                  buckets=_UPSTREAM_BUCKETS, registry=registry),
            settlement_seconds=Histogram("gateway_settlement_duration_seconds",
                                         "Settlement round trip to the store",
                                         buckets=_LATENCY_BUCKETS, registry=registry),
            settlements_pending=Gauge("gateway_settlements_pending",
                                      "Settlements waiting in the retry queue",
                                      registry=registry, multiprocess_mode="livesum"),
            settlement_lag=Gauge("gateway_settlement_lag_seconds",
                                 "Age of the oldest settlement waiting in the retry queue",
                                 registry=registry, multiprocess_mode="livemax"),
            in_flight=InFlight(in_flight),
            queue_seconds=Histogram("gateway_queue_seconds",
                                    "Short queueing (max_queue_wait): time a request refused "
                                    "for RPM, TPM or a slot waited, by how it ended",
                                    ["outcome"], buckets=_QUEUE_BUCKETS, registry=registry),
            queued=Gauge("gateway_queued_requests",
                         "Requests waiting in short queueing (max_queue_wait) now",
                         registry=registry, multiprocess_mode="livesum"),
            registry=registry,
        )


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics on the default registry, created once."""
    global _default
    if _default is None:
        _default = Metrics.create()
    return _default


class LiveWorkers:
    """The multiprocess collector, forgetting first the live gauges (in flight, pending
    settlements, lag) of workers that died: uvicorn replaces a crashed worker, and the dead
    one's last values must not be summed in forever."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.inner = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Any:
        for file in Path(self.path).glob("gauge_live*_*.db"):
            pid = file.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                mark_process_dead(int(pid), self.path)  # type: ignore[no-untyped-call]
        return self.inner.collect()  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body and content type: all workers' values in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        # A fresh registry per scrape, as prometheus-client documents for multiprocess mode.
        merged = CollectorRegistry()
        merged.register(LiveWorkers(os.environ[MULTIPROC_ENV]))
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_metrics(host: str, port: int) -> None:
    """/metrics on a listener of its own (a thread of this process), apart from the clients'
    port: every worker's values in multiprocess mode, this process's otherwise."""
    registry = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        registry.register(LiveWorkers(os.environ[MULTIPROC_ENV]))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None


def _clear(directory: Path) -> None:
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """Prepares PROMETHEUS_MULTIPROC_DIR for a server with `workers` processes.

    An operator-set directory is created if missing and emptied of metric files before the
    workers start and after they stop (files of an earlier run would be added to this one's
    counts). With several workers and no directory set, a private temporary one is created and
    removed at exit. A single worker without the variable keeps the plain in-process registry.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _clear(directory)
        except OSError as exc:
            raise ConfigError(f"cannot use {MULTIPROC_ENV}={configured} for the metrics of "
                              f"several workers: {exc.strerror}") from None
        try:
            yield directory
        finally:
            _clear(directory)
        return
    if workers <= 1:
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield directory
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
