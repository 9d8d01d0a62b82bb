"""Budget windows: spend limits that reset every `duration`, several at once (a plan's
`budgets = [{ usd = 5, duration = "1d" }, { usd = 100, duration = "30d" }]`, a key's or an
account's `--budget-window 5/1d`), rolling from their first use or, with `reset =
"calendar"`, aligned to UTC: a window of whole days resets at 00:00 UTC (a 30d or 31d one on
the 1st of each month). Admission (lua/admit.lua) reads them as "limit:seconds:mode", joined
by commas (mode 'r' rolling, 'c' calendar)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config.units import (
    check_known,
    format_duration,
    parse_duration,
    usd_to_micro,
)
from gateway.errors import ConfigError

MAX_WINDOWS = 4  # per key (or plan) and per account: each costs admission a hash read
MONTH_SECONDS = (30 * 86400, 31 * 86400)  # with calendar reset: calendar months
RESETS = ("rolling", "calendar")
MAX_WINDOW_MICRO = 10**15  # one billion USD: exact as a Lua (double) number


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    limit_micro: int
    seconds: int
    calendar: bool = False

    def encode(self) -> str:
        return f"{self.limit_micro}:{self.seconds}:{'c' if self.calendar else 'r'}"

    def text(self) -> str:
        """As the command line takes it: 5/1d, 100/30d/calendar."""
        usd = f"{self.limit_micro / 1_000_000:.6f}".rstrip("0").rstrip(".")
        return f"{usd}/{format_duration(self.seconds)}" + ("/calendar" if self.calendar else "")


def encode_windows(windows: Iterable[BudgetWindow]) -> str:
    return ",".join(w.encode() for w in windows)


def decode_windows(text: str) -> tuple[BudgetWindow, ...]:
    """What encode_windows wrote (a record's field); '' and '-' hold none."""
    out = []
    for part in text.split(","):
        if part.count(":") == 2:
            limit, seconds, mode = part.split(":")
            out.append(BudgetWindow(int(limit), int(seconds), mode == "c"))
    return tuple(out)


def _window(usd: object, duration: object, calendar: bool, what: str) -> BudgetWindow:
    if isinstance(usd, bool) or not isinstance(usd, int | float | str):
        raise ConfigError(f"{what}: usd must be an amount like 5 or 2.50")
    limit = usd_to_micro(usd, f"{what}.usd")
    if limit <= 0 or limit > MAX_WINDOW_MICRO:
        raise ConfigError(f"{what}: usd must be above 0 and at most 1000000000")
    if not isinstance(duration, str):
        raise ConfigError(f"{what}: duration must be text like \"1d\" or \"30d\"")
    seconds = parse_duration(duration)
    if calendar and seconds % 86400 and 86400 % seconds:
        raise ConfigError(f"{what}: a calendar window is whole days, or divides a day "
                          f"(like 1h), got {duration!r}")
    return BudgetWindow(limit, seconds, calendar)


def checked(windows: list[BudgetWindow], what: str) -> tuple[BudgetWindow, ...]:
    if len(windows) > MAX_WINDOWS:
        raise ConfigError(f"{what}: at most {MAX_WINDOWS} budget windows")
    seen = set()
    for w in windows:
        if (w.seconds, w.calendar) in seen:
            raise ConfigError(f"{what}: two budget windows of {format_duration(w.seconds)}; "
                              f"give each duration once")
        seen.add((w.seconds, w.calendar))
    return tuple(windows)


def windows_from_config(value: object, reset: object, what: str) -> tuple[BudgetWindow, ...]:
    """A plan's `budgets = [{ usd, duration }, ...]` with its `reset`."""
    if reset not in RESETS:
        raise ConfigError(f"{what}.reset must be \"rolling\" or \"calendar\", got {reset!r}")
    if not isinstance(value, list):
        raise ConfigError(f"{what}.budgets must be a list like "
                          f'[{{ usd = 5, duration = "1d" }}]')
    windows = []
    for i, raw in enumerate(value):
        where = f"{what}.budgets[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table {{ usd = ..., duration = ... }}")
        check_known(raw, ("usd", "duration"), where)
        windows.append(_window(raw.get("usd"), raw.get("duration"), reset == "calendar",
                               where))
    return checked(windows, f"{what}.budgets")


def parse_window(text: str) -> BudgetWindow:
    """USD/DURATION[/calendar] from the command line or an API, e.g. 5/1d, 100/30d/calendar."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in RESETS):
        raise ConfigError(f"budget window {text[:40]!r}: use USD/DURATION, like 5/1d, "
                          f"or USD/DURATION/calendar")
    return _window(parts[0], parts[1], len(parts) == 3 and parts[2] == "calendar",
                   f"budget window {text[:40]!r}")


def parse_windows(texts: Iterable[str]) -> tuple[BudgetWindow, ...]:
    return checked([parse_window(t) for t in texts], "budget windows")


NO_WINDOWS = "-"  # a key's own "none" (its plan's would apply to an empty field)


def windows_field(texts: list[str] | None, follow: str) -> str | None:
    """What a key's or an account's `windows` field becomes from `--budget-window` options:
    None (not given), `follow` for 'plan' (a key: follow its plan's), NO_WINDOWS for
    'none', else the windows encoded."""
    if texts is None:
        return None
    words = [t.strip().lower() for t in texts]
    if words in (["plan"], ["default"]):
        return follow
    if words in (["none"], ["off"]):
        return NO_WINDOWS
    return encode_windows(parse_windows(texts))


def next_reset_us(seconds: int, calendar: bool, resets_at_us: int | None,
                  now_us: int) -> int | None:
    """When a window's period ends, seen at Redis time `now_us`, as admit.lua rolls it:
    None for a rolling window not used yet (it starts at its first use)."""
    length = seconds * 1_000_000
    if resets_at_us is not None and now_us < resets_at_us:
        return resets_at_us
    if calendar and seconds in MONTH_SECONDS:
        day = datetime.date(1970, 1, 1) + datetime.timedelta(days=now_us // 86_400_000_000)
        first = datetime.date(day.year + day.month // 12, day.month % 12 + 1, 1)
        return (first - datetime.date(1970, 1, 1)).days * 86_400_000_000
    if calendar:
        return (now_us // length + 1) * length
    if resets_at_us is None:
        return None
    return resets_at_us + ((now_us - resets_at_us) // length + 1) * length
