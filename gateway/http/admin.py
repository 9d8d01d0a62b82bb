"""Account and key administration shared by the CLI, the demo and the management API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.settings import Settings
from gateway.config.units import (
    check_rate,
    format_duration,
    micro_to_usd,
    parse_duration,
    usd_to_micro,
)
from gateway.core.keys import hash_secret, new_consumption_secret
from gateway.core.timefmt import iso_from_us, parse_iso_to_us
from gateway.errors import ConfigError
from gateway.store import Account, KeyRecord, Store

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


async def account_or_default(store: Store, account_id: str | None) -> str:
    if account_id:
        return (await store.get_account(account_id)).id
    existing = await store.account_by_name(DEFAULT_ACCOUNT)
    if existing is not None:
        return existing.id
    try:
        return (await store.create_account(DEFAULT_ACCOUNT)).id
    except ConfigError:  # created concurrently by another process
        found = await store.account_by_name(DEFAULT_ACCOUNT)
        if found is None:
            raise
        return found.id


async def create_key(store: Store, settings: Settings, account_id: str,
                     spec: KeySpec) -> tuple[KeyRecord, str]:
    if not spec.name.strip():
        raise ConfigError("name must not be empty")
    if spec.credit == (spec.plan is not None):
        raise ConfigError("choose exactly one of a plan (--plan SLUG) or --credit")
    if spec.plan is not None:
        plan = settings.plans.get(spec.plan)
        if plan is None:
            known = ", ".join(sorted(settings.plans))
            raise ConfigError(f"unknown plan {spec.plan!r} (known plans: {known})")
        rpm, tpm, slug, key_type = plan.rpm, plan.tpm, plan.slug, "subscription"
    else:
        rpm, tpm, slug, key_type = settings.credit_rpm, settings.credit_tpm, "", "credit"
    rpm = check_rate(spec.rpm if spec.rpm is not None else rpm, "rpm")
    tpm = check_rate(spec.tpm if spec.tpm is not None else tpm, "tpm")
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
    secret = new_consumption_secret()
    record = await store.create_key(
        account_id=account_id, name=spec.name, key_type=key_type, plan=slug, rpm=rpm, tpm=tpm,
        budget_limit=budget, budget_duration=duration, expires_at_us=expires_at,
        expires_in_seconds=expires_in, secret_hash=hash_secret(secret),
        max_keys=settings.max_keys_per_account)
    return record, secret


def key_json(record: KeyRecord, secret: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": record.id}
    if secret is not None:
        doc["key"] = secret
    doc.update({
        "name": record.name,
        "type": record.key_type,
        "account_id": record.account_id,
        "plan": record.plan or None,
        "is_active": record.active,
        "rate_limits": {"rpm": record.rpm, "tpm": record.tpm},
        "budget": {
            "limit": None if record.budget_limit is None else micro_to_usd(record.budget_limit),
            "duration": format_duration(record.budget_duration),
            "spent": micro_to_usd(record.spent),
            "resets_at": iso_from_us(record.resets_at_us),
        },
        "expires_at": None if record.expires_at_us is None else iso_from_us(record.expires_at_us),
        "created_at": iso_from_us(record.created_at_us),
    })
    return doc


def account_json(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "credits": micro_to_usd(account.credits)}
