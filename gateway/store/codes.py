"""The reply codes of the Lua scripts, by name. Each script's header lists the same codes;
tests/store/test_codes.py reads the headers and fails when the two disagree."""

from __future__ import annotations

from enum import IntEnum


class AdmitCode(IntEnum):
    """lua/admit.lua's first reply element."""

    ADMITTED = 0
    UNKNOWN_KEY = 1
    DEACTIVATED = 2
    EXPIRED = 3
    RPM_EXHAUSTED = 4
    TPM_EXHAUSTED = 5
    BUDGET_EXHAUSTED = 6
    CREDITS_EXHAUSTED = 7
    PLAN_UNKNOWN = 8
    MODEL_NOT_ALLOWED = 9
    CONCURRENCY_LIMIT = 10


class UsageCode(IntEnum):
    """lua/usage.lua's first reply element."""

    OK = 0
    SECRET_MISMATCH = 1
    DEACTIVATED = 2
    RECORD_GONE = 4


class UpdateCode(IntEnum):
    """lua/update_key.lua's first reply element."""

    UPDATED = 0
    MISSING = 1
    DELETED = 2
    EXPIRY_PAST = 3
    EXPIRY_TOO_LATE = 4


class CreditCode(IntEnum):
    """lua/credits.lua's first reply element."""

    APPLIED = 0
    MISSING_ACCOUNT = 1
    NEGATIVE_BALANCE = 2
