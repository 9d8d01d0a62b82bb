"""What the pages show, read the way /api/usage reads it: usage_snapshot's key records and
counters at Redis time, summed by aggregate() (the same numbers), spend by model from the
ledger (as /api/spend) when one is configured."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from gateway.config.settings import Settings
from gateway.config.units import format_duration
from gateway.core.usage_windows import aggregate
from gateway.errors import LedgerUnavailable
from gateway.http.dashboard import pages
from gateway.http.dashboard.charts import model_spend, period_spend, series, usd
from gateway.http.dashboard.pages import KeyRow, ModelSpend, PeriodRow
from gateway.store import KeyCounters, KeyRecord, Store

log = logging.getLogger("gateway")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MODEL_SPAN = timedelta(days=30)


def key_row(settings: Settings, counters: KeyCounters, now_us: int) -> KeyRow:
    r = counters.record
    rpm, tpm = settings.limits_for(r.plan, r.rpm, r.tpm)
    now_s = now_us // 1_000_000
    periods = aggregate(now_s, counters.minute_hashes, counters.hour_hashes)
    hourly, _ = series(now_s, counters.hour_hashes)
    return KeyRow(r, r.plan if r.key_type == "subscription" else "credits", rpm, tpm,
                  periods["last24h"].requests, hourly.spend_micro)


async def account_page(store: Store, settings: Settings, prefix: str, csrf: str,
                       account_id: str, live: bool = False) -> str:
    account = await store.get_account(account_id)
    snapshot = await store.usage_snapshot(account_id)
    rows = [key_row(settings, k, snapshot.now_us) for k in snapshot.keys
            if k.record.deleted_at_us is None]
    return pages.account(prefix, csrf, account.name, account.credits, rows, live=live)


async def key_page(store: Store, settings: Settings, prefix: str, csrf: str,
                   account_id: str, key_id: str, live: bool = False) -> str | None:
    """None for a key the account does not hold."""
    snapshot = await store.usage_snapshot(account_id, key_id)
    if not snapshot.keys:
        return None
    counters = snapshot.keys[0]
    now_s = snapshot.now_us // 1_000_000
    windows = aggregate(now_s, counters.minute_hashes, counters.hour_hashes)
    spends = period_spend(now_s, counters.minute_hashes, counters.hour_hashes)
    periods = [PeriodRow(name, w.requests, w.prompt_tokens + w.completion_tokens,
                         spends[name]) for name, w in windows.items()]
    hourly, daily = series(now_s, counters.hour_hashes)
    by_model, note = await _spend_by_model(settings, counters, snapshot.now_us)
    return pages.key(prefix, csrf, key_row(settings, counters, snapshot.now_us), periods,
                     hourly, daily, by_model, note, _budget(counters.record), live)


def _budget(r: KeyRecord) -> str:
    per = format_duration(r.budget_duration)
    if r.budget_limit is None:
        return f"none ({usd(r.spent)} this {per} period)"
    return f"{usd(r.spent)} of {usd(r.budget_limit)} per {per}"


async def _spend_by_model(settings: Settings, counters: KeyCounters,
                          now_us: int) -> tuple[list[ModelSpend] | None, str]:
    record = counters.record
    url = settings.ledger.postgres_url
    if not url:
        rows = [ModelSpend(model, requests, micro) for model, requests, micro
                in model_spend(now_us // 1_000_000, counters.hour_hashes)]
        return rows, ("From the usage counters: requests settled in the last 30 UTC days, "
                      "by the model the upstream served.")
    from gateway.ledger import db, queries

    end = _EPOCH + timedelta(microseconds=now_us)
    try:
        async with db.connection(url) as conn:
            lines = await queries.invoice_lines(conn, record.account_id, end - MODEL_SPAN,
                                                end)
    except LedgerUnavailable as exc:  # its message never holds the URL
        log.warning("dashboard: the ledger database failed: %s", exc)
        return None, "The ledger database is unavailable at the moment."
    rows = [ModelSpend(line.model, line.requests, line.cost_micro) for line in lines
            if line.key_id == record.id]
    return rows, "From the ledger: requests settled in the last 30 days, as /api/spend."
