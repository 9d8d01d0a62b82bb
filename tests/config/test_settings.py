"""Settings: durations, amounts, rate bounds, plans, prices and the precedence of sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import Price, Settings
from gateway.config.units import (
    MAX_RATE,
    MAX_USD,
    check_rate,
    format_duration,
    parse_duration,
    usd_to_micro,
)
from gateway.errors import ConfigError


@pytest.mark.parametrize("text,seconds", [
    ("45s", 45), ("5m", 300), (" 2 h ", 7200), ("1d", 86_400), ("30d", 2_592_000),
])
def test_durations_parse_to_seconds(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0d", "0s", "-1d", "1.5h", "1w", "d", "", "30"])
def test_bad_durations_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds,text", [
    (86_400, "1d"), (2_592_000, "30d"), (7200, "2h"), (90_000, "25h"), (120, "2m"), (90, "90s"),
])
def test_durations_format_in_the_largest_exact_unit(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value,micro", [
    ("0", 0), (0, 0), ("0.000001", 1), ("1.5", 1_500_000), (20, 20_000_000),
    (MAX_USD, MAX_USD * 1_000_000),
])
def test_usd_amounts_become_exact_micro_usd(value: object, micro: int) -> None:
    assert usd_to_micro(value, "x") == micro


@pytest.mark.parametrize("value", ["abc", "-1", "NaN", "Infinity", "-Infinity", "1e10",
                                   str(MAX_USD + 1)])
def test_bad_usd_amounts_are_config_errors(value: str) -> None:
    with pytest.raises(ConfigError, match="amount for budget"):
        usd_to_micro(value, "budget")


@pytest.mark.parametrize("value", [1, 60, MAX_RATE])
def test_rates_within_bounds_are_kept(value: int) -> None:
    assert check_rate(value, "rpm") == value


@pytest.mark.parametrize("value", [0, -1, MAX_RATE + 1, True, 1.5, "60", None])
def test_rates_out_of_bounds_or_not_integers_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="rpm must be an integer between 1 and"):
        check_rate(value, "rpm")


def test_cost_is_rounded_up_to_the_micro_usd() -> None:
    price = Price(input=500_000, output=1_500_000)  # $0.50 and $1.50 per million tokens
    assert price.cost_micro(0, 0) == 0
    assert price.cost_micro(1, 0) == 1  # half a micro-dollar is billed as one
    assert price.cost_micro(2, 0) == 1
    assert price.cost_micro(1000, 1000) == 2000


def test_plan_overrides_keep_the_defaults_they_do_not_name() -> None:
    settings = Settings.from_mapping({"plans": {"pro": {"rpm": 500},
                                                "standard": {"tpm": 5000, "price_usdc": "25"},
                                                "team": {"rpm": 10, "tpm": 20}}})
    pro = settings.plans["pro"]
    assert (pro.name, pro.price_usdc, pro.rpm, pro.tpm) == ("Pro", "60", 500, 13333)
    team = settings.plans["team"]
    assert (team.name, team.price_usdc, team.rpm, team.tpm) == ("Team", "0", 10, 20)
    standard = settings.plans["standard"]
    assert (standard.name, standard.price_usdc, standard.rpm, standard.tpm) == (
        "Standard", "25", 60, 5000)
    with pytest.raises(ConfigError, match=r"plans\.solo\.tpm"):
        Settings.from_mapping({"plans": {"solo": {"rpm": 10}}})


def test_credit_rates_and_model_prices() -> None:
    settings = Settings.from_mapping({
        "credit": {"rpm": 7, "tpm": 900},
        "pricing": {"default": {"input": 1, "output": 2},
                    "models": {"Big-Model": {"input": "3", "output": "4.5"}}},
    })
    assert (settings.credit_rpm, settings.credit_tpm) == (7, 900)
    assert settings.price_for("Big-Model") == Price(3_000_000, 4_500_000)
    assert settings.price_for("big-model") == Price(1_000_000, 2_000_000)
    assert settings.price_for(None) == Price(1_000_000, 2_000_000)
    assert Settings.from_mapping({}).credit_tpm == 3333


@pytest.mark.parametrize("data,message", [
    ({"max_body_bytes": 0}, "max_body_bytes must be an integer between 1"),
    ({"default_max_tokens": 0}, "default_max_tokens must be an integer between 1"),
    ({"max_output_tokens": True}, "max_output_tokens must be an integer between 1"),
    ({"max_output_tokens": 10, "default_max_tokens": 10}, "set max_output_tokens only"),
    ({"on_insufficient": "partial"}, "on_insufficient must be 'clamp' or 'reject'"),
    ({"pricing": {"unknown_models": "free"}}, "pricing.unknown_models must be"),
    ({"pricing": {"models": {"m": {"input": 1, "output": 1, "max_output": 5}}}},
     "pricing.models.m has unknown field"),
    ({"pricing": {"models": {"m": {"input": 1, "output": 1, "max_output_tokens": 0}}}},
     "pricing.models.m.max_output_tokens must be"),
    ({"routes": {"/v1/x": {"kind": "magic"}}}, "kind must be one of"),
    ({"routes": {"v1/x": {"kind": "chat"}}}, "named by a path"),
    ({"routes": {"/v1/x": {"kind": "chat", "price": 1}}}, "unknown field"),
    ({"public_paths": "/health"}, "public_paths must be a list"),
    ({"media_part_tokens": -1}, "media_part_tokens must be"),
    ({"api_plan_keys": "yes"}, "api_plan_keys must be true or false"),
    ({"api_plan_keys": 1}, "api_plan_keys must be true or false"),
    ({"fail_mode": "half"}, "fail_mode must be"),
])
def test_bad_values_are_config_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping(data)


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('redis_url = "redis://file:6379"\nfail_mode = "closed"\n'
                      'redis_timeout = 1.5\nlog_level = "warning"\n')
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_REDIS_URL": "redis://env:6379",
           "GATEWAY_FAIL_MODE": "open", "GATEWAY_REDIS_TIMEOUT": "0.5",
           "GATEWAY_LOG_LEVEL": "debug"}
    settings = Settings.load(env=env)
    assert settings.redis_url == "redis://env:6379"
    assert settings.fail_mode == "open"
    assert settings.redis_timeout_seconds == 0.5
    assert settings.log_level == "debug"
    from_file = Settings.load(env={"GATEWAY_CONFIG": str(config)})
    assert from_file.redis_url == "redis://file:6379"
    assert (from_file.fail_mode, from_file.redis_timeout_seconds) == ("closed", 1.5)
    assert Settings.load(env=env, redis_url="redis://flag:6379").redis_url == "redis://flag:6379"


def test_a_config_path_argument_wins_over_gateway_config(tmp_path: Path) -> None:
    chosen, other = tmp_path / "chosen.toml", tmp_path / "other.toml"
    chosen.write_text('fail_mode = "open"\n')
    other.write_text('fail_mode = "closed"\n')
    settings = Settings.load(str(chosen), env={"GATEWAY_CONFIG": str(other)})
    assert settings.fail_mode == "open"


def test_unreadable_or_invalid_config_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(str(tmp_path / "missing.toml"), env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("fail_mode = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Settings.load(str(broken), env={})


@pytest.mark.parametrize(("table", "named", "suggested"), [
    ({"plan": {"standard": {"rpm": 1}}}, "'plan'", "'plans'"),
    ({"plans": {"standard": {"rmp": 10}}}, "'rmp' in [plans.standard]", "'rpm'"),
    ({"fail-mode": "open"}, "'fail-mode'", "'fail_mode'"),
    ({"redis_timout": 1}, "'redis_timout'", "'redis_timeout'"),
    ({"credit": {"rpn": 1}}, "'rpn' in [credit]", "'rpm'"),
    ({"pricing": {"defualt": {"input": 1, "output": 1}}}, "'defualt' in [pricing]",
     "'default'"),
])
def test_a_mistyped_setting_is_named_with_its_closest_valid_key(
        table: dict[str, object], named: str, suggested: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_mapping(table)
    assert named in str(refused.value) and f"did you mean {suggested}?" in str(refused.value)


def test_the_readmes_configuration_reference_is_accepted_whole() -> None:
    """Every key the README documents is one the gateway reads (and none is refused)."""
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    settings = Settings.from_mapping(tomllib.loads(block.group(1)))
    assert settings.plans["standard"].rpm == 60
