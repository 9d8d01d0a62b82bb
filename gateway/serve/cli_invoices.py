"""`gateway invoices`: an account's line items per key and model for a UTC calendar month,
read from the ledger (PostgreSQL). Amounts stay integer micro-USD until printed: a line's
cost and the total are exact decimal strings, and the total is the lines' sum."""

from __future__ import annotations

import argparse
import csv
import re
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.http.admin import resolve_account
from gateway.obs.logs import escape_control
from gateway.serve.cli_common import emit, postgres_option, postgres_url, usd_text
from gateway.store import Store, connect

if TYPE_CHECKING:
    from gateway.ledger.queries import InvoiceLine

CSV_HEADER = ("key_id", "model", "requests", "prompt_tokens", "completion_tokens", "cost_usd")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")  # ASCII digits: \d takes any script's
# A spreadsheet runs a cell that starts with one of these as a formula; a model name is the
# client's text, so such a cell is written with a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

_DESCRIPTION = """\
An account's invoice for one calendar month (UTC): one line per key and model with its
requests, tokens and cost, from the ledger in PostgreSQL (what `gateway ledger export`
stored). Costs are exact decimal strings of USD with 6 decimals ("12.345678"), in the text
table, the CSV and the JSON alike; the total is the sum of the lines' micro-dollars, so it
equals the ledger's to the micro-dollar. --csv prints the line items alone, under the
header key_id,model,requests,prompt_tokens,completion_tokens,cost_usd; --json prints
{"account_id", "month", "lines": [{"key_id", "model", "requests", "prompt_tokens",
"completion_tokens", "cost_usd"}], "total_usd"}.

--account takes the account's id, which needs no Redis; or its name, which is looked up in
Redis (--redis or GATEWAY_REDIS_URL)."""

_EPILOG = """\
examples:
  gateway invoices --account 0b7e6a52-3c1f-4d7a-9f43-1c2d3e4f5a6b --month 2026-11
  gateway invoices --account acme --month 2026-11 --csv > acme-2026-11.csv
  gateway invoices --account acme --month 2026-11 --json --postgres postgresql://gw@db/ledger"""


def month(text: str) -> tuple[datetime, datetime]:
    """'2026-11' -> [2026-11-01T00:00Z, 2026-12-01T00:00Z)."""
    found = _MONTH.fullmatch(text)
    if not found or not 1 <= int(found.group(2)) <= 12 or not 1970 <= int(found.group(1)) <= 9998:
        raise argparse.ArgumentTypeError(f"a month is YYYY-MM, like 2026-11, not {text[:20]!r}")
    year, number = int(found.group(1)), int(found.group(2))
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def _account_id(text: str, settings: Settings) -> str:
    """An id as given (it needs no Redis: the ledger outlives a lost Redis; with Redis
    configured, a mistyped id is refused rather than invoiced at zero); a name through
    Redis. Account names never look like ids (accounts create refuses that)."""
    try:
        account_id = str(uuid.UUID(text))
    except ValueError:
        account_id = ""
    if account_id and not settings.redis_url:
        return account_id
    if not settings.redis_url:
        raise ConfigError(f"--account {text[:80]!r} is not an account id, and looking a name "
                          f"up needs Redis: pass --redis URL (or set GATEWAY_REDIS_URL), or "
                          f"give the account's id")
    store = connect(settings.redis_url, max(settings.redis_timeout_seconds, 2.0))
    try:
        return await resolve_account(store, account_id or text, create=False)
    finally:
        await store.close()


async def _lines(url: str, account_id: str, start: datetime,
                 end: datetime) -> list[InvoiceLine]:
    from gateway.ledger import db, queries

    async with db.connection(url) as conn:
        if await db.schema_version(conn) == 0:
            raise ConfigError("the ledger database has no tables yet: run "
                              "`gateway ledger migrate` (and `gateway ledger export`)")
        return await queries.invoice_lines(conn, account_id, start, end)


def _line_json(line: InvoiceLine) -> dict[str, Any]:
    return {"key_id": line.key_id, "model": line.model, "requests": line.requests,
            "prompt_tokens": line.prompt_tokens, "completion_tokens": line.completion_tokens,
            "cost_usd": usd_text(line.cost_micro)}


def _cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text


def _table(account_id: str, label: str, start: datetime, end: datetime,
           lines: list[InvoiceLine], total_micro: int) -> str:
    rows = [[line.key_id, escape_control(line.model), str(line.requests),
             str(line.prompt_tokens), str(line.completion_tokens), usd_text(line.cost_micro)]
            for line in lines]
    rows.append(["total", "", str(sum(li.requests for li in lines)),
                 str(sum(li.prompt_tokens for li in lines)),
                 str(sum(li.completion_tokens for li in lines)), usd_text(total_micro)])
    widths = [max(len(r[i]) for r in [list(CSV_HEADER), *rows]) for i in range(6)]

    def text(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(left + right).rstrip()

    head = (f"invoice: account {account_id}, {label} "
            f"(UTC, {start:%Y-%m-%d} to {end:%Y-%m-%d} exclusive)")
    if not lines:
        return f"{head}\nno settled requests in the ledger for this month; total 0.000000 USD"
    rule = "-" * len(text(list(CSV_HEADER)))
    return "\n".join([head, text(list(CSV_HEADER)), rule, *map(text, rows[:-1]), rule,
                      text(rows[-1]) + " USD"])


async def _invoices(args: argparse.Namespace, settings: Settings, store: Store | None) -> None:
    if args.csv and args.json:
        raise ConfigError("give --csv or --json, not both")
    url = postgres_url(args, settings)
    account_id = await _account_id(args.account, settings)
    start, end = args.month
    label = f"{start:%Y-%m}"
    lines = await _lines(url, account_id, start, end)
    total_micro = sum(line.cost_micro for line in lines)
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for line in lines:
            # Client text: no terminal escape or line break reaches whoever cats the file.
            writer.writerow([line.key_id, _cell(escape_control(line.model)), line.requests,
                             line.prompt_tokens,
                             line.completion_tokens, usd_text(line.cost_micro)])
        return
    doc = {"account_id": account_id, "month": label, "lines": [_line_json(li) for li in lines],
           "total_usd": usd_text(total_micro)}
    emit(args, doc, _table(account_id, label, start, end, lines, total_micro))


def add_invoice_command(sub: Any, common: argparse.ArgumentParser) -> None:
    invoices = sub.add_parser(
        "invoices", parents=[common], description=_DESCRIPTION, epilog=_EPILOG,
        help="an account's invoice for a month: line items per key and model, from the "
             "ledger (PostgreSQL)")
    invoices.add_argument("--account", required=True, metavar="ID|NAME",
                          help="the account's id (no Redis needed) or its name (looked up "
                               "in Redis)")
    invoices.add_argument("--month", required=True, type=month, metavar="YYYY-MM",
                          help="the calendar month, in UTC, e.g. 2026-11")
    invoices.add_argument("--csv", action="store_true",
                          help="the line items as CSV (costs as decimal strings)")
    postgres_option(invoices)
    invoices.set_defaults(run=_invoices, no_redis=True)
