"""The GET /v1/usage document, built from one KeyUsage read."""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.http.endpoints import usage_document
from gateway.store import KeyUsage

NOW = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def test_subscription_usage_document() -> None:
    usage = KeyUsage(code=0, now_us=NOW, name="prod", key_type="subscription", plan="pro",
                     created_at_us=NOW - 86_400_000_000, expires_at_us=NOW + 1_000,
                     rpm=200, tpm=13333, budget_limit=0, budget_duration=7 * 86_400,
                     spent=1_500_000, resets_at_us=NOW + 3_600_000_000, credits=2_250_000)
    assert usage_document(usage, Settings()) == {
        "budget": {"spent": 1.5, "limit": 0.0, "duration": "7d",
                   "resets_at": "2026-01-01T01:00:00.000Z"},
        "rate_limits": {"rpm": 200, "tpm": 13333},
        "plan": {"slug": "pro", "status": "active", "expires_at": "2026-01-01T00:00:00.001Z"},
        "credits": {"balance": 2.25},
        "key": {"name": "prod", "type": "subscription",
                "created_at": "2025-12-31T00:00:00.000Z"},
        "budgets": [{"scope": "key", "primary": True, "limit": 0.0, "duration": "7d",
                     "reset": "rolling", "spent": 1.5, "resets_at": "2026-01-01T01:00:00.000Z"}],
    }


def test_a_subscription_is_expired_from_its_expiry_instant_on() -> None:
    # Admission refuses from `now >= expires_at` on (admit.lua); usage must agree.
    usage = KeyUsage(code=0, now_us=NOW, key_type="subscription", plan="pro", expires_at_us=NOW)
    assert usage_document(usage, Settings())["plan"]["status"] == "expired"
    later = KeyUsage(code=0, now_us=NOW - 1, key_type="subscription", plan="pro",
                     expires_at_us=NOW)
    assert usage_document(later, Settings())["plan"]["status"] == "active"


def test_credit_usage_document_has_no_plan_and_no_expiry() -> None:
    usage = KeyUsage(code=0, now_us=NOW, name="c", key_type="credit", plan="credits",
                     budget_limit=None, budget_duration=30 * 86_400, credits=7)
    document = usage_document(usage, Settings())
    assert document["plan"] == {"slug": None, "status": "active", "expires_at": None}
    assert document["budget"]["limit"] is None
    assert document["credits"] == {"balance": 0.000007}
