"""The operator API (/admin/*) as an operator's script uses it, every answer checked against
the OpenAPI document; on a real redis-server and on the embedded store."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.conftest import bearer, client_for, gateway
from tests.openapi_check import DOC, check, template_for, validate

TOKEN = "operator-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class Admin:
    """Requests to /admin/*, each answer validated against the OpenAPI document, and each
    body the gateway accepts too (what it takes, the document allows)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self, method: str, path: str, body: Any = None,
                       status: int = 200, headers: dict[str, str] | None = None) -> Any:
        response = await self.client.request(method, path, json=body,
                                             headers=ADMIN if headers is None else headers)
        template = template_for(response.request.url.path)
        if template is not None:
            check(response)
            operation = DOC["paths"][template].get(method.lower(), {})
            if body is not None and response.status_code < 300:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                validate(schema, body)
        assert response.status_code == status, response.text
        return response.json()


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    return replace(settings, admin_token=TOKEN, api_plan_keys=False)


def app(store: Store, settings: Settings, upstream: MockUpstream | None = None) -> Any:
    return gateway(upstream or MockUpstream(), store, settings,
                   Metrics.create(CollectorRegistry()))


async def test_an_operator_runs_the_business_over_http(
        store: Store, admin_settings: Settings) -> None:
    upstream = MockUpstream()
    async with client_for(app(store, admin_settings, upstream)) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {"name": "acme"}, 201)
        assert account["credits"] == 0
        assert await admin("GET", "/admin/accounts?name=acme") == [account]
        assert await admin("GET", "/admin/accounts?name=nobody") == []
        after = await admin("POST", f"/admin/accounts/{account['id']}/credits",
                            {"usd": 5, "reason": "invoice 2026-11"})
        assert after["credits"] == 5
        after = await admin("POST", f"/admin/accounts/{account['id']}/credits",
                            {"usd": "-1.5", "reason": "goodwill reversed"})
        assert after["credits"] == 3.5
        shown = await admin("GET", f"/admin/accounts/{account['id']}")
        assert [(e["usd"], e["reason"], e["by"]) for e in shown["credit_history"]] == [
            (-1.5, "goodwill reversed", "admin-api"), (5.0, "invoice 2026-11", "admin-api")]

        # any plan, though mk_ holders may not create plan keys (api_plan_keys = false)
        key = await admin("POST", "/admin/keys", {"account_id": account["id"], "name": "prod",
                                                  "plan": "pro", "rpm": 2}, 201)
        assert key["key"].startswith("sk_live_") and key["overrides"]["rpm"] == 2
        credit = await admin("POST", "/admin/keys", {"account_id": account["id"],
                                                     "name": "batch", "credit": True}, 201)
        listed = await admin("GET", f"/admin/keys?account={account['id']}")
        assert [k["id"] for k in listed] == [key["id"], credit["id"]]
        assert all("key" not in k for k in listed)

        # a customer pastes a secret into a ticket: the operator finds the key, never the secret
        found = await admin("POST", "/admin/keys/lookup", {"secret": key["key"]})
        assert found["id"] == key["id"] and key["key"] not in str(found)

        chat = [(await client.post("/v1/chat/completions", json=CHAT,
                                   headers=bearer(key["key"]))).status_code for _ in range(3)]
        assert chat == [200, 200, 429]
        patched = await admin("PATCH", f"/admin/keys/{key['id']}",
                              {"rpm": None, "budget": 1, "name": "prod-2"})
        assert patched["overrides"]["rpm"] is None and patched["rate_limits"]["rpm"] == 200
        assert patched["budget"]["limit"] == 1.0 and patched["name"] == "prod-2"
        again = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key["key"]))
        assert again.status_code == 200  # the raised limit acts at once

        renewed = await admin("POST", f"/admin/keys/{key['id']}/renew", {"for": "10d"})
        assert renewed["expires_at"] > key["expires_at"]
        await admin("POST", f"/admin/keys/{key['id']}/renew")  # default 30d, no body
        rotated = await admin("POST", f"/admin/keys/{key['id']}/rotate")
        old = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key["key"]))
        assert old.status_code == 401
        deleted = await admin("DELETE", f"/admin/keys/{key['id']}")
        assert deleted["deleted_at"] is not None and deleted["total_spent"] > 0
        gone = await client.post("/v1/chat/completions", json=CHAT,
                                 headers=bearer(rotated["key"]))
        assert gone.status_code == 401
        await admin("POST", "/admin/keys/lookup", {"secret": rotated["key"]}, 404)
        await admin("PATCH", f"/admin/keys/{key['id']}", {"is_active": True}, 409)

        mgmt = await admin("POST", "/admin/mgmt-keys", {"account_id": account["id"]}, 201)
        usage = await client.get("/api/usage", headers=bearer(mgmt["key"]))
        assert usage.status_code == 200
        assert (await admin("POST", "/admin/keys/lookup",
                            {"secret": mgmt["key"]}))["type"] == "management"
        assert (await admin("DELETE", f"/admin/mgmt-keys/{mgmt['id']}"))["revoked"] is True
        assert (await client.get("/api/usage", headers=bearer(mgmt["key"]))).status_code == 401
    assert upstream.requests == 3


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/admin/accounts", {}, 400, "name is required"),
    ("POST", "/admin/accounts", {"name": "acme", "credits": 5}, 400, "unknown field"),
    ("GET", "/admin/accounts/not-a-uuid", None, 400, "account id must be a UUID"),
    ("GET", "/admin/accounts/00000000-0000-0000-0000-000000000000", None, 404, "no account"),
    ("POST", "/admin/accounts/{account}/credits", {"usd": 5}, 400, "reason is required"),
    ("POST", "/admin/accounts/{account}/credits", {"usd": 0, "reason": "x"}, 400, "not be zero"),
    ("POST", "/admin/accounts/{account}/credits", {"usd": -1, "reason": "x"}, 400, "negative"),
    ("POST", "/admin/accounts/{account}/credits", {"usd": True, "reason": "x"}, 400, "usd must"),
    ("POST", "/admin/accounts/{account}/credits", {"usd": "lots", "reason": "x"}, 400,
     "invalid amount"),
    ("POST", "/admin/keys", {"name": "x", "plan": "pro"}, 400, "account_id is required"),
    ("POST", "/admin/keys", {"account_id": "{account}", "name": "x", "plan": "gold"}, 400,
     "unknown plan"),
    ("GET", "/admin/keys", None, 400, "account=ID"),
    ("PATCH", "/admin/keys/{key}", {"rpm": "fast"}, 400, "rpm must be an integer"),
    ("PATCH", "/admin/keys/{key}", {"expires_at": "2001-01-01T00:00:00Z"}, 400, "past"),
    ("PATCH", "/admin/keys/{key}", {}, 400, "nothing to change"),
    ("PATCH", "/admin/keys/00000000-0000-0000-0000-000000000000", {"name": "x"}, 404, "no key"),
    ("POST", "/admin/keys/{key}/renew", {"for": "forever"}, 400, "for must be"),
    ("POST", "/admin/keys/lookup", {"secret": "sk_live_nope"}, 404, "No key has this secret"),
    ("POST", "/admin/keys/lookup", {}, 400, "secret is required"),
    ("PUT", "/admin/keys/{key}", {}, 405, "Method not allowed"),
    ("GET", "/admin/nothing", None, 404, "No such endpoint"),
])
async def test_mistakes_are_answered_with_a_reason(
        store: Store, admin_settings: Settings, method: str, path: str, body: Any,
        status: int, message: str) -> None:
    async with client_for(app(store, admin_settings)) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {"name": "acme"}, 201)
        key = await admin("POST", "/admin/keys", {"account_id": account["id"], "name": "k",
                                                  "plan": "standard"}, 201)
        fill = {"{account}": account["id"], "{key}": key["id"]}
        for marker, value in fill.items():
            path = path.replace(marker, value)
            if isinstance(body, dict):
                body = {k: value if v == marker else v for k, v in body.items()}
        error = await admin(method, path, body, status)
        assert message in error["error"]["message"], error


async def test_the_admin_tree_needs_the_token_and_is_absent_without_one(
        store: Store, admin_settings: Settings) -> None:
    upstream = MockUpstream()
    async with client_for(app(store, admin_settings, upstream)) as client:
        admin = Admin(client)
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": TOKEN}):
            error = await admin("GET", "/admin/accounts", status=401, headers=headers)
            assert error["error"]["code"] == "invalid_admin_token"
    no_token = replace(admin_settings, admin_token=None)
    async with client_for(app(store, no_token, upstream)) as client:
        for path in ("/admin/accounts", "/admin", "/admin/keys/lookup"):
            response = await client.get(path, headers=ADMIN)
            assert response.status_code == 404
    assert upstream.requests == 0  # never forwarded


async def test_credits_cannot_be_minted_with_a_management_key(
        store: Store, admin_settings: Settings) -> None:
    async with client_for(app(store, admin_settings)) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {"name": "acme"}, 201)
        mgmt = await admin("POST", "/admin/mgmt-keys", {"account_id": account["id"]}, 201)
        for path in (f"/admin/accounts/{account['id']}/credits", "/api/credits",
                     f"/api/accounts/{account['id']}/credits"):
            response = await client.post(path, json={"usd": 100, "reason": "free money"},
                                         headers=bearer(mgmt["key"]))
            assert response.status_code in (401, 404)
        assert (await admin("GET", f"/admin/accounts/{account['id']}"))["credits"] == 0


def test_the_admin_token_comes_from_the_env_or_a_file(tmp_path: Any) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text("from-a-mounted-secret-0123\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'admin_token_file = "{secret}"\n')
    assert Settings.load(str(config), env={}).admin_token == "from-a-mounted-secret-0123"
    env = {"GATEWAY_ADMIN_TOKEN": "from-the-environment-0123"}
    assert Settings.load(str(config), env=env).admin_token == "from-the-environment-0123"
    assert Settings.load(None, env={}).admin_token is None
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 16"):
        Settings.load(None, env={"GATEWAY_ADMIN_TOKEN": "short"})
    config.write_text(f'admin_token_file = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match="cannot read admin_token_file"):
        Settings.load(str(config), env={})


async def test_a_customer_sees_a_deleted_key_and_cannot_revive_it(
        store: Store, admin_settings: Settings) -> None:
    async with client_for(app(store, admin_settings)) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {"name": "acme"}, 201)
        mgmt = await admin("POST", "/admin/mgmt-keys", {"account_id": account["id"]}, 201)
        key = await admin("POST", "/admin/keys", {"account_id": account["id"], "name": "k",
                                                  "credit": True}, 201)
        await admin("DELETE", f"/admin/keys/{key['id']}")
        customer = {"Authorization": f"Bearer {mgmt['key']}"}
        listed = await client.get("/api/keys", headers=customer)
        check(listed)
        assert [k["deleted_at"] is not None for k in listed.json()] == [True]
        for method, path, body in (("PATCH", f"/api/keys/{key['id']}", {"isActive": True}),
                                   ("POST", f"/api/keys/{key['id']}/rotate", None)):
            response = await client.request(method, path, json=body, headers=customer)
            check(response)
            assert response.status_code == 409, response.text


def with_plan_budgets(settings: Settings) -> Settings:
    """'pro' with a budget window of its own, to tell a key's [] (none) from null (the
    plan's)."""
    from gateway.config.windows import parse_windows

    pro = replace(settings.plans["pro"], budgets=parse_windows(["50/30d"]))
    return replace(settings, plans={**settings.plans, "pro": pro})


async def test_the_operator_sets_the_limits_the_cli_sets(
        store: Store, admin_settings: Settings) -> None:
    settings = with_plan_budgets(admin_settings)
    async with client_for(app(store, settings)) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {
            "name": "acme", "rpm": 30, "tpm": 9000, "max_concurrent": 4,
            "budget_windows": ["100/30d/calendar", "10/1d"]}, 201)
        assert account["limits"] == {"rpm": 30, "tpm": 9000, "max_concurrent": 4,
                                     "budget_windows": ["100/30d/calendar", "10/1d"]}
        assert (await admin("GET", f"/admin/accounts/{account['id']}"))["limits"] == \
            account["limits"]
        plain = await admin("POST", "/admin/accounts", {"name": "plain", "rpm": None,
                                                        "budget_windows": []}, 201)
        assert plain["limits"] == {"rpm": None, "tpm": None, "max_concurrent": None,
                                   "budget_windows": []}

        key = await admin("POST", "/admin/keys", {
            "account_id": account["id"], "name": "k", "plan": "pro", "max_concurrent": 2,
            "models": ["llama*", " m "], "budget_windows": ["5/1d", "60/30d/calendar"]}, 201)
        assert (key["max_concurrent"], key["models"], key["budget_windows"]) == (
            2, ["llama*", "m"], ["5/1d", "60/30d/calendar"])
        assert key["overrides"] == {"rpm": None, "tpm": None, "models": ["llama*", "m"],
                                    "max_concurrent": 2,
                                    "budget_windows": ["5/1d", "60/30d/calendar"]}
        other = {"model": "qwen", "messages": CHAT["messages"], "max_tokens": 4}
        refused = await client.post("/v1/chat/completions", json=other,
                                    headers=bearer(key["key"]))
        assert refused.status_code == 403, refused.text  # its own models act at once
        follows = await admin("POST", "/admin/keys", {
            "account_id": account["id"], "name": "f", "plan": "pro", "max_concurrent": None,
            "models": None, "budget_windows": None}, 201)
        assert follows["budget_windows"] == ["50/30d"]  # the plan's
        assert follows["overrides"]["budget_windows"] is None
        none = await admin("POST", "/admin/keys", {"account_id": account["id"], "name": "n",
                                                   "plan": "pro", "budget_windows": []}, 201)
        assert none["budget_windows"] == [] and none["overrides"]["budget_windows"] == []
        credit = await admin("POST", "/admin/keys", {
            "account_id": account["id"], "name": "c", "credit": True, "max_concurrent": 1,
            "models": ["*"]}, 201)
        assert credit["max_concurrent"] == 1 and credit["models"] == ["*"]

        path = f"/admin/keys/{key['id']}"
        patched = await admin("PATCH", path, {"budget_windows": ["7/12h/calendar"]})
        assert patched["budget_windows"] == ["7/12h/calendar"]
        patched = await admin("PATCH", path, {"budget_windows": []})  # none of its own
        assert patched["budget_windows"] == [] and patched["overrides"]["budget_windows"] == []
        patched = await admin("PATCH", path, {"budget_windows": None})  # the plan's again
        assert patched["budget_windows"] == ["50/30d"]
        assert patched["overrides"]["budget_windows"] is None

        keys = [k["id"] for k in await admin("GET", f"/admin/keys?account={account['id']}")]
        create = {"account_id": account["id"], "name": "x", "plan": "pro"}
        for field, value in [
                ("max_concurrent", True), ("max_concurrent", "2"), ("max_concurrent", 0),
                ("max_concurrent", 100_001), ("max_concurrent", 2.0), ("models", []),
                ("models", "llama"), ("models", ["a,b"]), ("models", [1]), ("models", [""]),
                ("models", ["a*b"]), ("budget_windows", "5/1d"), ("budget_windows", [5]),
                ("budget_windows", ["5"]), ("budget_windows", ["5/0d"]),
                ("budget_windows", ["plan"]), ("budget_windows", ["none"]),
                ("budget_windows", ["1/1h", "2/2h", "3/3h", "4/4h", "5/5h"]),
                ("budget_windows", ["5/1d", "9/24h"]), ("rpm", True), ("rpm", "5")]:
            for method, where, body in (("POST", "/admin/keys", {**create, field: value}),
                                        ("PATCH", path, {field: value})):
                error = await admin(method, where, body, 400)
                assert field in error["error"]["message"], (method, field, value, error)
        for body in ({**create, "burst": 1}, {**create, "budget_window": ["5/1d"]}):
            error = await admin("POST", "/admin/keys", body, 400)
            assert "unknown field" in error["error"]["message"]
        await admin("PATCH", path, {"budget_window": ["5/1d"]}, 400)
        assert [k["id"] for k in await admin(
            "GET", f"/admin/keys?account={account['id']}")] == keys  # nothing made

        for field, value in [
                ("rpm", True), ("rpm", "30"), ("rpm", 0), ("tpm", 1.5),
                ("max_concurrent", False), ("max_concurrent", 100_001),
                ("budget_windows", "10/1d"), ("budget_windows", ["5"]),
                ("budget_windows", ["5/0d"]), ("budget_windows", ["1/1d", "1/1d/calendar",
                                                                  "1/2d", "1/3d", "1/4d"]),
                ("budget_windows", ["5/1d", "6/1d"])]:
            error = await admin("POST", "/admin/accounts", {"name": "bad", field: value}, 400)
            assert field in error["error"]["message"], (field, value, error)
            error = await admin("PATCH", f"/admin/accounts/{plain['id']}", {field: value}, 400)
            assert field in error["error"]["message"], (field, value, error)
        await admin("POST", "/admin/accounts", {"name": "bad", "models": ["m"]}, 400)
        assert await admin("GET", "/admin/accounts?name=bad") == []  # checked before made


def test_admin_key_create_takes_what_api_keys_takes_and_the_operators_limits() -> None:
    from gateway.http.management_body import CREATE_FIELDS
    from gateway.http.operator_body import KEY_LIMITS

    schemas = DOC["components"]["schemas"]
    assert set(schemas["KeyCreate"]["properties"]) == set(CREATE_FIELDS)
    assert set(schemas["AdminKeyCreate"]["properties"]) == {
        "account_id", *CREATE_FIELDS, *KEY_LIMITS}
    assert set(KEY_LIMITS) <= set(schemas["AdminKeyPatch"]["properties"])
    assert set(schemas["AccountCreate"]["properties"]) == {"name", *schemas[
        "AccountLimits"]["properties"]}
