"""`gateway config check`: the effective settings, secrets masked, mistakes one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.view import mask_url
from gateway.serve.cli import main

CONFIG = """\
redis_url = "rediss://app:redis-password-123@cache.internal:6380/2?ssl_cert_reqs=none"
metrics_token = "metrics-token-0123456789"
[upstream]
url = "http://vllm:8000"
api_key = "upstream-key-0123456789"
[plans.gold]
rpm = 5
tpm = 500
[pricing.models."llama-3-8b"]
input = 0.1
output = 0.2
"""
SECRETS = ("redis-password-123", "metrics-token-0123456789", "upstream-key-0123456789",
           "admin-token-0123456789")


def test_config_check_prints_the_effective_settings_with_secrets_masked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", SECRETS[3])
    assert main(["config", "check", "--config", str(config), "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert not any(secret in out for secret in SECRETS)
    assert doc["redis_url"] == ("rediss://app:***@cache.internal:6380/2"
                                "?ssl_cert_reqs=none")
    assert doc["metrics_token"] == doc["upstream_api_key"] == doc["admin_token"] == "***"
    assert list(doc["plans"]) == ["gold"]  # the config's plans replace the built-in ones
    assert doc["plans"]["gold"]["rpm"] == 5
    assert doc["model_prices"]["llama-3-8b"] == {"input_usd_per_million": 0.1,
                                                 "output_usd_per_million": 0.2}
    assert main(["config", "check", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("configuration is valid")
    assert "  plans.gold.tpm = 500" in text.splitlines()
    assert not any(secret in text for secret in SECRETS)


@pytest.mark.parametrize("body, message", [
    ("redis_timout = 1\n", "did you mean 'redis_timeout'"),
    ("[plan.standard]\nrpm = 1\n", "did you mean 'plans'"),
    ("[plans.gold]\nrpm = 0\ntpm = 1\n", "plans.gold.rpm must be"),
    ("redis_timeout = -1\n", "redis_timeout"),
    ("this is not toml", "not valid TOML"),
])
def test_config_check_names_the_mistake_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(body)
    assert main(["config", "check", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("url, masked", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://pw@h", "redis://***@h"),
    ("redis+sentinel://h:26379/mymaster?sentinel_password=sp",
     "redis+sentinel://h:26379/mymaster?sentinel_password=***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_urls_lose_their_passwords(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("body, message", [
    ("redis_url = 123\n", "redis_url must be a string"),
    ('redis_url = "http://cache:6379"\n', "redis"),
    ('redis_url = "redis://cache:99999999"\n', "port"),
    ('[upstream]\nurl = "ftp://inference:8000"\n', "upstream.url"),
])
def test_config_check_refuses_what_serve_would(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(body)
    assert main(["config", "check", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_secrets_in_an_upstream_query_are_masked_too() -> None:
    assert mask_url("https://u:pw@host/v1?api_key=K1&token=T1&model=m") == (
        "https://u:***@host/v1?api_key=***&token=***&model=m")
