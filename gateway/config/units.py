"""Units and checks of configuration values: durations, money, rates, ports, flags. Every
value a config file or the environment gives goes through one of these, so a mistake is a
one-line ConfigError naming the setting."""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.errors import ConfigError

_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhd])\s*$")  # ASCII digits: not '٣d'
_AMOUNT = re.compile(r"^[0-9]+(\.[0-9]+)?$|^\.[0-9]+$")  # plain decimal: not '1_000', '1e3'

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_RATE = 100_000_000
MAX_OUTPUT_TOKENS = 10_000_000
DEFAULT_REQUEST_PRICE = 6_000  # micro-USD per audio request when pricing names none
MAX_USD = 1_000_000_000  # micro-USD stay exact in Lua's doubles far beyond this


MAX_DURATION_SECONDS = 100 * 365 * 86400  # a century: Redis time in microseconds stays exact


def parse_duration(text: str) -> int:
    """'30d' -> seconds. Units s, m, h, d; the amount must be a positive integer."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"invalid duration {text!r}: use a positive integer with s, m, h or d")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION_SECONDS:
        raise ConfigError(f"duration {text!r} is longer than the maximum of 36500d")
    return seconds


def format_duration(seconds: int) -> str:
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def usd_to_micro(value: object, what: str) -> int:
    text = str(value).strip()
    if isinstance(value, str) and not _AMOUNT.match(text):
        raise ConfigError(f"invalid amount for {what}: {value[:40]!r} (a plain decimal, "
                          f"like 10 or 2.50)")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ConfigError(f"invalid amount for {what}: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"invalid amount for {what}: {value!r}")
    if amount > MAX_USD:
        raise ConfigError(f"amount for {what} is above the maximum of {MAX_USD:,} USD")
    return int((amount * 1_000_000).to_integral_value())


def usd_to_micro_signed(value: object, what: str) -> int:
    """A USD amount that may be negative (an adjustment), as integer micro-USD."""
    text = str(value).strip()
    if text.startswith("-"):
        return -usd_to_micro(text[1:], what)
    return usd_to_micro(text, what)


def whole_number(text: str) -> int:
    """A whole number as people type it: ASCII digits only (int() also takes Arabic-Indic and
    fullwidth digits and '1_000', which no operator means); ValueError otherwise."""
    stripped = text.strip()
    if not stripped.isascii() or not stripped.isdigit():
        raise ValueError(text)
    return int(stripped)


def micro_to_usd(micro: int) -> float:
    return micro / 1_000_000


def check_rate(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RATE:
        raise ConfigError(f"{what} must be an integer between 1 and {MAX_RATE}, got {value!r}")
    return value


_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_slug(slug: str) -> str:
    """A plan slug travels in URLs, metrics and script arguments: short, lower-case, plain."""
    if not _SLUG.fullmatch(slug):
        raise ConfigError(f"plan slug {slug[:70]!r} must be 1-64 characters of a-z, 0-9, _ "
                          f"and -, starting with a letter or digit")
    return slug


def check_known(table: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """A key the gateway does not read is a typo until proven otherwise: name it, and the
    closest valid key."""
    names = sorted(valid)
    for key in sorted(set(table) - set(names)):
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(names)}"
        raise ConfigError(f"unknown setting {key!r} in {where}{hint}")


def check_table(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{what}] must be a table, got {value!r}")
    return value


def check_seconds(value: object, what: str, zero_allowed: bool) -> float:
    """A duration in seconds from TOML or the environment (a number, or text of one)."""
    seconds = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # not a number: refused below
            seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_allowed):
        bound = "at least 0" if zero_allowed else "above 0"
        raise ConfigError(f"{what} must be a number of seconds {bound}, got {value!r}")
    return seconds


def check_positive(value: object, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(f"{what} must be an integer between 1 and {maximum}, got {value!r}")
    return value


def check_port(value: object) -> int:
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or int(text) > 65535:
        raise ConfigError(f"metrics_port must be a port from 1 to 65535, or 0 for none, "
                          f"got {value!r}")
    return int(text)


def check_token(value: object, what: str = "metrics_token") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) < 16 or not value.isprintable():
        raise ConfigError(f"{what} must be a string of at least 16 printable characters")
    return value


def check_text(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.isprintable():
        raise ConfigError(f"{what} must be a string of printable characters")
    return value


def check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be {' or '.join(repr(c) for c in choices)}, "
                          f"got {value!r}")
    return str(value)


def check_flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value
