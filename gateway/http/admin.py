"""Account and key administration shared by the CLI, the demo and the management API."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.plans import check_concurrency, parse_models
from gateway.config.settings import Settings
from gateway.config.units import (
    check_rate,
    format_duration,
    micro_to_usd,
    parse_duration,
    usd_to_micro,
    whole_number,
)
from gateway.config.windows import decode_windows, windows_field
from gateway.core.keys import hash_secret, new_consumption_secret
from gateway.core.timefmt import iso_from_us, parse_iso_to_us
from gateway.errors import ConfigError, NotFound
from gateway.store import Account, CreditEntry, KeyRecord, MgmtKey, Store

DEFAULT_ACCOUNT = "default"


@dataclass(frozen=True, slots=True)
class KeySpec:
    name: str
    plan: str | None = None
    credit: bool = False
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: str | None = None
    budget_duration: str = "30d"
    expires_at: str | None = None
    expires_in: str | None = None
    models: str | None = None  # the key's own allowed models, "a,qwen*"; None: its plan's
    max_concurrent: int | None = None  # the key's own in-flight limit; None: its plan's
    budget_windows: list[str] | None = None  # "5/1d", "100/30d/calendar"; None: its plan's


MAX_NAME_LENGTH = 200


def check_key_name(name: str) -> str:
    """A key's label, as an account's: printable, so no terminal escape reaches `gateway
    keys list` and no bidirectional override makes one name look like another."""
    if not name.strip():
        raise ConfigError("name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"name must be at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise ConfigError("name must be printable (no control or formatting characters)")
    return name


async def resolve_account(store: Store, account: str | None, create: bool = True) -> str:
    """The id of the account named by `account` (its id or its name), or of the account
    'default' when None (made when missing and `create`)."""
    if account:
        with contextlib.suppress(NotFound):
            return (await store.get_account(account)).id
        found = await store.account_by_name(account)
        if found is None:
            raise NotFound(f"no account with id or name {account[:80]!r}")
        return found.id
    existing = await store.account_by_name(DEFAULT_ACCOUNT)
    if existing is not None:
        return existing.id
    if not create:
        raise NotFound(f"no account named {DEFAULT_ACCOUNT!r}")
    try:
        return (await store.create_account(DEFAULT_ACCOUNT)).id
    except ConfigError:  # created concurrently by another process
        found = await store.account_by_name(DEFAULT_ACCOUNT)
        if found is None:
            raise
        return found.id


async def create_key(store: Store, settings: Settings, account_id: str,
                     spec: KeySpec) -> tuple[KeyRecord, str]:
    check_key_name(spec.name)
    if spec.credit == (spec.plan is not None):
        raise ConfigError("choose exactly one of a plan (--plan SLUG) or --credit")
    if spec.plan is not None:
        plan = settings.plans.get(spec.plan)
        if plan is None:
            known = ", ".join(sorted(settings.plans))
            raise ConfigError(f"unknown plan {spec.plan!r} (known plans: {known})")
        slug, key_type = plan.slug, "subscription"
    else:
        slug, key_type = "", "credit"
    # Limits not given are not copied: the key follows its plan's ([credit]'s) as they are
    # configured at each admission.
    rpm = None if spec.rpm is None else check_rate(spec.rpm, "rpm")
    tpm = None if spec.tpm is None else check_rate(spec.tpm, "tpm")
    budget = None if spec.budget_usd is None else usd_to_micro(spec.budget_usd, "budget")
    duration = parse_duration(spec.budget_duration)
    if spec.expires_at is not None and spec.expires_in is not None:
        raise ConfigError("give --expires-at or --expires-in, not both")
    expires_at = None
    if spec.expires_at is not None:
        try:
            expires_at = parse_iso_to_us(spec.expires_at)
        except ValueError:
            raise ConfigError(f"invalid expires_at {spec.expires_at!r}: use ISO 8601") from None
    expires_in = None if spec.expires_in is None else parse_duration(spec.expires_in)
    if key_type == "credit" and (expires_at is not None or expires_in is not None):
        raise ConfigError("credit keys do not expire; expiry applies to plan keys")
    if expires_at is not None and expires_at <= await store.now_us():  # Redis time
        raise ConfigError(f"expires_at {spec.expires_at!r} is in the past")
    models = None if spec.models is None else parse_models(spec.models)
    secret = new_consumption_secret()
    record = await store.create_key(
        account_id=account_id, name=spec.name, key_type=key_type, plan=slug, rpm=rpm, tpm=tpm,
        budget_limit=budget, budget_duration=duration, expires_at_us=expires_at,
        expires_in_seconds=expires_in, secret_hash=hash_secret(secret),
        max_keys=settings.max_keys_per_account, models=models,
        max_concurrent=(None if spec.max_concurrent is None else check_concurrency(
            spec.max_concurrent, "max_concurrent")),
        windows=windows_field(spec.budget_windows, ""))
    return record, secret


def key_json(record: KeyRecord, settings: Settings,
             secret: str | None = None) -> dict[str, Any]:
    rpm, tpm = settings.limits_for(record.plan, record.rpm, record.tpm)
    doc: dict[str, Any] = {"id": record.id}
    if secret is not None:
        doc["key"] = secret
    doc.update({
        "name": record.name,
        "type": record.key_type,
        "account_id": record.account_id,
        "plan": record.plan or None,
        "is_active": record.active,
        "rate_limits": {"rpm": rpm, "tpm": tpm},
        # The models it may ask for (names or "prefix*"); [] means any.
        "models": list(settings.models_for(record.plan, record.models)),
        # The key's own limits; null: it follows its plan's (or [credit]'s).
        # Requests it may have in flight at once; null: no limit.
        "max_concurrent": settings.concurrency_for(record.plan, record.max_concurrent),
        # Budget windows beyond `budget` (its own, else its plan's), as USD/DURATION[/calendar].
        "budget_windows": [w.text() for w in (
            decode_windows(record.windows) if record.windows is not None
            else settings.plans[record.plan].budgets if record.plan in settings.plans
            else ())],
        "overrides": {"rpm": record.rpm, "tpm": record.tpm,
                      "models": None if record.models is None else list(record.models),
                      "max_concurrent": record.max_concurrent,
                      "budget_windows": None if record.windows is None else [
                          w.text() for w in decode_windows(record.windows)]},
        "budget": {
            "limit": None if record.budget_limit is None else micro_to_usd(record.budget_limit),
            "duration": format_duration(record.budget_duration),
            "spent": micro_to_usd(record.spent),
            "resets_at": iso_from_us(record.resets_at_us),
        },
        "total_spent": micro_to_usd(record.total_spent),
        "expires_at": None if record.expires_at_us is None else iso_from_us(record.expires_at_us),
        "created_at": iso_from_us(record.created_at_us),
        "deleted_at": None if record.deleted_at_us is None else iso_from_us(record.deleted_at_us),
    })
    return doc


def account_json(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "credits": micro_to_usd(account.credits),
            # Shared by all the account's keys; null: none.
            "limits": {"rpm": account.rpm, "tpm": account.tpm,
                       "max_concurrent": account.max_concurrent,
                       "budget_windows": [w.text() for w in decode_windows(account.windows)]}}


ACCOUNT_LIMITS = ("rpm", "tpm", "max_concurrent")
NO_LIMIT_WORDS = ("none", "off")


def account_limits(values: Mapping[str, str | int | None]) -> dict[str, int | None]:
    """An account's limits from the CLI or the operator API: an integer, or None / 'none'
    to clear one; fields absent are left as they are."""
    out: dict[str, int | None] = {}
    for field in ACCOUNT_LIMITS:
        if field not in values:
            continue
        value = values[field]
        if value is None or (isinstance(value, str) and value.strip().lower() in NO_LIMIT_WORDS):
            out[field] = None
            continue
        try:
            number = (None if isinstance(value, bool) else value if isinstance(value, int)
                      else whole_number(str(value)))
        except ValueError:
            number = None
        if number is None:
            raise ConfigError(f"{field} must be a whole number, or none, got {str(value)[:40]!r}")
        out[field] = (check_concurrency(number, field) if field == "max_concurrent"
                      else check_rate(number, field))
    return out


def credit_json(entry: CreditEntry) -> dict[str, Any]:
    return {"at": iso_from_us(entry.at_us), "usd": micro_to_usd(entry.micro),
            "balance": micro_to_usd(entry.balance), "by": entry.by, "reason": entry.reason}


def mgmt_json(key: MgmtKey) -> dict[str, Any]:
    return {"id": key.id, "account_id": key.account_id,
            "created_at": iso_from_us(key.created_at_us)}
