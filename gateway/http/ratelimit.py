"""Admission decisions as HTTP: x-ratelimit-* headers and OpenAI-style rejections."""

from __future__ import annotations

from gateway.errors import Rejected
from gateway.store import Decision
from gateway.store.codes import AdmitCode
from gateway.types import Headers

# Plain ints on the hot path: comparing an IntEnum member costs an attribute lookup each time.
ADMITTED, UNKNOWN_KEY, DEACTIVATED, EXPIRED = (
    int(AdmitCode.ADMITTED), int(AdmitCode.UNKNOWN_KEY), int(AdmitCode.DEACTIVATED),
    int(AdmitCode.EXPIRED))
RPM_EXHAUSTED, TPM_EXHAUSTED, BUDGET_EXHAUSTED, CREDITS_EXHAUSTED = (
    int(AdmitCode.RPM_EXHAUSTED), int(AdmitCode.TPM_EXHAUSTED),
    int(AdmitCode.BUDGET_EXHAUSTED), int(AdmitCode.CREDITS_EXHAUSTED))
PLAN_UNKNOWN = int(AdmitCode.PLAN_UNKNOWN)
MODEL_NOT_ALLOWED = int(AdmitCode.MODEL_NOT_ALLOWED)
CONCURRENCY_LIMIT = int(AdmitCode.CONCURRENCY_LIMIT)
# Which limit refused: the key's own (or its plan's), its plan's for the model, the account's.
_WHOSE = {"key": "", "model": " for this model", "account": " for the account"}
# Shadow mode's would-be refusals by the `reason` label refusals have (rejection_reason).
WOULD_REJECT_REASONS = {RPM_EXHAUSTED: "rate_limit_exceeded_rpm",
                        TPM_EXHAUSTED: "rate_limit_exceeded_tpm",
                        MODEL_NOT_ALLOWED: "model_not_allowed",
                        CONCURRENCY_LIMIT: "concurrency_limit_exceeded"}


def format_reset(micros: int) -> str:
    """Durations the way OpenAI writes them: '20ms', '1s', '1.5s', '6m0s', '1h2m3s'."""
    millis = max(0, -(-micros // 1000))
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def rate_headers(d: Decision) -> Headers:
    return [
        (b"x-ratelimit-limit-requests", str(d.rpm_limit).encode()),
        (b"x-ratelimit-remaining-requests", str(d.rpm_remaining).encode()),
        (b"x-ratelimit-reset-requests", format_reset(d.rpm_reset_us).encode()),
        (b"x-ratelimit-limit-tokens", str(d.tpm_limit).encode()),
        (b"x-ratelimit-remaining-tokens", str(d.tpm_remaining).encode()),
        (b"x-ratelimit-reset-tokens", format_reset(d.tpm_reset_us).encode()),
    ]


def invalid_key() -> Rejected:
    return Rejected(401, "invalid_api_key",
                    "Invalid API key. Send a valid key as 'Authorization: Bearer sk_live_...'.")


def rejection(d: Decision) -> Rejected:
    headers = rate_headers(d)
    if d.retry_after_us >= 0 and d.code >= RPM_EXHAUSTED:
        seconds = max(1, -(-d.retry_after_us // 1_000_000))
        headers.append((b"retry-after", str(seconds).encode()))
    if d.code == UNKNOWN_KEY:
        return invalid_key()
    if d.code == DEACTIVATED:
        return Rejected(403, "key_deactivated", "This API key has been deactivated.",
                        "permission_error", headers)
    if d.code == EXPIRED:
        return Rejected(403, "subscription_expired", "The subscription for this key has expired.",
                        "permission_error", headers)
    if d.code == RPM_EXHAUSTED:
        return Rejected(429, "rate_limit_exceeded",
                        f"Rate limit reached: {d.rpm_limit} requests per minute"
                        f"{_WHOSE.get(d.scope, '')}.", "requests", headers)
    if d.code == TPM_EXHAUSTED:
        return Rejected(429, "rate_limit_exceeded",
                        f"Rate limit reached: {d.tpm_limit} tokens per minute"
                        f"{_WHOSE.get(d.scope, '')}.", "tokens", headers)
    if d.code == CONCURRENCY_LIMIT:
        whose = "the account's" if d.scope == "account" else "this key's"
        return Rejected(429, "concurrency_limit_exceeded",
                        f"Too many requests in flight: {whose} concurrency limit is reached; "
                        f"retry when one finishes.", "requests", headers)
    if d.code == PLAN_UNKNOWN:
        # The operator removed the plan from the config while keys still name it.
        return Rejected(403, "plan_unavailable",
                        f"This key's plan {d.plan!r} is not offered any more; "
                        f"contact the operator.", "permission_error", headers)
    if d.code == MODEL_NOT_ALLOWED:
        return Rejected(403, "model_not_allowed",
                        "This key's plan does not include the model asked for (or the request "
                        "names none).", "permission_error", headers)
    if d.code == BUDGET_EXHAUSTED:
        return Rejected(429, "budget_exceeded", "The key's budget for this period is exhausted.",
                        "insufficient_quota", headers)
    return Rejected(429, "insufficient_credits", "The account's credit balance is exhausted.",
                    "insufficient_quota", headers)
