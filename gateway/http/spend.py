"""GET /api/spend: what the caller's account spent, read from the ledger (PostgreSQL).

`from` and `to` (ISO 8601 dates or date-times, UTC unless they say otherwise; `to` exclusive)
bound the settlement time; `group_by` is key, model or (UTC) day. One connection per request
(db.connection: 5 s to connect); psycopg is imported only when the first spend is read.
Money stays integer micro-USD until the answer, converted as the rest of the API does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from gateway.config.units import micro_to_usd
from gateway.errors import LedgerUnavailable, Rejected
from gateway.http.management_body import bad_request
from gateway.types import Headers

if TYPE_CHECKING:
    from gateway.ledger.queries import SpendLine

log = logging.getLogger("gateway")

GROUPS = ("key", "model", "day")  # gateway.ledger.queries.GROUPS, without importing psycopg
DEFAULT_GROUP = "key"
DEFAULT_SPAN = timedelta(days=30)
MAX_SPAN = timedelta(days=366)  # a year, leap or not
STATEMENT_TIMEOUT_MS = 10_000  # a year of a large account's rows is still one index range
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# "+01:00" in a query string arrives as " 01:00" when the client did not encode the '+'.
_SPACED_OFFSET = re.compile(r"^(.*\d) (\d{2}(?::?\d{2})?)$")


@dataclass(frozen=True, slots=True)
class SpendQuery:
    start: datetime
    end: datetime
    group_by: str


def _moment(text: str, name: str) -> datetime:
    candidates = [text]
    spaced = _SPACED_OFFSET.match(text)
    if spaced:
        candidates.append(f"{spaced.group(1)}+{spaced.group(2)}")
    for candidate in candidates:
        try:
            moment = datetime.fromisoformat(candidate)
            if moment.tzinfo is None:
                return moment.replace(tzinfo=UTC)
            return moment.astimezone(UTC)
        except (ValueError, OverflowError):
            continue
    raise bad_request(f"{name} must be an ISO 8601 date or date-time, like 2026-11-01 or "
                      f"2026-11-01T08:00:00Z, not {text[:40]!r}")


def spend_query(query_string: bytes, now_us: int) -> SpendQuery:
    """The query's from, to and group_by, checked; defaults: to = now (Redis time), from =
    30 days before to, group_by = key. Other parameters are ignored, as /api/* does."""
    given: dict[str, str] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in ("from", "to", "group_by"):
            if name in given:
                raise bad_request(f"{name} is given more than once")
            given[name] = value
    group_by = given.get("group_by", DEFAULT_GROUP)
    if group_by not in GROUPS:
        raise bad_request(f"group_by must be key, model or day, not {group_by[:40]!r}")
    end = (_moment(given["to"], "to") if "to" in given
           else _EPOCH + timedelta(microseconds=now_us))
    try:
        start = _moment(given["from"], "from") if "from" in given else end - DEFAULT_SPAN
    except OverflowError:  # 30 days before a `to` in the first month of year 1
        raise bad_request("to is too early: give from as well") from None
    if start > end:
        raise bad_request("from must not be after to")
    if end - start > MAX_SPAN:
        raise bad_request("from and to must be at most 366 days apart: ask for a year at a "
                          "time")
    return SpendQuery(start, end, group_by)


def unconfigured(headers: Headers | None = None) -> Rejected:
    return Rejected(503, "ledger_unavailable", "Spend is read from the gateway's ledger "
                    "database, and none is configured on this gateway.", "api_error", headers)


def spend_document(lines: list[SpendLine]) -> dict[str, Any]:
    return {
        "success": True,
        "data": [{"group": line.group, "requests": line.requests,
                  "promptTokens": line.prompt_tokens,
                  "completionTokens": line.completion_tokens,
                  "costUsd": micro_to_usd(line.cost_micro)} for line in lines],
        # Summed in micro-USD, converted once: the total is the ledger's, not a float sum.
        "totalCostUsd": micro_to_usd(sum(line.cost_micro for line in lines)),
    }


async def spend_body(url: str, account_id: str, query: SpendQuery, headers: Headers) -> bytes:
    """The answer's body; a 503 (with the rate headers) when PostgreSQL fails."""
    from gateway.ledger import db, queries

    try:
        async with db.connection(url) as conn:
            await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}".encode())
            lines = await queries.spend(conn, account_id, query.start, query.end,
                                        query.group_by)
    except LedgerUnavailable as exc:  # its message never holds the URL
        log.warning("GET /api/spend: the ledger database failed: %s", exc)
        raise Rejected(503, "ledger_unavailable", "The gateway's ledger database is "
                       "unavailable at the moment; try again later.", "api_error",
                       headers) from None
    return orjson.dumps(spend_document(lines))
