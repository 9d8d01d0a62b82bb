"""Structured logs: one line per request (JSON or key=value text), request ids, log config.

Request lines go to the `gateway.access` logger: INFO for API traffic, DEBUG for probes and
scrapes (/healthz, /readyz, /metrics), so a Prometheus scraping every few seconds does not
drown the log. Lines never carry a secret: the key is logged by its id only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.config.levels import check_format, check_level
from gateway.core.request_id import (
    client_request_id,
    new_request_id,
    outbound_scope,
    with_request_id,
)
from gateway.types import Message, Scope, Send

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MODEL_LOG_CHARS = 200  # a model name is the client's string: a line carries this much of it

access_log = logging.getLogger("gateway.access")

# Attributes every LogRecord has; anything else on a record came from `extra=` (uvicorn's
# ANSI-coloured copy of its message is dropped too).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message"}


@dataclass(slots=True)
class RequestRecord:
    """What one request's log line reports; the middleware fills it in as the request runs."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    account_id: str | None = None
    plan: str | None = None
    model: str | None = None  # as the upstream reported serving it, else as asked
    decision: str | None = None
    reason: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micro: int = 0
    admission_seconds: float | None = None
    upstream_status: int | None = None  # None: the upstream gave no answer, or was not asked
    ttft_seconds: float | None = None  # a stream's time to its first output
    ours: bool = False  # the request id was made here, not chosen by the client

    @classmethod
    def start(cls, scope: Scope) -> RequestRecord:
        client_id = client_request_id(scope["headers"])
        if client_id is None:
            return cls(new_request_id(), scope["method"], scope["path"], ours=True)
        return cls(client_id, scope["method"], scope["path"])

    def outbound_scope(self, scope: Scope, body_length: int | None = None) -> Scope:
        """The scope sent on to the app (see gateway.core.request_id.outbound_scope)."""
        return outbound_scope(scope, self.request_id, body_length)

    def wrap(self, send: Send) -> Send:
        """A send that records the status and returns the request id to the client."""
        own = self.request_id.encode()

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = int(message["status"])
                message = {**message,
                           "headers": with_request_id(message.get("headers", []), own)}
            await send(message)

        return recording_send

    def fields(self) -> dict[str, Any]:
        model = self.model
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "key_id": self.key_id,
            "account_id": self.account_id,
            "plan": self.plan,
            "model": model if model is None or len(model) <= MODEL_LOG_CHARS
            else model[:MODEL_LOG_CHARS],
            "decision": self.decision,
            "reason": self.reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_micro / 1_000_000,
            "admission_ms": (None if self.admission_seconds is None
                             else round(self.admission_seconds * 1000, 3)),
            "ttft_ms": (None if self.ttft_seconds is None
                        else round(self.ttft_seconds * 1000, 3)),
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }


def log_request(record: RequestRecord) -> None:
    level = logging.DEBUG if record.path in QUIET_PATHS else logging.INFO
    if access_log.isEnabledFor(level):
        access_log.log(level, "request", extra={"fields": record.fields()})


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for name, value in record.__dict__.items():
        if name == "fields" and isinstance(value, dict):
            extra.update(value)
        elif name not in _RECORD_ATTRS and not name.startswith("_"):
            extra[name] = value
    return extra


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid (the worker), msg, then fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name, "pid": record.process,
                               "msg": record.getMessage()}
        doc.update(_extra(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


# Control characters (a newline in a path, terminal escapes in a name) written as \xNN, so
# that one request is one line and a terminal shows text, not what it would obey.
_CONTROL: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
# And what reorders or breaks a line without being a control character: the bidirectional
# overrides and isolates, the directional marks, the line and paragraph separators.
_CONTROL |= {c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                                        *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def escape_control(text: str) -> str:
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger msg key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name,
                 escape_control(record.getMessage())]
        parts += [f"{k}={'-' if v is None else escape_control(str(v))}"
                  for k, v in _extra(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def logging_config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    """A logging.config.dictConfig document for the gateway's and uvicorn's loggers, one
    format for both. uvicorn applies it in every worker process (`log_config=`)."""
    level_name = check_level(level).upper()
    formatter = JsonFormatter if check_format(fmt) == "json" else TextFormatter
    handler = {"class": "logging.StreamHandler", "formatter": "gateway",
               "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level_name, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {"default": handler},
        "loggers": {
            "gateway": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": level_name},
            # The gateway writes its own request lines; uvicorn's access log would repeat them.
            "uvicorn.access": {**logger, "level": "WARNING"},
        },
    }
