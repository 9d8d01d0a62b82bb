"""`gateway accounts ...`, `gateway mgmt-keys ...` and `gateway plans`."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.config.settings import Settings
from gateway.config.units import usd_to_micro_signed
from gateway.config.windows import NO_WINDOWS, windows_field
from gateway.core.keys import hash_secret, new_management_secret
from gateway.errors import ConfigError
from gateway.http.admin import (
    account_json,
    account_limits,
    credit_json,
    mgmt_json,
    resolve_account,
)
from gateway.http.management_body import MAX_REASON_LENGTH
from gateway.obs.logs import escape_control
from gateway.serve.cli_common import action, emit
from gateway.store import Store


def _account_line(doc: dict[str, Any]) -> str:
    limits = "  ".join(f"{field} {value}" for field, value in doc["limits"].items()
                       if value is not None and field != "budget_windows")
    if doc["limits"]["budget_windows"]:
        limits += "  budgets " + ", ".join(doc["limits"]["budget_windows"])
    return (f"{doc['id']}  {escape_control(doc['name'])}  credits ${doc['credits']:.6f}"
            + (f"  limits: {limits}" if limits else ""))


def _limits_given(args: argparse.Namespace) -> dict[str, str]:
    given = {"rpm": args.rpm, "tpm": args.tpm, "max_concurrent": args.max_concurrent}
    return {field: value for field, value in given.items() if value is not None}


def _checked_limits(args: argparse.Namespace) -> dict[str, int | str | None]:
    limits: dict[str, int | str | None] = dict(account_limits(_limits_given(args)))
    windows = windows_field(args.budget_window, "")
    if windows is not None:
        limits["windows"] = "" if windows == NO_WINDOWS else windows
    return limits


async def _create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    limits = _checked_limits(args)  # checked before anything is made
    account = await store.create_account(args.name)
    if limits:
        account = await store.set_account_limits(account.id, limits)
    doc = account_json(account)
    emit(args, doc, _account_line(doc))


async def _update(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    limits = _checked_limits(args)
    if not limits:
        raise ConfigError("nothing to change: give at least one of --rpm, --tpm, "
                          "--max-concurrent, --budget-window")
    account_id = await resolve_account(store, args.account, create=False)
    doc = account_json(await store.set_account_limits(account_id, limits))
    emit(args, doc, _account_line(doc))


def _limit_options(parser: argparse.ArgumentParser, clear: bool) -> None:
    suffix = "|none" if clear else ""
    tail = ", or none to remove it" if clear else ""
    parser.add_argument("--rpm", metavar=f"N{suffix}",
                        help=f"requests per minute for all the account's keys together{tail}")
    parser.add_argument("--tpm", metavar=f"N{suffix}",
                        help=f"tokens per minute for all the account's keys together{tail}")
    parser.add_argument("--max-concurrent", metavar=f"N{suffix}",
                        help=f"requests of all the account's keys in flight at once{tail}")
    parser.add_argument("--budget-window", action="append", metavar=f"USD/DURATION{suffix}",
                        help="a budget window for all the account's keys together, e.g. "
                             "100/30d or 100/30d/calendar (repeatable; replaces the "
                             f"account's){tail}")


async def _add_credits(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    micro = usd_to_micro_signed(args.usd, "USD")
    if micro == 0:
        raise ConfigError("the amount of credits must not be zero")
    reason = checked_reason(args.reason)
    account_id = await resolve_account(store, args.account, create=False)
    doc = account_json(await store.add_credits(account_id, micro, reason, "cli"))
    emit(args, doc, _account_line(doc))


def checked_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if len(text) > MAX_REASON_LENGTH:
        raise ConfigError(f"the reason must be at most {MAX_REASON_LENGTH} characters")
    return text


async def _list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    docs = [account_json(a) for a in await store.list_accounts()]
    emit(args, docs, "\n".join(_account_line(d) for d in docs) or "no accounts")


async def _show(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    account_id = await resolve_account(store, args.account, create=False)
    doc = account_json(await store.get_account(account_id))
    doc["credit_history"] = [credit_json(e) for e in await store.credit_log(account_id)]
    lines = [_account_line(doc)] + [
        f"  {e['at']}  {e['usd']:+.6f}  -> {e['balance']:.6f}  by {e['by']}  "
        f"{escape_control(e['reason'])}" for e in doc["credit_history"]]
    emit(args, doc, "\n".join(lines))


async def _mgmt_create(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    secret = new_management_secret()
    account_id = await resolve_account(store, args.account, create=False)
    key = await store.create_mgmt_key(account_id, hash_secret(secret))
    doc = {**mgmt_json(key), "key": secret}
    emit(args, doc, f"{key.id}  account {key.account_id}\n"
                    f"  key: {secret}   (shown once: store it now)")


async def _mgmt_list(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    accounts = ([await resolve_account(store, args.account, create=False)] if args.account
                else [a.id for a in await store.list_accounts()])
    docs = [mgmt_json(k) for a in accounts for k in await store.list_mgmt_keys(a)]
    emit(args, docs, "\n".join(f"{d['id']}  account {d['account_id']}  created "
                               f"{d['created_at']}" for d in docs) or "no management keys")


async def _mgmt_revoke(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    doc = {**mgmt_json(await store.revoke_mgmt_key(args.mgmt_key_id)), "revoked": True}
    emit(args, doc, f"{doc['id']}  revoked")


async def plans(args: argparse.Namespace, settings: Settings, store: Store | None) -> None:
    docs = [{"slug": p.slug, "name": p.name, "priceUsdc": p.price_usdc,
             "rateLimits": {"tpm_limit": p.tpm, "rpm_limit": p.rpm}}
            for p in settings.plans.values()]
    emit(args, docs, "\n".join(f"{p.slug:<10} {p.name:<12} ${p.price_usdc:<6} "
                               f"{p.rpm} rpm  {p.tpm} tpm" for p in settings.plans.values()))


def add_account_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    accounts = sub.add_parser("accounts", help="manage accounts and their prepaid credits",
                              description="Accounts hold keys and prepaid credits.")
    actions = accounts.add_subparsers(dest="command", required=True, metavar="ACTION")
    create = action(actions, "create", common, _create, "create an account",
                    "gateway accounts create --name acme")
    create.add_argument("--name", required=True, help="a unique name")
    _limit_options(create, clear=False)
    update = action(actions, "update", common, _update,
                    "set or remove the account's own limits, shared by all its keys",
                    "gateway accounts update acme --rpm 600 --max-concurrent 16")
    update.add_argument("account", metavar="ACCOUNT", help="the account's id or name")
    _limit_options(update, clear=True)
    credits = action(actions, "add-credits", common, _add_credits,
                     "add prepaid credits to an account (negative to take some away), with "
                     "the reason recorded",
                     "gateway accounts add-credits acme 25 --reason 'invoice 2026-11'")
    credits.add_argument("account", metavar="ACCOUNT", help="the account's id or name")
    credits.add_argument("usd", metavar="USD", help="the amount, e.g. 25 or -2.50")
    credits.add_argument("--reason", help="why (kept with the account's credit history)")
    action(actions, "list", common, _list, "list accounts and their balances",
           "gateway accounts list --json")
    show = action(actions, "show", common, _show,
                  "show an account, its balance and its recent credit adjustments",
                  "gateway accounts show acme")
    show.add_argument("account", metavar="ACCOUNT", help="the account's id or name")

    mgmt = sub.add_parser("mgmt-keys", help="manage management keys (mk_...) for /api/*",
                          description="Management keys let a customer read usage and manage "
                                      "its own credit keys over /api/*.")
    mgmt_actions = mgmt.add_subparsers(dest="command", required=True, metavar="ACTION")
    created = action(mgmt_actions, "create", common, _mgmt_create,
                     "create a management key for an account (secret shown once)",
                     "gateway mgmt-keys create --account acme")
    created.add_argument("--account", required=True, metavar="ID|NAME",
                         help="the account (id or name)")
    listing = action(mgmt_actions, "list", common, _mgmt_list, "list management keys",
                     "gateway mgmt-keys list --account acme")
    listing.add_argument("--account", metavar="ID|NAME", help="only this account's keys")
    revoke = action(mgmt_actions, "revoke", common, _mgmt_revoke,
                    "revoke a management key (it stops working at once)",
                    "gateway mgmt-keys revoke MGMT_KEY_ID")
    revoke.add_argument("mgmt_key_id", metavar="MGMT_KEY_ID")

    listed = sub.add_parser("plans", parents=[common], help="list the configured plans",
                            description="The plans of the configuration (as GET /api/plans).",
                            epilog="example:\n  gateway plans --config gateway.toml")
    listed.set_defaults(run=plans)
