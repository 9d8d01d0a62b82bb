"""[ledger]: the database URL from the environment or the config, strict keys, masked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.serve.cli import main


def test_the_ledger_is_off_without_a_database() -> None:
    settings = Settings.from_mapping({})
    assert settings.ledger.postgres_url is None
    assert settings.ledger.stream_cap == 0  # settle.lua appends nothing


def test_the_environment_wins_over_the_config() -> None:
    data = {"ledger": {"postgres_url": "postgresql://file@db/ledger",
                       "max_stream_entries": 500}}
    settings = Settings.from_mapping(data, env={"GATEWAY_POSTGRES_URL":
                                                "postgresql://env@db/ledger"})
    assert settings.ledger.postgres_url == "postgresql://env@db/ledger"
    assert settings.ledger.stream_cap == 500


@pytest.mark.parametrize(("table", "named"), [
    ({"postgres_url": "mysql://db/ledger"}, "postgresql://"),
    ({"postgres": "postgresql://db"}, "postgres"),
    ({"max_stream_entries": 0}, "max_stream_entries"),
    ({"max_stream_entries": "many"}, "max_stream_entries"),
])
def test_mistakes_are_named(table: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_mapping({"ledger": table})


def test_config_check_masks_the_database_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[ledger]\npostgres_url = "postgresql://gw:pg-secret-123@db:5432/ledger'
                      '?sslpassword=ssl-secret-456"\n')
    monkeypatch.delenv("GATEWAY_POSTGRES_URL", raising=False)
    assert main(["config", "check", "--config", str(config), "--json"]) == 0
    out = capsys.readouterr().out
    assert "pg-secret-123" not in out and "ssl-secret-456" not in out
    assert json.loads(out)["ledger"]["postgres_url"].startswith("postgresql://gw:***@db:5432")
