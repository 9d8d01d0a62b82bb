"""What every `gateway` command shares: its parser class, the common options, the output."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from gateway.config.ledger import check_postgres_url
from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.store import Store

if TYPE_CHECKING:  # prometheus_client only where a worker serves metrics
    from prometheus_client import CollectorRegistry

# A command: None or its exit status. `no_redis` in its defaults: run without a Store
# (the ledger's database only), then given None.
Run = Callable[[argparse.Namespace, Settings, Store], Awaitable[int | None]]


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Examples in the epilog keep their lines.
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # One line, like every other error of the command; --help has the rest.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_options(target: argparse.ArgumentParser, default: Any) -> None:
    """--redis, --config and --json. They work before the command and after it (`gateway
    --redis URL keys list` and `gateway keys list --redis URL`): after it they default to
    SUPPRESS, so an absent one leaves what was given before the command."""
    target.add_argument("--redis", metavar="URL", default=default,
                        help="Redis URL, e.g. redis://127.0.0.1:6379/0 (env GATEWAY_REDIS_URL; "
                             "README 'Scaling out' lists every form)")
    target.add_argument("--config", metavar="FILE", default=default,
                        help="TOML settings (env GATEWAY_CONFIG)")
    target.add_argument("--json", action="store_true",
                        default=default if default is argparse.SUPPRESS else False,
                        help="print one JSON document instead of text")


def common_parent() -> Parser:
    parent = Parser(add_help=False)
    common_options(parent, argparse.SUPPRESS)
    return parent


def action(actions: Any, name: str, parent: argparse.ArgumentParser, run: Run,
           summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line help, a description and an example."""
    parser: argparse.ArgumentParser = actions.add_parser(
        name, parents=[parent], help=summary, description=summary,
        epilog=f"example:\n  {example}")
    parser.set_defaults(run=run)
    return parser


def emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        print(text)


def postgres_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="the ledger's PostgreSQL URL, e.g. postgresql://gw@db/ledger "
                             "(env GATEWAY_POSTGRES_URL, or [ledger] postgres_url)")


def postgres_url(args: argparse.Namespace, settings: Settings) -> str:
    """--postgres, else the configuration's; a ConfigError naming the three ways when none."""
    given = getattr(args, "postgres", None)
    if given is not None and not given.strip():
        raise ConfigError("--postgres is empty: give the ledger database's URL")
    url = given or settings.ledger.postgres_url
    if not url:
        raise ConfigError("no ledger database configured: pass --postgres URL or set "
                          "GATEWAY_POSTGRES_URL (or [ledger] postgres_url in the config)")
    return check_postgres_url(str(url))


def usd_text(micro: int) -> str:
    """Integer micro-USD as an exact decimal string with 6 decimals: 12345678 -> '12.345678'."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def seconds_arg(text: str) -> float:
    """An argparse type: seconds above 0, at most a day (intervals, claim times)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or value > 86400:
        raise argparse.ArgumentTypeError(f"expected seconds above 0 (at most a day), got "
                                         f"{text[:40]!r}")
    return value


def port_arg(text: str) -> int:
    """An argparse type: a port, 0 for none."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535 (0: none), got {text[:40]!r}")
    return int(text)


def name_arg(text: str) -> str:
    """An argparse type: a consumer name, printable, 1 to 200 characters."""
    if not text.strip() or len(text) > 200 or not text.isprintable():
        raise argparse.ArgumentTypeError("expected a printable name of 1 to 200 characters")
    return text


def start_worker(args: argparse.Namespace, registry: CollectorRegistry) -> asyncio.Event:
    """What a long-running worker command (`ledger export`, `alerts send`) sets up: its
    metrics on --metrics-host/--metrics-port (0: none), logging, and the event SIGTERM and
    SIGINT set to stop it."""
    if args.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(args.metrics_port, addr=args.metrics_host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {args.metrics_host}:"
                              f"{args.metrics_port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return stop
