"""Account limits and a key's own in-flight limit from the command line and the operator
API (issue 16): set, shown, removed; bad values one clear line or a 400."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.serve.cli import main
from gateway.store import Store
from tests.conftest import client_for, gateway
from tests.http.test_operator_api import TOKEN, Admin


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.startswith(("{", "[")) else out), err


def test_accounts_create_and_update_set_and_remove_limits(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--redis", redis_url, "--json"]
    code, account, _ = run(capsys, "accounts", "create", "--name", "limited", "--rpm", "600",
                           "--max-concurrent", "16", "--budget-window", "100/30d/calendar",
                           *common)
    assert code == 0
    assert account["limits"] == {"rpm": 600, "tpm": None, "max_concurrent": 16,
                                 "budget_windows": ["100/30d/calendar"]}
    code, account, _ = run(capsys, "accounts", "update", "limited", "--tpm", "90000",
                           "--rpm", "none", "--budget-window", "5/1d", "--budget-window",
                           "50/7d", *common)
    assert code == 0
    assert account["limits"] == {"rpm": None, "tpm": 90000, "max_concurrent": 16,
                                 "budget_windows": ["5/1d", "50/7d"]}
    code, text, _ = run(capsys, "accounts", "show", "limited", "--redis", redis_url)
    assert "limits: tpm 90000  max_concurrent 16  budgets 5/1d, 50/7d" in text
    code, account, _ = run(capsys, "accounts", "update", "limited", "--budget-window", "none",
                           *common)
    assert code == 0 and account["limits"]["budget_windows"] == []
    for bad in (["--rpm", "0"], ["--tpm", "lots"], ["--max-concurrent", "-1"], [],
                ["--max-concurrent", "\u0663"], ["--rpm", "1_000"], ["--tpm", "\uff15"],
                ["--budget-window", "5"], ["--budget-window", "5/1d", "--budget-window",
                                           "6/1d"]):
        code, _, err = run(capsys, "accounts", "update", "limited", *bad, *common)
        assert code != 0 and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(capsys, "accounts", "update", "nobody-here", "--rpm", "5", *common)
    assert code != 0 and "nobody-here" in err


def test_keys_create_and_update_max_concurrent(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--redis", redis_url, "--json"]
    code, key, _ = run(capsys, "keys", "create", "--name", "k", "--plan", "pro",
                       "--max-concurrent", "4", *common)
    assert code == 0
    assert key["max_concurrent"] == 4 and key["overrides"]["max_concurrent"] == 4
    code, key, _ = run(capsys, "keys", "update", key["id"], "--max-concurrent", "plan",
                       *common)
    assert code == 0
    assert key["max_concurrent"] is None and key["overrides"]["max_concurrent"] is None
    code, key, _ = run(capsys, "keys", "update", key["id"], "--budget-window", "2/1d",
                       "--budget-window", "20/30d/calendar", *common)
    assert code == 0
    assert key["budget_windows"] == key["overrides"]["budget_windows"] == [
        "2/1d", "20/30d/calendar"]
    code, key, _ = run(capsys, "keys", "update", key["id"], "--budget-window", "plan", *common)
    assert code == 0 and key["overrides"]["budget_windows"] is None
    for bad in ("0", "x", "100001", "\u0663", "1_0"):
        code, _, err = run(capsys, "keys", "update", key["id"], "--max-concurrent", bad,
                           *common)
        assert code != 0 and "max_concurrent" in err and "Traceback" not in err


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_the_operator_api_sets_account_limits_and_key_models(
        store: Store, settings: Settings) -> None:
    admin_settings = replace(settings, admin_token=TOKEN)
    app = gateway(MockUpstream(), store, admin_settings, Metrics.create(CollectorRegistry()))
    async with client_for(app) as client:
        admin = Admin(client)
        account = await admin("POST", "/admin/accounts", {"name": "api-limits"}, 201)
        assert account["limits"] == {"rpm": None, "tpm": None, "max_concurrent": None,
                                     "budget_windows": []}
        path = f"/admin/accounts/{account['id']}"
        changed = await admin("PATCH", path, {"rpm": 30, "max_concurrent": 2,
                                              "budget_windows": ["100/30d"]})
        assert changed["limits"] == {"rpm": 30, "tpm": None, "max_concurrent": 2,
                                     "budget_windows": ["100/30d"]}
        assert (await admin("GET", path))["limits"] == changed["limits"]
        changed = await admin("PATCH", path, {"rpm": None})
        assert changed["limits"]["rpm"] is None
        for bad in ({"rpm": 0}, {"rpm": "5"}, {"max_concurrent": True}, {}, {"burst": 1},
                    {"budget_windows": "100/30d"}, {"budget_windows": ["100"]},
                    {"budget_windows": [5]}):
            error = await admin("PATCH", path, bad, 400)
            assert error["error"]["code"] == "invalid_request"
        await admin("PATCH", "/admin/accounts/00000000-0000-4000-8000-000000000000",
                    {"rpm": 5}, 404)
        key = await admin("POST", "/admin/keys", {"account_id": account["id"], "name": "k",
                                                  "plan": "pro"}, 201)
        patched = await admin("PATCH", f"/admin/keys/{key['id']}",
                              {"models": ["llama*"], "max_concurrent": 3})
        assert patched["models"] == ["llama*"] and patched["max_concurrent"] == 3
        patched = await admin("PATCH", f"/admin/keys/{key['id']}",
                              {"models": None, "max_concurrent": None})
        assert patched["overrides"]["models"] is None and patched["max_concurrent"] is None
        for bad in ({"models": []}, {"models": "llama"}, {"models": ["a,b"]},
                    {"max_concurrent": 0}):
            await admin("PATCH", f"/admin/keys/{key['id']}", bad, 400)
