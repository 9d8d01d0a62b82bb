"""Config values of the wrong type or sign are one-line ConfigErrors, never tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.serve.cli import main


@pytest.mark.parametrize("data", [
    {"redis_timeout": "soon"},
    {"redis_timeout": -1},
    {"redis_timeout": 0},
    {"auth_cache_seconds": "5s"},
    {"auth_cache_seconds": -5},
    {"credit": 5},
    {"pricing": 5},
    {"pricing": {"models": [1]}},
    {"plans": ["pro"]},
])
def test_bad_values_are_config_errors(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_mapping(data)


def test_a_bad_timeout_in_the_environment_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Settings.load(env={"GATEWAY_REDIS_TIMEOUT": "soon"})


def test_the_cli_reports_a_bad_timeout_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('redis_timeout = "soon"\n')
    code = main(["plans", "--config", str(config)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("gateway: error: ") and err.count("\n") == 1
