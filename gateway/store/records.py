"""The store's records: what Redis holds, typed. Money is integer micro-USD; time is Redis
time in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class KeyRef:
    account_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class SpendDetail:
    """What a settlement's ledger entry says beyond its tokens and cost."""

    route: str = ""
    model: str = ""  # as the upstream reported serving it, else as asked
    cached_tokens: int = 0
    status: int = 0  # the upstream's HTTP status; 0: it gave no answer


NO_DETAIL = SpendDetail()
NO_MODEL = "\x01"  # never a model name (those are printable): only a '*' pattern allows it


@dataclass(slots=True)
class Ask:
    """What one admission reserves: an upper bound of the request's tokens and its cost."""

    prompt_tokens: int
    per_sequence: int  # completion tokens one sequence may generate
    sequences: int
    cost: int  # micro-USD of the whole bound
    prompt_cost: int  # micro-USD of the prompt alone
    output_price: int  # micro-USD per million completion tokens
    clamp: bool = True  # lower the bound to what can be paid, rather than refuse
    # The model asked for, checked against the key's or its plan's models: NO_MODEL for an
    # inference request that names none, "" for a keyed request that is not inference.
    model: str = ""

    @classmethod
    def flat(cls, tokens: int, cost: int) -> Ask:
        """A reservation of `tokens` prompt tokens costing `cost`, that nothing can lower."""
        return cls(tokens, 0, 1, cost, cost, 0)


@dataclass(frozen=True, slots=True)
class Decision:
    code: int
    rpm_limit: int
    rpm_remaining: int
    rpm_reset_us: int
    tpm_limit: int
    tpm_remaining: int
    tpm_reset_us: int
    retry_after_us: int
    plan: str
    key_type: str
    per_sequence: int = 0  # the completion bound admitted (at most the one asked for)
    slots: int = 0  # the slots taken (1 the key's, 2 the account's, 3 both): renew them
    would_reject: int = 0  # shadow mode: the code the plan's limits would have refused with
    scope: str = ""  # whose limit refused (or would have): "key", "model" or "account"


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """What GET /v1/usage reports: one consistent read at Redis time `now_us`."""

    code: int
    now_us: int = 0
    name: str = ""
    key_type: str = ""
    plan: str = ""
    created_at_us: int = 0
    expires_at_us: int | None = None
    rpm: int | None = None  # the key's own limit; None: its plan's
    tpm: int | None = None
    budget_limit: int | None = None
    budget_duration: int = 0
    spent: int = 0
    resets_at_us: int = 0
    credits: int = 0
    windows: tuple[WindowState, ...] = ()  # beyond the primary budget: the key's, account's


@dataclass(frozen=True, slots=True)
class WindowState:
    """A budget window as stored (usage.lua): its rollover, if due, is the reader's to show."""

    scope: str  # "key" (its own or its plan's) or "account"
    limit: int
    seconds: int
    calendar: bool
    spent: int
    resets_at_us: int | None  # None: not used yet


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    credits: int
    created_at_us: int
    # The account's own limits, shared by all its keys; None: none.
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    windows: str = ""  # budget windows shared by all its keys (config/windows.py encoding)


@dataclass(frozen=True, slots=True)
class CreditEntry:
    """One operator adjustment of an account's credits."""

    at_us: int
    micro: int
    balance: int  # after the change
    by: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    account_id: str
    name: str
    key_type: str
    plan: str
    active: bool
    created_at_us: int
    expires_at_us: int | None
    rpm: int | None  # the key's own limit; None: its plan's (Settings.limits_for)
    tpm: int | None
    budget_limit: int | None
    budget_duration: int
    spent: int
    resets_at_us: int
    total_spent: int
    deleted_at_us: int | None = None  # deleted keys keep their record for their history
    models: tuple[str, ...] | None = None  # the key's own allowed models; None: its plan's
    max_concurrent: int | None = None  # the key's own in-flight limit; None: its plan's
    windows: str | None = None  # the key's own budget windows (config/windows.py); None: plan's


@dataclass(frozen=True, slots=True)
class MgmtKey:
    id: str
    account_id: str
    created_at_us: int


@dataclass(frozen=True, slots=True)
class MgmtRef:
    account_id: str
    mgmt_id: str


@dataclass(frozen=True, slots=True)
class Throttle:
    allowed: bool
    remaining: int
    retry_after_us: int
    reset_us: int
    now_us: int


@dataclass(frozen=True, slots=True)
class KeyCounters:
    record: KeyRecord
    minute_hashes: dict[int, dict[str, int]]
    hour_hashes: dict[int, dict[str, int]]


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    now_us: int
    keys: list[KeyCounters]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_int(value: Any) -> int | None:
    text = _text(value) if value is not None else ""
    return int(text) if text else None


def _key_record(raw: dict[Any, Any]) -> KeyRecord:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return KeyRecord(
        id=f["id"], account_id=f["account_id"], name=f["name"], key_type=f["type"],
        plan=f["plan"], active=f["active"] == "1", created_at_us=int(f["created_at"]),
        expires_at_us=_optional_int(f.get("expires_at")), rpm=_optional_int(f.get("rpm")),
        tpm=_optional_int(f.get("tpm")),
        budget_limit=_optional_int(f.get("budget_limit")),
        budget_duration=int(f["budget_duration"]), spent=int(f["spent"]),
        resets_at_us=int(f["resets_at"]), total_spent=int(f.get("total_spent", "0")),
        deleted_at_us=_optional_int(f.get("deleted_at")),
        models=tuple(f["models"].split(",")) if f.get("models") else None,
        max_concurrent=_optional_int(f.get("max_concurrent")),
        windows=f.get("windows") or None,
    )


def _counters(raw: dict[Any, Any]) -> dict[str, int]:
    return {_text(k): int(v) for k, v in raw.items()}
