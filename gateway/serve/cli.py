"""The `gateway` command: a thin shell over the store, the admin helpers and uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence

from gateway.config.ledger import LedgerSettings
from gateway.config.levels import FORMATS, LEVELS
from gateway.config.limits import LIMITS_ENV
from gateway.config.settings import Settings
from gateway.config.view import effective_settings, flat_items
from gateway.errors import (
    ConfigError,
    LedgerUnavailable,
    LimitReached,
    NotFound,
    StoreUnavailable,
)
from gateway.obs.logs import logging_config
from gateway.obs.metrics import multiprocess_dir, serve_metrics
from gateway.serve.cli_accounts import add_account_commands, plans
from gateway.serve.cli_alerts import add_alert_commands
from gateway.serve.cli_common import Parser, action, common_options, common_parent, emit
from gateway.serve.cli_invoices import add_invoice_command
from gateway.serve.cli_keys import add_key_commands
from gateway.serve.cli_ledger import add_ledger_commands
from gateway.store import Store, connect
from gateway.store.urls import parse_redis_url
from gateway.upstream.client import UpstreamClient


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {text!r}")
    return int(text)


def _port_or_zero(text: str) -> int:
    return 0 if text == "0" else _port(text)


def _proxies(text: str) -> str:
    """--forwarded-allow-ips: addresses or networks (comma-separated) of the proxies whose
    X-Forwarded-For / -Proto the gateway believes, or '*' alone for any peer."""
    import ipaddress

    entries = [entry.strip() for entry in text.split(",")]
    if entries == ["*"]:
        return "*"
    for entry in entries:
        if entry == "*":
            raise argparse.ArgumentTypeError("'*' (any peer) stands alone")
        try:
            ipaddress.ip_network(entry)
        except ValueError as exc:
            reason = "has host bits set" if "host bits" in str(exc) else \
                "is not an IP address or network (e.g. 10.0.0.5, 10.0.0.0/8)"
            raise argparse.ArgumentTypeError(f"{entry!r} {reason}") from None
    return ",".join(entries)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    common = common_parent()
    parser = Parser(prog="gateway", epilog=_EXAMPLES,
                    description="Rate limits, budgets and prepaid credits, billed exactly, "
                                "in front of an OpenAI-compatible inference server.")
    common_options(parser, None)
    parser.add_argument("--version", action="version", version=f"gateway {_version()}")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", parents=[common], help="run the gateway as a reverse proxy (needs Redis)",
        description="Run the gateway in front of an OpenAI-compatible server.",
        epilog="example:\n  gateway serve --redis redis://127.0.0.1:6379/0 "
               "--upstream http://127.0.0.1:8000 --port 8080")
    serve.add_argument("--upstream", metavar="URL",
                       help="where to forward (env GATEWAY_UPSTREAM, [upstream] url)")
    serve.add_argument("--upstream-api-key", metavar="KEY",
                       help="sent upstream instead of the client's key (env "
                            "GATEWAY_UPSTREAM_API_KEY, [upstream] api_key)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on "
                       "(default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    serve.add_argument("--forwarded-allow-ips", type=_proxies, metavar="ADDRESSES",
                       help="behind a reverse proxy: the proxies (addresses or networks, "
                            "comma-separated) whose X-Forwarded-For and X-Forwarded-Proto "
                            "name the client (its address for the dashboard's sign-in "
                            "limit, https for Secure cookies); default: none, every "
                            "X-Forwarded-* header ignored")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the port (default 1; about one per core)")
    serve.add_argument("--metrics-host", metavar="HOST",
                       help="where /metrics is served apart from clients; default 127.0.0.1 "
                            "(env GATEWAY_METRICS_HOST)")
    serve.add_argument("--metrics-port", type=_port_or_zero, metavar="PORT",
                       help="default 9464, 0 for none (env GATEWAY_METRICS_PORT)")
    serve.add_argument("--log-level", choices=LEVELS,
                       help="default info (env GATEWAY_LOG_LEVEL)")
    serve.add_argument("--log-format", choices=FORMATS,
                       help="one JSON object per line, or key=value text; default json "
                            "(env GATEWAY_LOG_FORMAT)")

    demo = sub.add_parser(
        "demo", parents=[common],
        help="try it: embedded store + mock upstream + demo keys (no Redis needed)",
        description="Everything in one process: an embedded store, a mock upstream and "
                    "demo keys with tiny limits; prints the keys and a guided tour.",
        epilog="example:\n  gateway demo --port 8080")
    demo.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8080, help="port (default 8080)")

    add_account_commands(sub, common)
    add_key_commands(sub, common)
    add_invoice_command(sub, common)
    add_ledger_commands(sub, common)
    add_alert_commands(sub, common)

    config = sub.add_parser("config", help="check the configuration",
                            description="Check the configuration.")
    config_actions = config.add_subparsers(dest="command", required=True, metavar="ACTION")
    action(config_actions, "check", common, _config_check,
           "validate the config file and environment, print the effective settings "
           "(secrets masked)", "gateway config check --config gateway.toml")
    return parser


_EXAMPLES = """examples:
  gateway demo                                   try it, no Redis needed
  gateway --redis redis://127.0.0.1:6379/0 accounts create --name acme
  gateway --redis redis://127.0.0.1:6379/0 keys create --account acme --name prod --plan pro
  gateway serve --redis redis://127.0.0.1:6379/0 --upstream http://127.0.0.1:8000
  gateway config check --config gateway.toml
  gateway alerts send --redis redis://127.0.0.1:6379/0 --config gateway.toml

every option before the command (--redis, --config, --json) also works after it."""


async def _config_check(args: argparse.Namespace, settings: Settings,
                        store: Store | None) -> None:
    # What `serve` would refuse at start-up is refused here too (neither is contacted).
    if settings.redis_url:
        parse_redis_url(settings.redis_url)
    if settings.upstream_url:
        try:
            UpstreamClient(settings.upstream_url)
        except ValueError as exc:
            raise ConfigError(f"upstream.url: {exc}") from None
    doc = effective_settings(settings)
    emit(args, doc, "configuration is valid; effective settings:\n"
                    + "\n".join(f"  {k} = {v}" for k, v in flat_items(doc)))


def _fail(message: str) -> int:
    print(f"gateway: error: {message}", file=sys.stderr)
    return 1


async def _run_with_store(args: argparse.Namespace, settings: Settings) -> int | None:
    if not settings.redis_url:
        raise ConfigError("no Redis configured: pass --redis URL or set GATEWAY_REDIS_URL "
                          "(the embedded store lives only inside `gateway demo`)")
    store = connect(settings.redis_url, max(settings.redis_timeout_seconds, 2.0))
    if settings.alerts.enabled:  # a key deactivated here writes its key.deactivated event
        from gateway.alerts.outbox import enable_alerts

        enable_alerts(store, settings.alerts)
    try:
        status: int | None = await args.run(args, settings, store)
        return status
    finally:
        await store.close()


# uvicorn's httptools protocol, writing head and body of a response in one system call.
SERVER_PROTOCOL = "gateway.serve.server_protocol:CoalescingHttpToolsProtocol"


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    if not settings.redis_url:
        raise ConfigError("gateway serve needs a Redis: pass --redis URL or set "
                          "GATEWAY_REDIS_URL (or try `gateway demo`, which needs none)")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    upstream = args.upstream or settings.upstream_url
    if not upstream:
        raise ConfigError("gateway serve needs an upstream: pass --upstream URL, set "
                          "GATEWAY_UPSTREAM or [upstream] url")
    try:
        UpstreamClient(upstream)
    except ValueError as exc:
        raise ConfigError(f"--upstream: {exc}") from None
    # uvicorn's workers are started from an import string, so what the command line says
    # reaches their Settings.load() as the GATEWAY_* variables it reads anyway.
    os.environ["GATEWAY_UPSTREAM"] = upstream
    os.environ["GATEWAY_REDIS_URL"] = settings.redis_url
    if args.config:
        os.environ["GATEWAY_CONFIG"] = args.config
    if args.upstream_api_key:
        os.environ["GATEWAY_UPSTREAM_API_KEY"] = args.upstream_api_key
    level = args.log_level or settings.log_level
    fmt = args.log_format or settings.log_format
    os.environ["GATEWAY_LOG_LEVEL"], os.environ["GATEWAY_LOG_FORMAT"] = level, fmt
    os.environ[LIMITS_ENV] = settings.server_limits.encode()
    _raise_fd_limit()
    # Before uvicorn spawns workers: they inherit PROMETHEUS_MULTIPROC_DIR from here.
    with multiprocess_dir(args.workers):
        port = settings.metrics_port if args.metrics_port is None else args.metrics_port
        if port:
            serve_metrics(args.metrics_host or settings.metrics_host, port)
        uvicorn.run("gateway.serve.serving:create_app", factory=True, host=args.host,
                    port=args.port,
                    workers=args.workers, log_config=logging_config(level, fmt),
                    log_level=level, access_log=False,
                    timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
                    timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
                    http=SERVER_PROTOCOL, loop="uvloop",
                    proxy_headers=args.forwarded_allow_ips is not None,
                    forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def _raise_fd_limit() -> None:
    """Open files up to the hard limit: each client connection is one, as is each upstream
    and Redis connection (README "Sizing")."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from gateway.demo.app import DemoApp

    if args.redis:
        raise ConfigError("gateway demo always runs on the embedded store; for Redis use "
                          "`gateway serve --redis URL`")
    # The embedded store lives in this process: no exporter could read a ledger from it.
    settings = dataclasses.replace(settings, ledger=LedgerSettings())
    # Every request is logged, as text: the demo is watched in a terminal. No proxy is in
    # front of it: an X-Forwarded-* header is a client's claim (uvicorn would believe one
    # from loopback, and so hand out sign-in attempts per claimed address).
    uvicorn.run(DemoApp(args.host, args.port, settings), host=args.host, port=args.port,
                log_config=logging_config("info", "text"), http=SERVER_PROTOCOL, loop="uvloop",
                proxy_headers=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(args.config, redis_url=args.redis)
        if args.group == "demo":  # the config's plans, prices and limits; never its Redis
            return _demo(args, settings)
        if args.group == "serve":
            return _serve(args, settings)
        # A command's run may return its exit status (reconcile: 1 on any difference).
        if args.run in (plans, _config_check) or getattr(args, "no_redis", False):
            status = asyncio.run(args.run(args, settings, None))
        else:
            status = asyncio.run(_run_with_store(args, settings))
    except (ConfigError, NotFound, LimitReached) as exc:
        return _fail(str(exc))
    except LedgerUnavailable as exc:  # its message never holds the URL
        return _fail(f"cannot use the ledger's database ({exc})")
    except StoreUnavailable as exc:
        hint = ""
        if (settings.redis_url or "").lower().startswith("rediss"):
            hint = ("; for TLS check ssl_ca_certs, and ssl_certfile/ssl_keyfile if the "
                    "server wants client certificates")
        return _fail(f"cannot reach Redis at the configured URL ({exc}){hint}")
    except KeyboardInterrupt:
        return 130
    return int(status or 0)
