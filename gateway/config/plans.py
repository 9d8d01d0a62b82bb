"""[plans.SLUG]: what a subscription key may do, unless the key says otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.units import check_known, check_rate, check_slug
from gateway.errors import ConfigError

PLAN_FIELDS = frozenset({"name", "price_usdc", "rpm", "tpm", "models"})
MAX_MODEL_PATTERN = 200


@dataclass(frozen=True, slots=True)
class Plan:
    slug: str
    name: str
    price_usdc: str
    rpm: int
    tpm: int
    # The models a key on the plan may ask for: exact names, or "prefix*"; () means any.
    models: tuple[str, ...] = ()


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
    for model in value:
        if (not model.strip() or len(model) > MAX_MODEL_PATTERN or "," in model
                or "*" in model[:-1] or not model.isprintable()):
            raise ConfigError(f"{what}: {model[:80]!r} is not a model name or a 'prefix*' "
                              f"pattern (1 to {MAX_MODEL_PATTERN} printable characters, no "
                              f"comma, '*' only at the end)")
    return tuple(value)


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
        )
    return plans
