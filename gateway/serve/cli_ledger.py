"""`gateway ledger migrate | export | reconcile`: the spend ledger in PostgreSQL."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.http.admin import resolve_account
from gateway.serve.cli_common import (
    action,
    emit,
    name_arg,
    port_arg,
    postgres_option,
    postgres_url,
    seconds_arg,
    start_worker,
    usd_text,
)
from gateway.store import Store

log = logging.getLogger("gateway.ledger")


async def _migrate(args: argparse.Namespace, settings: Settings, store: Store | None) -> None:
    from gateway.ledger import db

    async with db.connection(postgres_url(args, settings)) as conn:
        applied = await db.migrate(conn)
        version = await db.schema_version(conn)
    emit(args, {"applied": applied, "version": version},
         f"applied migrations {', '.join(map(str, applied))}; schema version {version}"
         if applied else f"the ledger schema is up to date (version {version})")


async def _checked_schema(url: str) -> None:
    from gateway.ledger import db
    from gateway.ledger.schema import MIGRATIONS

    async with db.connection(url) as conn:
        version = await db.schema_version(conn)
    if version < MIGRATIONS[-1].version:
        raise ConfigError(f"the ledger's schema is at version {version}, this gateway needs "
                          f"{MIGRATIONS[-1].version}: run `gateway ledger migrate` first")


async def _export(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    from gateway.ledger.exporter import Exporter
    from gateway.ledger.metrics import ExporterMetrics
    from gateway.store.ledger import LedgerStreams

    url = postgres_url(args, settings)
    await _checked_schema(url)
    metrics = ExporterMetrics()
    exporter = Exporter(LedgerStreams(store, consumer=args.consumer), url, metrics,
                        stream_cap=settings.ledger.max_stream_entries,
                        claim_idle_seconds=args.claim_after)
    if args.once:
        try:
            rows = await exporter.export_pending()
            lag = await exporter.observe_lag()
        finally:
            await exporter.close()
        emit(args, {"exported": rows, "duplicates": exporter.totals.duplicates,
                    "lag_entries": lag},
             f"exported {rows} rows ({exporter.totals.duplicates} already stored); "
             f"{lag} entries left in Redis")
        return
    stop = start_worker(args, metrics.registry)
    log.info("ledger export started (consumer %s, metrics on %s)", args.consumer,
             f"{args.metrics_host}:{args.metrics_port}" if args.metrics_port else "none")
    await exporter.run(stop, interval=args.interval, lag_interval=args.lag_interval)
    log.info("ledger export stopped: %d rows exported, %d already stored",
             exporter.totals.exported, exporter.totals.duplicates)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _side_json(side: Any) -> dict[str, Any]:
    return {"scope": side.scope, "account_id": side.account_id, "key_id": side.key_id,
            "redis_usd": usd_text(side.redis_micro), "ledger_usd": usd_text(side.ledger_micro),
            "difference_usd": usd_text(side.ledger_micro - side.redis_micro),
            "stored_rows": side.stored_rows, "waiting_rows": side.waiting_rows,
            "ok": not side.differs, "note": side.note}


async def _reconcile(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    from gateway.ledger import db
    from gateway.ledger.reconcile import reconcile
    from gateway.store.ledger import LedgerStreams

    accounts = None
    if args.account:
        accounts = [await resolve_account(store, args.account, create=False)]
    async with db.connection(postgres_url(args, settings)) as conn:
        reports = await reconcile(LedgerStreams(store), conn, accounts)
    sides = [s for r in reports for s in r.sides]
    bad = [s for s in sides if s.differs]
    lines = []
    for side in sides:
        who = (f"account {side.account_id}" if side.scope == "account"
               else f"  key {side.key_id}")
        verdict = ("ok" if not side.differs
                   else f"DIFFERS by {usd_text(side.ledger_micro - side.redis_micro)} USD")
        lines.append(f"{who}: ledger {usd_text(side.ledger_micro)} USD ({side.stored_rows} rows "
                     f"stored, {side.waiting_rows} waiting in Redis), Redis "
                     f"{usd_text(side.redis_micro)} USD: {verdict}"
                     + (f" ({side.note})" if side.note else ""))
    keys = sum(s.scope == "key" for s in sides)
    summary = (f"{_count(len(reports), 'account')}, {_count(keys, 'key')}: "
               + ("the ledger matches Redis" if not bad else _count(len(bad), "difference")))
    emit(args, {"ok": not bad, "accounts": len(reports),
                "differences": [_side_json(s) for s in bad],
                "sides": [_side_json(s) for s in sides]},
         "\n".join([*lines, summary]))
    return 1 if bad else 0


def add_ledger_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    ledger = sub.add_parser(
        "ledger", help="the durable spend ledger in PostgreSQL",
        description="One row per settled request in PostgreSQL: apply its schema, export "
                    "the Redis streams into it, reconcile it with the Redis counters.")
    actions = ledger.add_subparsers(dest="command", required=True, metavar="ACTION")
    migrate = action(actions, "migrate", common, _migrate,
                     "create or upgrade the ledger's tables (safe to run again)",
                     "gateway ledger migrate --postgres postgresql://gw@db/ledger")
    migrate.set_defaults(no_redis=True)
    export = action(actions, "export", common, _export,
                    "copy every account's ledger stream into PostgreSQL, each entry once; "
                    "runs until stopped (SIGTERM), or once with --once",
                    "gateway ledger export --redis redis://127.0.0.1:6379/0 "
                    "--postgres postgresql://gw@db/ledger --metrics-port 9108")
    export.add_argument("--once", action="store_true",
                        help="export what is waiting now, print the counts and exit")
    export.add_argument("--metrics-port", type=port_arg, default=9108, metavar="PORT",
                        help="serve Prometheus metrics here (0: none; default 9108)")
    export.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="the metrics listener's address (default 127.0.0.1)")
    export.add_argument("--interval", type=seconds_arg, default=0.5, metavar="SECONDS",
                        help="pause between passes when nothing is waiting (default 0.5)")
    export.add_argument("--lag-interval", type=seconds_arg, default=5.0, metavar="SECONDS",
                        help="how often the lag gauges are measured: one script per account "
                             "(default 5)")
    export.add_argument("--consumer", type=name_arg,
                        default=os.environ.get("HOSTNAME") or socket.gethostname(),
                        help="this exporter's name in the consumer group (default: host name)")
    export.add_argument("--claim-after", type=seconds_arg, default=60.0, metavar="SECONDS",
                        help="take over entries another exporter left unacknowledged this "
                             "long (default 60)")
    rec = action(actions, "reconcile", common, _reconcile,
                 "compare the ledger with Redis's lifetime spend per key and account; print "
                 "every difference, exit 1 on any",
                 "gateway ledger reconcile --account acme")
    rec.add_argument("--account", metavar="ID_OR_NAME", help="one account (default: all)")
    for parser in (migrate, export, rec):
        postgres_option(parser)
