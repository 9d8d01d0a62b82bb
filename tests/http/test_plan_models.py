"""Plans that list models (issue 16, item 1): enforced in admit.lua, on Redis and on the
cluster; a key's own list wins over its plan's; /api/plans shows them."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.errors import ConfigError
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.conftest import bearer, client_for, gateway, new_key

PLANS = {"plans": {"pro": {"rpm": 1000, "tpm": 10_000_000, "models": ["tiny", "qwen*"]},
                   "open": {"rpm": 1000, "tpm": 10_000_000}}}


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings() -> Settings:
    return dataclasses.replace(Settings.from_mapping(PLANS), api_plan_keys=True)


def chat(model: str | None) -> dict[str, object]:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 4}
    if model is not None:
        body["model"] = model
    return body


async def statuses(store: Store, settings: Settings, metrics: Metrics, secret: str,
                   models: list[str | None]) -> list[int]:
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        out = []
        for model in models:
            response = await client.post("/v1/chat/completions", json=chat(model),
                                         headers=bearer(secret))
            if response.status_code == 403:
                assert response.json()["error"]["code"] == "model_not_allowed"
            out.append(response.status_code)
        return out


async def test_a_plan_admits_only_its_models(store: Store, settings: Settings,
                                             metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings, plan="pro")
    assert await statuses(store, settings, metrics, secret,
                          ["tiny", "qwen-7b", "qwen", "tiny2", "llama-3.1-8b", "Tiny", None,
                           "\x01"]) == [200, 200, 200, 403, 403, 403, 403, 403]
    # A refusal takes nothing: neither the request bucket nor the budget moved.
    record = await store.get_key(key_id)
    assert record.spent == record.total_spent
    open_secret, _, _ = await new_key(store, settings, plan="open")
    assert await statuses(store, settings, metrics, open_secret,
                          ["anything", None]) == [200, 200]


async def test_a_keyed_request_that_is_not_inference_is_not_checked(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, plan="pro")
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        response = await client.get("/v1/models", headers=bearer(secret))
    assert response.status_code != 403


async def test_a_keys_own_models_win_and_plan_gives_them_back(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, key_id, _ = await new_key(store, settings, plan="pro")
    record = await update_key(store, settings, key_id, ChangeSpec(models="llama*, tiny"))
    assert record.models == ("llama*", "tiny")
    assert await statuses(store, settings, metrics, secret,
                          ["llama-3.1-8b", "tiny", "qwen-7b"]) == [200, 200, 403]
    await update_key(store, settings, key_id, ChangeSpec(models="*"))
    assert await statuses(store, settings, metrics, secret, ["qwen-7b", None]) == [200, 200]
    record = await update_key(store, settings, key_id, ChangeSpec(models="plan"))
    assert record.models is None
    assert await statuses(store, settings, metrics, secret,
                          ["qwen-7b", "llama-3.1-8b"]) == [200, 403]


async def test_a_plan_edited_in_the_config_reaches_its_keys_at_once(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings, plan="pro")
    assert await statuses(store, settings, metrics, secret, ["llama-3.1-8b"]) == [403]
    edited = Settings.from_mapping({"plans": {"pro": {"rpm": 1000, "tpm": 10_000_000,
                                                      "models": ["llama*"]}}})
    assert await statuses(store, edited, metrics, secret,
                          ["llama-3.1-8b", "tiny"]) == [200, 403]


@pytest.mark.parametrize("models", [["a,b"], ["*x"], ["q*w*"], [""], ["a\nb"], "tiny", [3]])
def test_bad_model_lists_are_config_errors(models: object) -> None:
    with pytest.raises(ConfigError, match="models"):
        Settings.from_mapping({"plans": {"pro": {"models": models}}})


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_the_plan_catalog_and_the_key_show_the_models(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    from gateway.http.admin import key_json

    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        plans = (await client.get("/api/plans")).json()
    assert {p["slug"]: p["models"] for p in plans} == {"pro": ["tiny", "qwen*"], "open": []}
    _, key_id, _ = await new_key(store, settings, plan="pro")
    doc = key_json(await store.get_key(key_id), settings)
    assert doc["models"] == ["tiny", "qwen*"] and doc["overrides"]["models"] is None


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_the_cli_gives_a_key_its_own_models(
        store: Store, settings: Settings, metrics: Metrics, redis_url: str,
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from pathlib import Path

    from gateway.serve.cli import main

    config = Path(str(tmp_path)) / "gateway.toml"
    config.write_text('[plans.pro]\nrpm = 1000\ntpm = 10000000\nmodels = ["tiny"]\n')
    common = ["--redis", redis_url, "--config", str(config), "--json"]
    def cli(*argv: str) -> int:
        return main([*argv, *common])

    assert await asyncio.to_thread(cli, "keys", "create", "--name", "k", "--plan", "pro",
                                   "--models", "llama*") == 0
    created = json.loads(capsys.readouterr().out)
    assert created["models"] == ["llama*"] and created["overrides"]["models"] == ["llama*"]
    assert await statuses(store, settings, metrics, created["key"],
                          ["llama-3.1-8b", "tiny"]) == [200, 403]
    assert await asyncio.to_thread(cli, "keys", "update", created["id"], "--models",
                                   "plan") == 0
    assert json.loads(capsys.readouterr().out)["models"] == ["tiny"]
    assert await asyncio.to_thread(cli, "keys", "update", created["id"], "--models",
                                   "a,,b") == 1
    assert "models" in capsys.readouterr().err
