"""The effective settings as `gateway config check` prints them: every value the gateway
will use, money in USD, secrets masked (a password in a URL, tokens and API keys)."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.config.alerts import masked_webhook_url
from gateway.config.settings import Price, Settings
from gateway.config.windows import BudgetWindow

MASK = "***"
_SECRET_FIELDS = frozenset({"upstream_api_key", "metrics_token", "admin_token"})
_URL_FIELDS = frozenset({"redis_url", "upstream_url"})
# A query option whose name says it holds a secret (password, api_key, token, ...).
_SECRET_OPTION = re.compile(r"pass|secret|token|key|auth|sig|credential", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with its password (and any password option of its query) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hosts}" if colon else f"{MASK}@{hosts}"
    query = "&".join(
        f"{name}={MASK}" if _SECRET_OPTION.search(name) else f"{name}={value}" if eq
        else name
        for name, eq, value in (item.partition("=") for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _plain(value: Any) -> Any:
    if isinstance(value, BudgetWindow):
        return value.text()  # "5/1d", "100/30d/calendar": USD, as the command line takes it
    if isinstance(value, Price):
        doc = {"input_usd_per_million": value.input / 1e6,
               "output_usd_per_million": value.output / 1e6}
        if value.cached_input is not None:
            doc["cached_input_usd_per_million"] = value.cached_input / 1e6
        return doc
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        doc = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            name, item = f.name, getattr(value, f.name)
            if name == "request_micro":
                name, item = "request_usd", item / 1e6
            doc[name] = _plain(item)
        return doc
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def effective_settings(settings: Settings) -> dict[str, Any]:
    doc: dict[str, Any] = _plain(settings)
    for name in _SECRET_FIELDS:
        if doc.get(name):
            doc[name] = MASK
    for name in _URL_FIELDS:
        if doc.get(name):
            doc[name] = mask_url(doc[name])
    if doc["ledger"].get("postgres_url"):
        doc["ledger"]["postgres_url"] = mask_url(doc["ledger"]["postgres_url"])
    # alerts: a webhook's secret never shown, nor its URL's path, query or credentials (a
    # Slack-style URL carries its token in the path)
    alerts = doc["alerts"]
    for hook in alerts["webhooks"]:
        hook["url"], hook["secret"] = masked_webhook_url(hook["url"]), MASK
    low = alerts.pop("credits_low_micro")
    alerts["credits_low_usd"] = None if low is None else low / 1e6
    return doc


def flat_items(doc: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """`doc` as dotted names and plain values, for the text output."""
    if isinstance(doc, dict) and doc:
        for key, value in doc.items():
            yield from flat_items(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, doc
