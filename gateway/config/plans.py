"""[plans.SLUG]: what a subscription key may do, unless the key says otherwise."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.units import check_flag, check_known, check_rate, check_slug
from gateway.config.windows import BudgetWindow, windows_from_config
from gateway.errors import ConfigError

PLAN_FIELDS = frozenset({"name", "price_usdc", "rpm", "tpm", "models", "max_concurrent",
                         "enforce", "max_queue_wait", "model_limits", "budgets", "reset"})
MAX_MODEL_PATTERN = 200
MAX_MODELS = 256  # admission compares the model asked with each, on every request
MAX_CONCURRENT = 100_000
MAX_QUEUE_WAIT_SECONDS = 60.0
_QUEUE_WAIT = re.compile(r"^\s*([0-9]+)\s*(ms|s)\s*$")  # ASCII digits, like durations


@dataclass(frozen=True, slots=True)
class Plan:
    slug: str
    name: str
    price_usdc: str
    rpm: int
    tpm: int
    # The models a key on the plan may ask for: exact names, or "prefix*"; () means any.
    models: tuple[str, ...] = ()
    # Requests of one key in flight at once (admission to settlement); None: no limit.
    max_concurrent: int | None = None
    # False: shadow mode, limits computed and counted (gateway_would_reject_total), and
    # nothing refused for them.
    enforce: bool = True
    # A request whose wait for its RPM/TPM room or a slot is at most this long waits for it
    # (seconds; 0: refused at once, as without it).
    max_queue_wait: float = 0.0
    # Per-model limits of a key on the plan: (model, rpm, tpm), exact model names.
    model_limits: tuple[tuple[str, int, int], ...] = ()
    # Budget windows of every key on the plan that has none of its own (config/windows.py).
    budgets: tuple[BudgetWindow, ...] = ()


DEFAULT_PLANS = {
    "standard": Plan("standard", "Standard", "20", 60, 3333),
    "pro": Plan("pro", "Pro", "60", 200, 13333),
}


def check_models(value: object, what: str) -> tuple[str, ...]:
    """A list of model names or "prefix*" patterns (no commas: admission reads them joined
    by commas; a '*' only at the end; "*" alone allows any)."""
    if not isinstance(value, list | tuple) or not all(isinstance(m, str) for m in value):
        raise ConfigError(f"{what} must be a list of model names, like "
                          f'["llama-3.1-8b", "qwen*"]')
    if len(value) > MAX_MODELS:
        raise ConfigError(f"{what}: at most {MAX_MODELS} models (use 'prefix*' patterns)")
    for model in value:
        if (not model.strip() or len(model) > MAX_MODEL_PATTERN or "," in model
                or "*" in model[:-1] or not model.isprintable()):
            raise ConfigError(f"{what}: {model[:80]!r} is not a model name or a 'prefix*' "
                              f"pattern (1 to {MAX_MODEL_PATTERN} printable characters, no "
                              f"comma, '*' only at the end)")
    return tuple(value)


def check_concurrency(value: object, what: str) -> int:
    if (isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_CONCURRENT):
        raise ConfigError(f"{what} must be an integer between 1 and {MAX_CONCURRENT}, "
                          f"got {value!r}")
    return value


def parse_queue_wait(value: object, what: str) -> float:
    """'2s' or '500ms' -> seconds; at most a minute (a queued request holds a connection)."""
    match = _QUEUE_WAIT.match(value) if isinstance(value, str) else None
    seconds = (int(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
               if match else math.nan)
    if not 0 <= seconds <= MAX_QUEUE_WAIT_SECONDS:
        raise ConfigError(f"{what} must be a wait like \"2s\" or \"500ms\", at most "
                          f"{MAX_QUEUE_WAIT_SECONDS:.0f}s, got {value!r}")
    return seconds


def _model_limits(value: object, what: str) -> tuple[tuple[str, int, int], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{what}] must be a table of model names, like "
                          f'[{what}."llama-3.1-8b"] rpm = 30, tpm = 10000')
    limits = []
    for model, raw in value.items():
        check_models([model], what)
        if model.endswith("*"):
            raise ConfigError(f"{what}: {model[:80]!r}: per-model limits name exact models")
        if not isinstance(raw, Mapping):
            raise ConfigError(f'[{what}."{model[:80]}"] must be a table with rpm and tpm')
        check_known(raw, ("rpm", "tpm"), f'[{what}."{model[:80]}"]')
        limits.append((model, check_rate(raw.get("rpm"), f'{what}."{model[:80]}".rpm'),
                       check_rate(raw.get("tpm"), f'{what}."{model[:80]}".tpm')))
    return tuple(limits)


def parse_models(text: str) -> str:
    """A key's own models from the command line or an API: 'a, qwen*' -> 'a,qwen*'."""
    return ",".join(check_models([m.strip() for m in text.split(",")], "models"))


def plans_from_config(tables: Mapping[str, Any]) -> dict[str, Plan]:
    """Plans given in the config replace the built-in ones (a built-in slug named there keeps
    its built-in values for the fields it leaves out)."""
    plans = {} if tables else dict(DEFAULT_PLANS)
    for slug, raw in tables.items():
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[plans.{slug}] must be a table")
        check_known(raw, PLAN_FIELDS, f"[plans.{slug}]")
        check_slug(slug)
        base = DEFAULT_PLANS.get(slug)
        plans[slug] = Plan(
            slug=slug,
            name=str(raw.get("name", base.name if base else slug.title())),
            price_usdc=str(raw.get("price_usdc", base.price_usdc if base else "0")),
            rpm=check_rate(raw.get("rpm", base.rpm if base else None), f"plans.{slug}.rpm"),
            tpm=check_rate(raw.get("tpm", base.tpm if base else None), f"plans.{slug}.tpm"),
            models=check_models(raw.get("models", []), f"plans.{slug}.models"),
            max_concurrent=(None if raw.get("max_concurrent") is None else check_concurrency(
                raw["max_concurrent"], f"plans.{slug}.max_concurrent")),
            enforce=check_flag(raw.get("enforce", True), f"plans.{slug}.enforce"),
            max_queue_wait=parse_queue_wait(raw.get("max_queue_wait", "0s"),
                                            f"plans.{slug}.max_queue_wait"),
            model_limits=_model_limits(raw.get("model_limits", {}),
                                       f"plans.{slug}.model_limits"),
            budgets=windows_from_config(raw.get("budgets", []), raw.get("reset", "rolling"),
                                        f"plans.{slug}"),
        )
    return plans
