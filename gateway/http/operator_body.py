"""What an operator API (/admin/*) body may say beyond a customer's: the limits only the
operator sets (a key's models, max_concurrent and budget windows; an account's rpm, tpm,
max_concurrent and budget windows), as the CLI's options do. Checked field by field before
anything is made or changed; every mistake a 400 naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.config.plans import check_concurrency, check_models
from gateway.config.windows import MAX_WINDOWS, encode_windows, parse_windows
from gateway.errors import ConfigError
from gateway.http.admin import ACCOUNT_LIMITS, KeySpec, account_limits
from gateway.http.key_changes import ChangeSpec
from gateway.http.management_body import (
    bad_request,
    checked_duration,
    checked_name,
    key_spec,
    only_fields,
    optional_str,
    uuid_text,
)

# Beyond what POST /api/keys takes (management_body.CREATE_FIELDS): the operator's alone.
KEY_LIMITS = ("models", "max_concurrent", "budget_windows")
PATCH_FIELDS = ("name", "plan", "rpm", "tpm", "budget", "budget_duration", "expires_at",
                "expires_in", "is_active", *KEY_LIMITS)
ACCOUNT_FIELDS = (*ACCOUNT_LIMITS, "budget_windows")


def _integer(value: Any, field: str, null: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{field} must be an integer, or null {null}")
    return value


def checked_concurrency(value: Any, null: str) -> int:
    try:
        return check_concurrency(_integer(value, "max_concurrent", null), "max_concurrent")
    except ConfigError as exc:
        raise bad_request(str(exc)) from None


def checked_models(value: Any, null: str) -> str:
    """A non-empty list of model names or 'prefix*' patterns, as the CLI's "a,qwen*"."""
    if not isinstance(value, list) or not value:
        raise bad_request(f"models must be a non-empty list of model names or 'prefix*' "
                          f"patterns (['*']: any), or null {null}")
    try:
        return ",".join(m.strip() for m in check_models(value, "models"))
    except ConfigError as exc:
        raise bad_request(str(exc)) from None


def checked_windows(value: Any) -> list[str]:
    """A list of USD/DURATION[/calendar] texts (each duration once, at most MAX_WINDOWS);
    [] is a list of none. Words like 'plan' or 'none' are the CLI's: here null and []."""
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise bad_request("budget_windows must be a list like [\"5/1d\", \"100/30d/calendar\"]"
                          ", or null")
    if len(value) > MAX_WINDOWS:
        raise bad_request(f"budget_windows: at most {MAX_WINDOWS} budget windows")
    try:
        parse_windows(value)
    except ConfigError as exc:
        raise bad_request(f"budget_windows: {exc}") from None
    return list(value)


def admin_key_spec(body: dict[str, Any]) -> tuple[str, KeySpec]:
    """A POST /admin/keys body: the account's id and the KeySpec of `gateway keys create`.
    The fields a customer may give too are key_spec's; the operator's own are taken out
    first, so POST /api/keys still refuses them as unknown."""
    body = dict(body)
    account = body.pop("account_id", None)
    if not isinstance(account, str):
        raise bad_request("account_id is required")
    account_id = uuid_text(account, "account_id")
    extra = {field: body.pop(field) for field in KEY_LIMITS if field in body}
    spec = key_spec(body)
    null = "to follow the plan's"
    models = extra.get("models")
    concurrency = extra.get("max_concurrent")
    windows = extra.get("budget_windows")
    return account_id, dataclasses.replace(
        spec,
        models=None if models is None else checked_models(models, null),
        max_concurrent=None if concurrency is None else checked_concurrency(concurrency, null),
        # [] is none of its own (not its plan's): the CLI's --budget-window none
        budget_windows=None if windows is None else (checked_windows(windows) or ["none"]))


def change_spec(body: dict[str, Any]) -> ChangeSpec:
    """A PATCH /admin/keys/{id} body as the ChangeSpec of `gateway keys update`; null
    puts a limit back to the plan's."""
    only_fields(body, PATCH_FIELDS)
    return ChangeSpec(
        name=checked_name(body["name"]) if "name" in body else None,
        plan=optional_str(body, "plan"),
        rpm=_limit(body, "rpm"), tpm=_limit(body, "tpm"),
        budget=_budget(body),
        budget_duration=checked_duration(body, "budget_duration"),
        expires_at=optional_str(body, "expires_at"),
        expires_in=checked_duration(body, "expires_in"),
        active=_flag(body, "is_active"), models=_models(body),
        max_concurrent=_concurrency(body), budget_windows=_windows(body))


def account_limits_of(body: dict[str, Any],
                      fields: tuple[str, ...]) -> dict[str, int | str | None]:
    """rpm, tpm, max_concurrent (an integer, or null for none) and budget_windows (a list,
    or null or [] for none) of a POST or PATCH /admin/accounts body, as
    Store.set_account_limits takes them; fields absent are left out."""
    only_fields(body, fields)
    limits: dict[str, int | str | None] = {}
    for field in ACCOUNT_LIMITS:
        if body.get(field) is not None:
            _integer(body[field], field, "for no limit")
    try:
        limits.update(account_limits({f: body[f] for f in ACCOUNT_LIMITS if f in body}))
    except ConfigError as exc:
        raise bad_request(str(exc)) from None
    if "budget_windows" in body:
        windows = body["budget_windows"]
        limits["windows"] = encode_windows(parse_windows(
            [] if windows is None else checked_windows(windows)))
    return limits


def account_create(body: dict[str, Any]) -> tuple[str, dict[str, int | str | None]]:
    """A POST /admin/accounts body: the name and the limits to set (none given: {})."""
    limits = account_limits_of(body, ("name", *ACCOUNT_FIELDS))
    if "name" not in body:
        raise bad_request("name is required")
    return checked_name(body["name"]), {k: v for k, v in limits.items() if v not in (None, "")}


def _limit(body: dict[str, Any], field: str) -> str | None:
    if field not in body:
        return None
    if body[field] is None:
        return "plan"  # null: the key follows its plan's again
    return str(_integer(body[field], field, "to follow the plan's"))


def _concurrency(body: dict[str, Any]) -> str | None:
    if "max_concurrent" not in body:
        return None
    value = body["max_concurrent"]
    return "plan" if value is None else str(checked_concurrency(value, "to follow the plan's"))


def _models(body: dict[str, Any]) -> str | None:
    if "models" not in body:
        return None
    value = body["models"]
    return "plan" if value is None else checked_models(value, "to follow the plan's")


def _windows(body: dict[str, Any]) -> list[str] | None:
    """A list: the key's own windows; []: none of its own; null: its plan's again."""
    if "budget_windows" not in body:
        return None
    value = body["budget_windows"]
    return ["plan"] if value is None else checked_windows(value) or ["none"]


def _budget(body: dict[str, Any]) -> str | None:
    if "budget" not in body:
        return None
    value = body["budget"]
    if value is None:
        return "none"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise bad_request("budget must be a USD amount (number or string), or null for none")
    return str(value)


def _flag(body: dict[str, Any], field: str) -> bool | None:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{field} must be true or false")
    return value
