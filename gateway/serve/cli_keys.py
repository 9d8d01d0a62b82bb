"""`gateway keys ...`: consumption keys, from creation to deletion."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config.settings import Settings
from gateway.http.admin import KeySpec, create_key, key_json, resolve_account
from gateway.http.key_changes import ChangeSpec, renew_key, rotate_key, update_key
from gateway.obs.logs import escape_control
from gateway.serve.cli_common import action, emit
from gateway.store import Store


def key_text(doc: dict[str, Any]) -> str:
    state = ("  [deleted]" if doc["deleted_at"] else
             "" if doc["is_active"] else "  [deactivated]")
    lines = [f"{doc['id']}  {escape_control(doc['name'])}  {doc['type']}"
             + (f" ({doc['plan']})" if doc["plan"] else "") + state]
    if "key" in doc:
        lines.append(f"  key: {doc['key']}   (shown once: store it now)")
    budget, limits, own = doc["budget"], doc["rate_limits"], doc["overrides"]
    limit = "unlimited" if budget["limit"] is None else f"${budget['limit']:.2f}"

    def rate(name: str) -> str:
        source = "own" if own[name] is not None else ("plan" if doc["plan"] else "[credit]")
        return f"{name} {limits[name]} ({source})"

    lines.append(f"  {rate('rpm')}, {rate('tpm')}, budget {limit} per {budget['duration']}, "
                 f"spent ${budget['spent']:.6f}, resets {budget['resets_at']}, "
                 f"total spent ${doc['total_spent']:.6f}")
    if doc["expires_at"]:
        lines.append(f"  expires {doc['expires_at']}")
    if doc["deleted_at"]:
        lines.append(f"  deleted {doc['deleted_at']}")
    return "\n".join(lines)


def _show(args: argparse.Namespace, settings: Settings, record: Any,
          secret: str | None = None) -> None:
    doc = key_json(record, settings, secret)
    emit(args, doc, key_text(doc))


async def _create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    account_id = await resolve_account(store, args.account)
    spec = KeySpec(name=args.name, plan=args.plan, credit=args.credit, rpm=args.rpm,
                   tpm=args.tpm, budget_usd=args.budget, budget_duration=args.budget_duration,
                   expires_at=args.expires_at, expires_in=args.expires_in, models=args.models,
                   max_concurrent=args.max_concurrent, budget_windows=args.budget_window)
    record, secret = await create_key(store, settings, account_id, spec)
    _show(args, settings, record, secret)


async def _list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    accounts = ([await resolve_account(store, args.account, create=False)] if args.account
                else [a.id for a in await store.list_accounts()])
    docs = [key_json(r, settings) for a in accounts for r in await store.list_keys(a)]
    emit(args, docs, "\n".join(key_text(d) for d in docs) or "no keys")


async def _get(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    _show(args, settings, await store.get_key(args.key_id))


async def _set_active(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    spec = ChangeSpec(active=args.command == "activate")
    _show(args, settings, await update_key(store, settings, args.key_id, spec))


async def _update(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    spec = ChangeSpec(name=args.name, plan=args.plan, rpm=args.rpm, tpm=args.tpm,
                      budget=args.budget, budget_duration=args.budget_duration,
                      expires_at=args.expires_at, expires_in=args.expires_in,
                      models=args.models, max_concurrent=args.max_concurrent,
                      budget_windows=args.budget_window)
    _show(args, settings, await update_key(store, settings, args.key_id, spec))


async def _renew(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    _show(args, settings, await renew_key(store, args.key_id, args.period))


async def _rotate(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    record, secret = await rotate_key(store, args.key_id)
    _show(args, settings, record, secret)


async def _delete(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    _show(args, settings, await store.delete_key(args.key_id))


def add_key_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    keys = sub.add_parser(
        "keys", help="manage consumption keys (sk_live_...)",
        description="Consumption keys: create, list, show, update, renew, rotate, "
                    "deactivate, activate, delete.")
    actions = keys.add_subparsers(dest="command", required=True, metavar="ACTION")
    create = action(actions, "create", common, _create,
                    "create a key on a plan or on the account's credits (secret shown once)",
                    "gateway keys create --account acme --name prod --plan pro --budget 50")
    create.add_argument("--account", metavar="ID|NAME",
                        help="the account (id or name); default: the account 'default'")
    create.add_argument("--name", required=True, help="a label for the key")
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--plan", metavar="SLUG", help="a subscription on this plan "
                      "(`gateway plans` lists them)")
    kind.add_argument("--credit", action="store_true",
                      help="a key paid from the account's prepaid credits")
    create.add_argument("--rpm", type=int, help="the key's own requests per minute "
                        "(default: follow the plan's, [credit] rpm for credit keys)")
    create.add_argument("--tpm", type=int, help="the key's own tokens per minute "
                        "(default: follow the plan's)")
    create.add_argument("--budget", metavar="USD", help="spend limit per budget period "
                        "(default: none)")
    create.add_argument("--models", metavar="A,B*",
                        help="the models the key may ask for (names or 'prefix*', comma-"
                             "separated; '*' any; default: follow the plan's)")
    create.add_argument("--max-concurrent", type=int, metavar="N",
                        help="requests the key may have in flight at once "
                             "(default: follow the plan's)")
    create.add_argument("--budget-window", action="append", metavar="USD/DURATION",
                        help="a budget window beyond --budget, e.g. 5/1d or 100/30d/calendar "
                             "(repeatable; default: follow the plan's budgets; none: none)")
    create.add_argument("--budget-duration", default="30d", metavar="DURATION",
                        help="budget period: a number with s, m, h or d (default 30d)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", metavar="ISO8601",
                        help="plan keys: when the subscription ends")
    expiry.add_argument("--expires-in", metavar="DURATION",
                        help="plan keys: how long the subscription runs (default 30d)")

    listing = action(actions, "list", common, _list, "list keys with their limits and spend",
                     "gateway keys list --account acme --json")
    listing.add_argument("--account", metavar="ID|NAME", help="only this account's keys")

    for name, run, summary in (
            ("show", _get, "show one key (never its secret)"),
            ("deactivate", _set_active, "stop a key working until it is activated again"),
            ("activate", _set_active, "let a deactivated key work again"),
            ("rotate", _rotate, "give a key a new secret (shown once); the old one stops "
                                "working at once"),
            ("delete", _delete, "delete a key: its secret stops working at once; its record "
                                "and usage history stay readable")):
        one = action(actions, name, common, run, summary, f"gateway keys {name} KEY_ID")
        one.add_argument("key_id", metavar="KEY_ID")

    update = action(actions, "update", common, _update,
                    "change a key's name, plan, limits, budget or expiry (acts at once on "
                    "every replica)",
                    "gateway keys update KEY_ID --rpm 120 --budget none --plan pro")
    update.add_argument("key_id", metavar="KEY_ID")
    update.add_argument("--name", help="a new label")
    update.add_argument("--plan", metavar="SLUG", help="move a plan key to another plan")
    update.add_argument("--rpm", metavar="N|plan",
                        help="the key's own requests per minute, or 'plan' to follow the plan's")
    update.add_argument("--tpm", metavar="N|plan",
                        help="the key's own tokens per minute, or 'plan' to follow the plan's")
    update.add_argument("--budget", metavar="USD|none", help="spend limit per period, or none")
    update.add_argument("--models", metavar="A,B*|plan",
                        help="the models the key may ask for (names or 'prefix*', comma-"
                             "separated; '*' any), or 'plan' to follow the plan's")
    update.add_argument("--max-concurrent", metavar="N|plan",
                        help="requests the key may have in flight at once, or 'plan' to "
                             "follow the plan's")
    update.add_argument("--budget-window", action="append", metavar="USD/DURATION|plan|none",
                        help="the key's budget windows beyond --budget, replacing its own "
                             "(repeatable: 5/1d, 100/30d/calendar); 'plan' to follow the "
                             "plan's budgets, 'none' for none")
    update.add_argument("--budget-duration", metavar="DURATION",
                        help="a new budget period; the period restarts now, spent carries on")
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", metavar="ISO8601", help="plan keys: a new end")
    expiry.add_argument("--expires-in", metavar="DURATION",
                        help="plan keys: a new end, this long from now")

    renew = action(actions, "renew", common, _renew,
                   "extend a subscription from its expiry or now, whichever is later",
                   "gateway keys renew KEY_ID --for 30d")
    renew.add_argument("key_id", metavar="KEY_ID")
    renew.add_argument("--for", dest="period", metavar="DURATION",
                       help="how much longer (default 30d)")
