"""An alert event's JSON body: what a webhook receives (money in USD as numbers, times as
ISO 8601 UTC), built from the fields a script wrote (integer micro-USD, Redis microseconds).

    {"id": "evt_<account>_<stream id>", "type": "budget.threshold",
     "created_at": "2026-05-01T10:00:00.000Z", "account_id": "…", "key_id": "…",
     "threshold": 0.8, "limit_usd": 10.0, "spent_usd": 8.01,
     "resets_at": "2026-05-31T00:00:00.000Z"}
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.alerts.outbox import AlertEvent
from gateway.config.units import format_duration
from gateway.core.timefmt import iso_from_us


def _int(fields: dict[str, str], name: str) -> int:
    text = fields.get(name, "")
    try:
        return int(text)
    except ValueError:
        return int(float(text)) if text else 0


def _usd(fields: dict[str, str], name: str) -> float:
    return _int(fields, name) / 1_000_000


def _window(field: str) -> str:
    """A window's state field as settle.lua names it ('bw:86400r') as people write it."""
    seconds, mode = field.removeprefix("bw:")[:-1], field[-1:]
    if not field.startswith("bw:") or not seconds.isdigit():
        return field
    return format_duration(int(seconds)) + ("/calendar" if mode == "c" else "")


def document(event: AlertEvent) -> dict[str, Any]:
    f = event.fields
    doc: dict[str, Any] = {
        "id": event.id, "type": event.type, "created_at": iso_from_us(event.created_at_us),
        "account_id": event.account_id, "key_id": f.get("key_id") or None}
    if event.type == "budget.threshold":
        doc.update(threshold=_int(f, "threshold_ppm") / 1_000_000,
                   limit_usd=_usd(f, "limit_micro"), spent_usd=_usd(f, "spent_micro"),
                   resets_at=iso_from_us(_int(f, "resets_at")),
                   # whose window: the key's primary budget, another of the key's budget
                   # windows (its own or its plan's) or one of its account's ("1d",
                   # "30d/calendar")
                   scope=f.get("scope") or "key", window=_window(f.get("window", "primary")))
    elif event.type == "credits.low":
        doc.update(balance_usd=_usd(f, "balance_micro"),
                   threshold_usd=_usd(f, "threshold_micro"))
    elif event.type == "key.expiring":
        doc.update(expires_at=iso_from_us(_int(f, "expires_at")))
    return doc


def body(event: AlertEvent) -> bytes:
    """The exact bytes sent (and signed): the same on every retry of the event."""
    return orjson.dumps(document(event))
