"""The `gateway` command: a thin shell over the store, the admin helpers and uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from gateway.config.levels import FORMATS, LEVELS
from gateway.config.limits import LIMITS_ENV
from gateway.config.settings import Settings
from gateway.config.units import usd_to_micro
from gateway.core.keys import hash_secret, new_management_secret
from gateway.core.timefmt import iso_from_us
from gateway.errors import ConfigError, LimitReached, NotFound, StoreUnavailable
from gateway.http.admin import KeySpec, account_json, account_or_default, create_key, key_json
from gateway.obs.logs import escape_control, logging_config
from gateway.obs.metrics import multiprocess_dir, serve_metrics
from gateway.store import MgmtKey, Store, connect
from gateway.upstream.client import UpstreamClient


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        print(text)


def _key_text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['id']}  {escape_control(doc['name'])}  {doc['type']}"
             + (f" ({doc['plan']})" if doc["plan"] else "")
             + ("" if doc["is_active"] else "  [deactivated]")]
    if "key" in doc:
        lines.append(f"  key: {doc['key']}   (shown once: store it now)")
    budget = doc["budget"]
    limit = "unlimited" if budget["limit"] is None else f"${budget['limit']:.2f}"
    lines.append(f"  rpm {doc['rate_limits']['rpm']}, tpm {doc['rate_limits']['tpm']}, "
                 f"budget {limit} per {budget['duration']}, spent ${budget['spent']:.6f}, "
                 f"resets {budget['resets_at']}")
    if doc["expires_at"]:
        lines.append(f"  expires {doc['expires_at']}")
    return "\n".join(lines)


async def _accounts_create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    doc = account_json(await store.create_account(args.name))
    _print(args, doc, f"{doc['id']}  {escape_control(doc['name'])}  "
                      f"credits ${doc['credits']:.2f}")


async def _accounts_add_credits(args: argparse.Namespace, settings: Settings,
                                store: Store) -> None:
    micro = usd_to_micro(args.usd, "USD")
    if micro <= 0:
        raise ConfigError("the amount of credits must be positive")
    doc = account_json(await store.add_credits(args.account_id, micro))
    _print(args, doc, f"{doc['id']}  {escape_control(doc['name'])}  "
                      f"credits ${doc['credits']:.6f}")


async def _accounts_list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    docs = [account_json(a) for a in await store.list_accounts()]
    _print(args, docs, "\n".join(f"{d['id']}  {escape_control(d['name'])}  "
                                 f"credits ${d['credits']:.6f}" for d in docs)
           or "no accounts")


async def _keys_create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    account_id = await account_or_default(store, args.account)
    spec = KeySpec(name=args.name, plan=args.plan, credit=args.credit, rpm=args.rpm,
                   tpm=args.tpm, budget_usd=args.budget, budget_duration=args.budget_duration,
                   expires_at=args.expires_at, expires_in=args.expires_in)
    record, secret = await create_key(store, settings, account_id, spec)
    doc = key_json(record, secret)
    _print(args, doc, _key_text(doc))


async def _keys_list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    accounts = [args.account] if args.account else [a.id for a in await store.list_accounts()]
    docs = [key_json(r) for a in accounts for r in await store.list_keys(a)]
    _print(args, docs, "\n".join(_key_text(d) for d in docs) or "no keys")


async def _keys_show(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    doc = key_json(await store.get_key(args.key_id))
    _print(args, doc, _key_text(doc))


async def _keys_set_active(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    doc = key_json(await store.set_active(args.key_id, args.command == "activate"))
    _print(args, doc, _key_text(doc))


def _mgmt_json(key: MgmtKey) -> dict[str, Any]:
    return {"id": key.id, "account_id": key.account_id,
            "created_at": iso_from_us(key.created_at_us)}


async def _mgmt_create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    secret = new_management_secret()
    key = await store.create_mgmt_key(args.account, hash_secret(secret))
    doc = {"id": key.id, "key": secret, "account_id": key.account_id}
    _print(args, doc, f"{key.id}  account {key.account_id}\n"
                      f"  key: {secret}   (shown once: store it now)")


async def _mgmt_list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    if args.account:
        await store.get_account(args.account)
    accounts = [args.account] if args.account else [a.id for a in await store.list_accounts()]
    docs = [_mgmt_json(k) for a in accounts for k in await store.list_mgmt_keys(a)]
    _print(args, docs, "\n".join(f"{d['id']}  account {d['account_id']}  created "
                                 f"{d['created_at']}" for d in docs) or "no management keys")


async def _mgmt_revoke(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    doc = {**_mgmt_json(await store.revoke_mgmt_key(args.mgmt_key_id)), "revoked": True}
    _print(args, doc, f"{doc['id']}  revoked")


async def _plans(args: argparse.Namespace, settings: Settings, store: Store | None) -> None:
    docs = [{"slug": p.slug, "name": p.name, "priceUsdc": p.price_usdc,
             "rateLimits": {"tpm_limit": p.tpm, "rpm_limit": p.rpm}}
            for p in settings.plans.values()]
    _print(args, docs, "\n".join(f"{p.slug:<10} {p.name:<12} ${p.price_usdc:<6} "
                                 f"{p.rpm} rpm  {p.tpm} tpm" for p in settings.plans.values()))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of the command; --help has the rest.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {text!r}")
    return int(text)


def _port_or_zero(text: str) -> int:
    return 0 if text == "0" else _port(text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    # The common options work before the command and after it (`gateway --redis URL keys
    # list` and `gateway keys list --redis URL`): after it they default to SUPPRESS, so an
    # absent one leaves what was given before the command.
    common = _Parser(add_help=False)
    parser = _Parser(prog="gateway", description=__doc__)
    for target, default in ((common, argparse.SUPPRESS), (parser, None)):
        target.add_argument("--redis", metavar="URL", default=default,
                            help="Redis URL (env GATEWAY_REDIS_URL)")
        target.add_argument("--config", metavar="FILE", default=default,
                            help="TOML settings (env GATEWAY_CONFIG)")
        target.add_argument("--json", action="store_true",
                            default=default if default is argparse.SUPPRESS else False,
                            help="print one JSON document")
    parser.add_argument("--version", action="version", version=f"gateway {_version()}")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the reverse proxy")
    serve.add_argument("--upstream", metavar="URL",
                       help="where to forward (env GATEWAY_UPSTREAM, [upstream] url)")
    serve.add_argument("--upstream-api-key", metavar="KEY",
                       help="sent upstream instead of the client's key (env "
                            "GATEWAY_UPSTREAM_API_KEY, [upstream] api_key)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument("--workers", type=int, default=1)
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

    demo = sub.add_parser("demo", parents=[common],
                          help="embedded store + mock upstream + demo keys (no Redis needed)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=_port, default=8080)

    accounts = sub.add_parser("accounts", help="manage accounts").add_subparsers(
        dest="command", required=True, metavar="ACTION")
    create = accounts.add_parser("create", parents=[common])
    create.add_argument("--name", required=True)
    create.set_defaults(run=_accounts_create)
    credits = accounts.add_parser("add-credits", parents=[common])
    credits.add_argument("account_id")
    credits.add_argument("usd")
    credits.set_defaults(run=_accounts_add_credits)
    accounts.add_parser("list", parents=[common]).set_defaults(run=_accounts_list)

    keys = sub.add_parser("keys", help="manage consumption keys").add_subparsers(
        dest="command", required=True, metavar="ACTION")
    create = keys.add_parser("create", parents=[common])
    create.add_argument("--account")
    create.add_argument("--name", required=True)
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--plan", metavar="SLUG")
    kind.add_argument("--credit", action="store_true")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--budget", metavar="USD")
    create.add_argument("--budget-duration", default="30d", metavar="DURATION")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", metavar="ISO8601")
    expiry.add_argument("--expires-in", metavar="DURATION")
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", parents=[common])
    listing.add_argument("--account")
    listing.set_defaults(run=_keys_list)
    for name, run in (("show", _keys_show), ("deactivate", _keys_set_active),
                      ("activate", _keys_set_active)):
        action = keys.add_parser(name, parents=[common])
        action.add_argument("key_id")
        action.set_defaults(run=run)

    mgmt = sub.add_parser("mgmt-keys", help="manage management keys (mk_) for /api/*")
    mgmt_actions = mgmt.add_subparsers(dest="command", required=True, metavar="ACTION")
    create = mgmt_actions.add_parser("create", parents=[common])
    create.add_argument("--account", required=True, metavar="ID")
    create.set_defaults(run=_mgmt_create)
    listing = mgmt_actions.add_parser("list", parents=[common])
    listing.add_argument("--account", metavar="ID")
    listing.set_defaults(run=_mgmt_list)
    revoke = mgmt_actions.add_parser("revoke", parents=[common])
    revoke.add_argument("mgmt_key_id", metavar="MGMT_KEY_ID")
    revoke.set_defaults(run=_mgmt_revoke)

    sub.add_parser("plans", parents=[common], help="list plans").set_defaults(run=_plans)
    return parser


def _fail(message: str) -> int:
    print(f"gateway: error: {message}", file=sys.stderr)
    return 1


async def _run_with_store(args: argparse.Namespace, settings: Settings) -> None:
    if not settings.redis_url:
        raise ConfigError("no Redis configured: pass --redis URL or set GATEWAY_REDIS_URL "
                          "(the embedded store lives only inside `gateway demo`)")
    store = connect(settings.redis_url, max(settings.redis_timeout_seconds, 2.0))
    try:
        await args.run(args, settings, store)
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
                    http=SERVER_PROTOCOL, loop="uvloop", proxy_headers=False)
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
    uvicorn.run(DemoApp(args.host, args.port, settings), host=args.host, port=args.port,
                log_level="warning", http=SERVER_PROTOCOL, loop="uvloop")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(args.config, redis_url=args.redis)
        if args.group == "demo":  # the config's plans, prices and limits; never its Redis
            return _demo(args, settings)
        if args.group == "serve":
            return _serve(args, settings)
        if args.run is _plans:
            asyncio.run(_plans(args, settings, None))
        else:
            asyncio.run(_run_with_store(args, settings))
    except (ConfigError, NotFound, LimitReached) as exc:
        return _fail(str(exc))
    except StoreUnavailable as exc:
        hint = ""
        if (settings.redis_url or "").lower().startswith("rediss"):
            hint = ("; for TLS check ssl_ca_certs, and ssl_certfile/ssl_keyfile if the "
                    "server wants client certificates")
        return _fail(f"cannot reach Redis at the configured URL ({exc}){hint}")
    except KeyboardInterrupt:
        return 130
    return 0
