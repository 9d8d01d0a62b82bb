"""gateway ledger export refuses settings that would make it spin, never measure its lag,
or crash on its metrics port (QA: --interval -1 sent 244 000 Redis commands in 5 s)."""

from __future__ import annotations

import pytest

from gateway.serve.cli import main


@pytest.mark.parametrize("flag,value", [
    ("--interval", "-1"), ("--interval", "0"), ("--interval", "nan"),
    ("--lag-interval", "nan"), ("--lag-interval", "inf"), ("--claim-after", "-5"),
    ("--metrics-port", "99999"), ("--metrics-port", "-1"),
    ("--metrics-port", "\uff19\uff11\uff10\uff18"),  # full-width digits
    ("--consumer", ""), ("--consumer", "a\nb"),
])
def test_bad_export_flags_are_usage_errors(flag: str, value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["ledger", "export", flag, value, "--postgres", "postgresql://gw@db/ledger"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.splitlines()) == 1


def test_an_empty_postgres_flag_is_not_read_as_the_environment(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_POSTGRES_URL", "postgresql://gw@127.0.0.1:1/ledger")
    assert main(["ledger", "migrate", "--postgres", ""]) == 1
    assert "--postgres is empty" in capsys.readouterr().err
