"""Key changes as the CLI and the operator API state them (text, like command-line options),
checked and turned into the store's KeyChange. Every mistake is a ConfigError naming the
option."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.plans import check_concurrency, parse_models
from gateway.config.settings import Settings
from gateway.config.units import check_rate, parse_duration, usd_to_micro, whole_number
from gateway.config.windows import windows_field
from gateway.core.keys import hash_secret, new_consumption_secret
from gateway.core.timefmt import parse_iso_to_us
from gateway.errors import ConfigError, NotFound
from gateway.http.admin import check_key_name
from gateway.store import SUBSCRIPTION_DEFAULT_SECONDS, KeyRecord, Store
from gateway.store.lifecycle import FOLLOW_PLAN, KeyChange

# `--rpm plan`: the key's own limit goes, it follows its plan's ([credit]'s for credit keys)
FOLLOW_WORDS = ("plan", "default")
MAX_BUDGET_MICRO = 10**15  # one billion USD: stays exact as a Lua (double) number


@dataclass(frozen=True, slots=True)
class ChangeSpec:
    name: str | None = None
    plan: str | None = None
    rpm: str | None = None  # a number, or "plan"
    tpm: str | None = None
    budget: str | None = None  # USD, or "none"
    budget_duration: str | None = None
    expires_at: str | None = None
    expires_in: str | None = None
    active: bool | None = None
    models: str | None = None  # "a,qwen*", or "plan"
    max_concurrent: str | None = None  # "8", or "plan"
    budget_windows: list[str] | None = None  # ["5/1d", "100/30d/calendar"], ["plan"], ["none"]


def _models(text: str | None) -> str | None:
    """The key's own models (names or 'prefix*', comma-separated; '*' any), or FOLLOW_PLAN."""
    if text is None:
        return None
    if text.strip().lower() in FOLLOW_WORDS:
        return FOLLOW_PLAN
    return parse_models(text)


def _concurrency(text: str | None) -> int | str | None:
    if text is None:
        return None
    if text.strip().lower() in FOLLOW_WORDS:
        return FOLLOW_PLAN
    try:
        return check_concurrency(whole_number(text), "max_concurrent")
    except ValueError:
        raise ConfigError(f"max_concurrent must be a whole number or 'plan', "
                          f"got {text[:40]!r}") from None


def _limit(text: str | None, what: str) -> int | str | None:
    if text is None:
        return None
    if text.strip().lower() in FOLLOW_WORDS:
        return FOLLOW_PLAN
    try:
        return check_rate(whole_number(text), what)
    except ValueError:
        raise ConfigError(f"{what} must be a whole number or 'plan' (follow the plan's), "
                          f"got {text[:40]!r}") from None


def _budget(text: str | None) -> int | str | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return "none"
    micro = usd_to_micro(text, "budget")
    if micro > MAX_BUDGET_MICRO:
        raise ConfigError("budget must be at most 1000000000 USD")
    return micro


async def key_change(store: Store, settings: Settings, record: KeyRecord,
                     spec: ChangeSpec) -> KeyChange:
    """`spec` checked against `record` (the key as it is now) and the config."""
    if record.deleted_at_us is not None:
        raise ConfigError(f"key {record.id} was deleted; deleted keys cannot change")
    name = None if spec.name is None else check_key_name(spec.name)
    subscription = record.key_type == "subscription"
    if spec.plan is not None:
        if not subscription:
            raise ConfigError("a credit key has no plan; create a plan key instead")
        if spec.plan not in settings.plans:
            known = ", ".join(sorted(settings.plans))
            raise ConfigError(f"unknown plan {spec.plan!r} (known plans: {known})")
    if spec.expires_at is not None and spec.expires_in is not None:
        raise ConfigError("give --expires-at or --expires-in, not both")
    if not subscription and (spec.expires_at is not None or spec.expires_in is not None):
        raise ConfigError("credit keys do not expire; expiry applies to plan keys")
    expires_at = None
    if spec.expires_at is not None:
        try:
            expires_at = parse_iso_to_us(spec.expires_at)
        except (ValueError, OverflowError):
            raise ConfigError(f"invalid expires_at {spec.expires_at[:40]!r}: use ISO 8601, "
                              f"like 2027-01-31T00:00:00Z") from None
    change = KeyChange(
        name=name, plan=spec.plan, rpm=_limit(spec.rpm, "rpm"), tpm=_limit(spec.tpm, "tpm"),
        budget_limit=_budget(spec.budget),
        budget_duration=(None if spec.budget_duration is None
                         else parse_duration(spec.budget_duration)),
        expires_at_us=expires_at,
        expires_in_seconds=None if spec.expires_in is None else parse_duration(spec.expires_in),
        active=spec.active, models=_models(spec.models),
        max_concurrent=_concurrency(spec.max_concurrent),
        windows=windows_field(spec.budget_windows, FOLLOW_PLAN))
    if change.is_empty():
        raise ConfigError("nothing to change: give at least one of name, plan, rpm, tpm, "
                          "budget, budget_duration, expires_at, expires_in, models, "
                          "max_concurrent, budget windows")
    return change


async def update_key(store: Store, settings: Settings, key_id: str, spec: ChangeSpec,
                     account_id: str | None = None) -> KeyRecord:
    record = (await store.get_key(key_id) if account_id is None
              else await store.account_key(account_id, key_id))
    if record is None:
        raise NotFound(f"no key with id {key_id}")
    change = await key_change(store, settings, record, spec)
    return await store.change_key(key_id, change, record.account_id)


async def renew_key(store: Store, key_id: str, period: str | None) -> KeyRecord:
    """Extends a subscription by `period` (default 30d) from its current expiry or now,
    whichever is later (Redis time)."""
    record = await store.get_key(key_id)
    if record.key_type != "subscription":
        raise ConfigError("only plan (subscription) keys expire; a credit key needs no renewal")
    seconds = SUBSCRIPTION_DEFAULT_SECONDS if period is None else parse_duration(period)
    return await store.change_key(key_id, KeyChange(renew_seconds=seconds), record.account_id)


async def rotate_key(store: Store, key_id: str) -> tuple[KeyRecord, str]:
    """A new secret for the key (returned once); the old one stops working at once."""
    secret = new_consumption_secret()
    record = await store.rotate_secret(key_id, hash_secret(secret))
    return record, secret
