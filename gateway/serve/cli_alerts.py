"""`gateway alerts send`: deliver the alert outboxes to the configured webhooks."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.serve.cli_common import action, emit, name_arg, port_arg, seconds_arg, start_worker
from gateway.store import Store

log = logging.getLogger("gateway.alerts")


async def _send(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    from gateway.alerts.lifespan import consumer_name
    from gateway.alerts.metrics import AlertMetrics
    from gateway.alerts.outbox import Outbox
    from gateway.alerts.sender import AlertSender, SenderOptions

    if not settings.alerts.enabled:
        raise ConfigError("no webhook configured: add [[alerts.webhooks]] (url, secret) to "
                          "the config file (--config or GATEWAY_CONFIG)")
    metrics = AlertMetrics()
    sender = AlertSender(Outbox(store, args.consumer or consumer_name("send", per_process=False)),
                         settings.alerts, metrics,
                         SenderOptions(claim_idle_seconds=args.claim_after))
    if args.once:
        try:
            await sender.run_once()
            waiting = await sender.observe_lag()
        finally:
            await sender.close()
        t = sender.totals
        emit(args, {"delivered": t.delivered, "failed": t.failed, "given_up": t.given_up,
                    "done": t.done, "expiring_created": t.expiring, "retrying": sender.pending,
                    "waiting": waiting},
             f"{t.done} events done ({t.delivered} webhook calls delivered, {t.failed} "
             f"failed, {t.given_up} events given up); {sender.pending} to retry; "
             f"{waiting} events waiting in Redis")
        return
    stop = start_worker(args, metrics.registry)
    # The webhooks by origin only: a path or query may carry the credential (Slack's do).
    log.info("alert sender started: %d webhook(s) (%s), consumer %s",
             len(settings.alerts.webhooks),
             ", ".join(hook.shown for hook in settings.alerts.webhooks), sender.outbox.consumer)
    try:
        await sender.run(stop, interval=args.interval)
    finally:
        await sender.close()
    t = sender.totals
    log.info("alert sender stopped: %d events done, %d given up", t.done, t.given_up)


def add_alert_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    alerts = sub.add_parser(
        "alerts", help="webhook alerts: budget thresholds, low credits, expiring keys",
        description="Deliver the alert events the gateway's scripts write ([alerts] and "
                    "[[alerts.webhooks]] in the config) to the webhooks, signed, with "
                    "retries. `gateway serve` runs a sender too (unless [alerts] sender = "
                    "\"none\"); this one runs apart.")
    actions = alerts.add_subparsers(dest="command", required=True, metavar="ACTION")
    send = action(actions, "send", common, _send,
                  "deliver every account's alert events to the webhooks that want them, "
                  "with retries and backoff; runs until stopped (SIGTERM), or once with --once",
                  "gateway alerts send --redis redis://127.0.0.1:6379/0 "
                  "--config gateway.toml --metrics-port 9109")
    send.add_argument("--once", action="store_true",
                      help="one pass: write key.expiring, try each waiting event once, print "
                           "the counts and exit (failed events stay for the next run)")
    send.add_argument("--interval", type=seconds_arg, default=1.0, metavar="SECONDS",
                      help="pause between passes when nothing is due (default 1)")
    send.add_argument("--metrics-port", type=port_arg, default=9109, metavar="PORT",
                      help="serve Prometheus metrics here (0: none; default 9109)")
    send.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                      help="the metrics listener's address (default 127.0.0.1)")
    send.add_argument("--consumer", type=name_arg, default=None,
                      help="this sender's name in the consumer group (default: HOST-send)")
    send.add_argument("--claim-after", type=seconds_arg, default=120.0, metavar="SECONDS",
                      help="take over events another sender left unacknowledged this long "
                           "(default 120)")
