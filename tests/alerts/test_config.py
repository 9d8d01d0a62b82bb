"""[alerts] and [[alerts.webhooks]]: defaults, strict checks, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.alerts import EVENT_TYPES
from gateway.config.settings import Settings
from gateway.config.view import effective_settings
from gateway.errors import ConfigError
from gateway.serve.cli import main

HOOK = {"url": "https://bob:hunter2-password@hooks.example.com/g?token=abc123", "secret":
        "s3cret-s3cret-s3cret"}


def test_defaults_and_a_full_table() -> None:
    off = Settings.from_mapping({}).alerts
    assert not off.enabled and off.thresholds_ppm == (800_000, 1_000_000)
    assert off.sender == "serve"
    assert Settings.from_mapping({"alerts": {"sender": "none"}}).alerts.sender == "none"
    alerts = Settings.from_mapping({"alerts": {
        "budget_thresholds": [1.0, 0.5], "credits_low_usd": 5, "expiring_within": "7d",
        "webhooks": [HOOK, {**HOOK, "events": ["credits.low"]}]}}).alerts
    assert alerts.enabled and alerts.thresholds_ppm == (500_000, 1_000_000)
    assert alerts.credits_low_micro == 5_000_000 and alerts.expiring_within == 7 * 86400
    assert alerts.webhooks[0].events == EVENT_TYPES
    assert alerts.webhooks[1].events == ("credits.low",)
    assert HOOK["secret"] not in repr(alerts) and "hunter2" not in repr(alerts)


@pytest.mark.parametrize(("table", "message"), [
    ({"budget_threshold": [0.8]}, "did you mean 'budget_thresholds'"),
    ({"budget_thresholds": [0]}, "above 0"),
    ({"budget_thresholds": [1.5]}, "at most 1"),
    ({"credits_low_usd": "-1"}, "invalid amount"),
    ({"expiring_within": "3 days"}, "invalid duration"),
    # Each message names the setting, and nothing that would never fire is taken.
    ({"expiring_within": "3x"}, r"^alerts\.expiring_within: invalid duration '3x'"),
    ({"give_up_after": "0d"}, r"^alerts\.give_up_after: invalid duration '0d'"),
    ({"give_up_after": "99999d"}, r"^alerts\.give_up_after: duration '99999d'"),
    ({"budget_thresholds": [0.0000001]}, r"rounds to 0 parts per million"),
    ({"budget_thresholds": [0.0000004, 0.8]}, r"use at least 0\.000001"),
    ({"webhooks": {"url": "https://h/", "secret": "s" * 16}},
     r"must be a list of tables \(\[\[alerts\.webhooks\]\]\)"),
    ({"webhooks": [{"url": "https://h/", "secret": "s" * 16}] * 17}, "at most 16"),
    ({"sender": "off"}, r"alerts\.sender must be \"serve\" .* or \"none\""),
    ({"sender": "None"}, "alerts.sender must be"),
    ({"sender": " serve"}, "alerts.sender must be"),
    ({"sender": False}, "alerts.sender must be"),
    ({"senders": "none"}, "did you mean 'sender'"),
    ({"webhooks": [{"url": "ftp://x/", "secret": "s" * 16}]}, "http:// or https://"),
    ({"webhooks": [{"url": "https://h/", "secret": "short"}]}, "at least 16"),
    ({"webhooks": [{"url": "https://h/", "secret": "s" * 16, "events": ["key.gone"]}]},
     "events must be"),
    ({"webhooks": [{"url": "https://h/", "secret": "s" * 16, "event": []}]},
     "did you mean 'events'"),
])
def test_mistakes_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping({"alerts": table})


def test_the_smallest_threshold_is_one_part_per_million() -> None:
    alerts = Settings.from_mapping({"alerts": {"budget_thresholds": [0.000001, 1]}}).alerts
    assert alerts.thresholds_ppm == (1, 1_000_000)


def test_a_bad_url_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"alerts": {"webhooks": [{"url": "gopher://u:pw-xyz@h/",
                                                        "secret": "s" * 16}]}})
    assert "pw-xyz" not in str(caught.value)


def test_config_check_masks_the_secret_and_the_urls_credentials(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = effective_settings(Settings.from_mapping({"alerts": {"webhooks": [HOOK],
                                                               "credits_low_usd": 5}}))
    assert doc["alerts"]["webhooks"][0]["secret"] == "***"
    assert doc["alerts"]["credits_low_usd"] == 5.0
    config = tmp_path / "gateway.toml"
    config.write_text(f'[alerts]\ncredits_low_usd = 5\n[[alerts.webhooks]]\n'
                      f'url = "{HOOK["url"]}"\nsecret = "{HOOK["secret"]}"\n')
    for extra in ([], ["--json"]):
        assert main(["config", "check", "--config", str(config), *extra]) == 0
        out = capsys.readouterr().out
        assert "hooks.example.com" in out
        assert HOOK["secret"] not in out and "hunter2" not in out and "abc123" not in out


SLACK = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"


def test_config_check_shows_a_webhook_url_without_its_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Slack-style URL carries its credential in the path: only scheme://host[:port]."""
    hooks = [{"url": SLACK, "secret": "s" * 16},
             {"url": "http://u:pw@10.0.0.7:8080/hook/abc?x=1", "secret": "s" * 16}]
    doc = effective_settings(Settings.from_mapping({"alerts": {"webhooks": hooks}}))
    assert [h["url"] for h in doc["alerts"]["webhooks"]] == [
        "https://hooks.slack.com/***", "http://10.0.0.7:8080/***"]
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[alerts.webhooks]]\nurl = "{SLACK}"\nsecret = "{"s" * 16}"\n')
    for extra in ([], ["--json"]):
        assert main(["config", "check", "--config", str(config), *extra]) == 0
        out = capsys.readouterr().out
        assert "https://hooks.slack.com/***" in out
        assert "XXXXSECRETXXXX" not in out and "T000" not in out
