"""[alerts] and [[alerts.webhooks]]: who is told of budget thresholds, low credits, keys
about to expire and keys deactivated (the events are made inside the scripts; the sender in
gateway/alerts/ delivers them).

    [alerts]
    budget_thresholds = [0.8, 1.0]     # fractions of a key's budget, once per period each
    credits_low_usd = 5                # an account's balance falls below (once, re-armed)
    expiring_within = "3d"             # a key's expiry this close (once per expiry)
    sender = "serve"                   # "none": no sender in `gateway serve`; run
                                       # `gateway alerts send` apart (many replicas)

    [[alerts.webhooks]]
    url = "https://hooks.example.com/gateway"
    secret = "a long random string"   # HMAC-SHA256 key of X-Gateway-Signature
    events = ["budget.threshold", "credits.low"]   # default: all four

Alerts are on when at least one webhook is configured; with none, no script writes an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.config.units import (
    check_known,
    check_positive,
    check_seconds,
    check_table,
    parse_duration,
    usd_to_micro,
)
from gateway.errors import ConfigError

EVENT_TYPES = ("budget.threshold", "credits.low", "key.expiring", "key.deactivated")
DEFAULT_OUTBOX_CAP = 10_000  # events one account's outbox holds before the oldest drop
_FIELDS = ("budget_thresholds", "credits_low_usd", "expiring_within", "webhooks",
           "max_outbox_events", "max_attempts", "give_up_after", "timeout", "sender")
_WEBHOOK_FIELDS = ("url", "secret", "events")
_MAX_WEBHOOKS = 16
# Where senders run: "serve", one in every `gateway serve` worker (and any `gateway alerts
# send`); "none", only `gateway alerts send`. Every sender reads every account's outbox
# each pass, so many replicas run one sender apart instead (docs/alerts.md, Scale).
SENDER_MODES = ("serve", "none")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One receiver. Its URL (it may carry credentials) and secret never reach a log."""

    url: str = field(repr=False)
    secret: str = field(repr=False)
    events: tuple[str, ...] = EVENT_TYPES

    def wants(self, event_type: str) -> bool:
        return event_type in self.events

    @property
    def shown(self) -> str:
        """The URL as logs and `config check` show it: `masked_webhook_url`."""
        return masked_webhook_url(self.url)


def masked_webhook_url(url: str) -> str:
    """scheme://host[:port]/***: a webhook's path carries its credential as often as its
    query does (https://hooks.slack.com/services/T000/B000/XXXX), so neither is shown, nor
    a user or password."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "***"
    host = parts.hostname or ""
    authority = f"[{host}]" if ":" in host else host
    if port is not None:
        authority = f"{authority}:{port}"
    return f"{parts.scheme}://{authority}/***"


@dataclass(frozen=True, slots=True)
class AlertSettings:
    webhooks: tuple[Webhook, ...] = ()
    budget_thresholds: tuple[float, ...] = (0.8, 1.0)
    credits_low_micro: int | None = None  # None: no credits.low events
    expiring_within: int = 3 * 86400  # seconds
    max_outbox_events: int = DEFAULT_OUTBOX_CAP
    max_attempts: int = 12  # per event and webhook, then given up
    give_up_after: int = 86400  # seconds of an event's age, then given up
    timeout: float = 10.0  # one webhook call, seconds
    sender: str = "serve"  # SENDER_MODES: "none", no sender inside `gateway serve`

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks)

    @property
    def thresholds_ppm(self) -> tuple[int, ...]:
        """The thresholds as parts per million of the limit, ascending (settle.lua's)."""
        return tuple(sorted({round(t * 1_000_000) for t in self.budget_thresholds}))


def _threshold(value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 < value <= 1):
        raise ConfigError(f"alerts.budget_thresholds: each is a fraction of the budget above 0 "
                          f"and at most 1 (like 0.8), got {value!r}")
    # settle.lua compares whole parts per million: one that rounds to 0 would never fire.
    if round(value * 1_000_000) < 1:
        raise ConfigError(f"alerts.budget_thresholds: {value!r} rounds to 0 parts per million "
                          f"of the budget and would never fire; use at least 0.000001 "
                          f"(one part per million)")
    return float(value)


def _duration(value: object, name: str, example: str) -> int:
    """A duration setting, its name in every message (parse_duration's names none)."""
    if not isinstance(value, str):
        raise ConfigError(f"alerts.{name} must be a duration like \"{example}\", "
                          f"got {value!r}")
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise ConfigError(f"alerts.{name}: {exc}") from None


def _webhook(raw: object, index: int) -> Webhook:
    where = f"alerts.webhooks[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table ([[alerts.webhooks]])")
    check_known(raw, _WEBHOOK_FIELDS, f"[[alerts.webhooks]] number {index + 1}")
    url = raw.get("url")
    # The messages below never quote the URL: it may carry a password or a token.
    if not isinstance(url, str) or not url.isprintable() or " " in url:
        raise ConfigError(f"{where}.url must be an http:// or https:// URL without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url must be an http:// or https:// URL with a host")
    if port == 0 or parts.fragment:
        raise ConfigError(f"{where}.url must have a port from 1 to 65535 and no fragment")
    secret = raw.get("secret")
    if not isinstance(secret, str) or len(secret) < 16 or not secret.isprintable():
        raise ConfigError(f"{where}.secret must be a string of at least 16 printable "
                          f"characters (the HMAC-SHA256 key the receiver verifies with)")
    events = raw.get("events", list(EVENT_TYPES))
    if (not isinstance(events, list) or not events
            or not all(isinstance(e, str) and e in EVENT_TYPES for e in events)):
        raise ConfigError(f"{where}.events must be a non-empty list of "
                          f"{', '.join(EVENT_TYPES)}, got {events!r}")
    return Webhook(url, secret, tuple(dict.fromkeys(events)))


def alerts_from_config(data: object) -> AlertSettings:
    table: Mapping[str, Any] = check_table(data, "alerts")
    check_known(table, _FIELDS, "[alerts]")
    hooks = table.get("webhooks", [])
    if not isinstance(hooks, list):  # [alerts.webhooks] (one table) instead of [[...]]
        raise ConfigError("alerts.webhooks must be a list of tables ([[alerts.webhooks]]), "
                          "one [[alerts.webhooks]] per webhook, not a single table or a value")
    if len(hooks) > _MAX_WEBHOOKS:
        raise ConfigError(f"alerts.webhooks must be at most {_MAX_WEBHOOKS} "
                          f"[[alerts.webhooks]] tables, got {len(hooks)}")
    thresholds = table.get("budget_thresholds", [0.8, 1.0])
    if not isinstance(thresholds, list) or len(thresholds) > 10:
        raise ConfigError(f"alerts.budget_thresholds must be a list of at most 10 fractions, "
                          f"like [0.8, 1.0], got {thresholds!r}")
    low = table.get("credits_low_usd")
    sender = table.get("sender", "serve")
    if not isinstance(sender, str) or sender not in SENDER_MODES:
        raise ConfigError(f"alerts.sender must be \"serve\" (a sender in every gateway serve "
                          f"worker) or \"none\" (none there: run `gateway alerts send` "
                          f"apart), got {sender!r}")
    return AlertSettings(
        webhooks=tuple(_webhook(raw, i) for i, raw in enumerate(hooks)),
        budget_thresholds=tuple(_threshold(t) for t in thresholds),
        credits_low_micro=None if low is None else usd_to_micro(low, "alerts.credits_low_usd"),
        expiring_within=_duration(table.get("expiring_within", "3d"), "expiring_within", "3d"),
        max_outbox_events=check_positive(table.get("max_outbox_events", DEFAULT_OUTBOX_CAP),
                                         "alerts.max_outbox_events", 10_000_000),
        max_attempts=check_positive(table.get("max_attempts", 12), "alerts.max_attempts",
                                    1000),
        give_up_after=_duration(table.get("give_up_after", "1d"), "give_up_after", "1d"),
        timeout=check_seconds(table.get("timeout", 10.0), "alerts.timeout",
                              zero_allowed=False),
        sender=sender,
    )
