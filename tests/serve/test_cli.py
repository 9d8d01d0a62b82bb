"""The `gateway` command against a private redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import uvicorn

from gateway.serve.cli import main
from gateway.serve.serving import create_app
from gateway.store import Store, connect
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import free_port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_account_and_key_lifecycle(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "accounts", "create", "--name", "acme", "--redis", redis_url,
                       "--json")
    assert code == 0
    account = json.loads(out)
    assert account["name"] == "acme" and account["credits"] == 0

    code, out, _ = run(capsys, "accounts", "add-credits", account["id"], "12.5", "--json",
                       "--redis", redis_url)
    assert json.loads(out)["credits"] == 12.5

    code, out, _ = run(capsys, "keys", "create", "--account", account["id"], "--name", "prod",
                       "--plan", "pro", "--budget", "10", "--budget-duration", "7d", "--json",
                       "--redis", redis_url)
    key = json.loads(out)
    assert key["key"].startswith("sk_live_") and len(key["key"]) >= 8 + 32
    assert key["type"] == "subscription" and key["plan"] == "pro"
    assert key["rate_limits"] == {"rpm": 200, "tpm": 13333}
    assert key["budget"]["limit"] == 10.0 and key["budget"]["duration"] == "7d"
    assert key["expires_at"] is not None

    code, out, _ = run(capsys, "keys", "show", key["id"], "--json", "--redis", redis_url)
    shown = json.loads(out)
    assert "key" not in shown  # the secret is shown once, at creation
    assert key["key"] not in out

    code, out, _ = run(capsys, "keys", "deactivate", key["id"], "--redis", redis_url, "--json")
    assert json.loads(out)["is_active"] is False
    code, out, _ = run(capsys, "keys", "list", "--redis", redis_url, "--json")
    assert [k["id"] for k in json.loads(out)] == [key["id"]]


def test_keys_create_without_account_uses_default(redis_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys", "create", "--name", "c", "--credit", "--json",
                       "--redis", redis_url)
    assert code == 0
    first = json.loads(out)
    assert first["type"] == "credit" and first["plan"] is None and first["expires_at"] is None
    code, out, _ = run(capsys, "keys", "create", "--name", "d", "--plan", "standard", "--json",
                       "--redis", redis_url)
    assert json.loads(out)["account_id"] == first["account_id"]


@pytest.mark.parametrize("argv, message", [
    (["keys", "create", "--name", "x", "--plan", "gold"], "unknown plan 'gold'"),
    (["keys", "create", "--name", "x", "--plan", "pro", "--budget-duration", "3w"],
     "invalid duration"),
    (["keys", "create", "--name", "x", "--plan", "pro", "--budget", "ten"], "invalid amount"),
    (["keys", "create", "--name", "x", "--plan", "pro", "--rpm", "0"], "rpm must be"),
    (["keys", "create", "--name", "x", "--credit", "--expires-in", "1d"], "do not expire"),
    (["keys", "show", "00000000-0000-0000-0000-000000000000"], "no key with id"),
    (["keys", "deactivate", "nope"], "no key with id"),
    (["accounts", "add-credits", "nope", "5"], "no account with id"),
    (["accounts", "add-credits", "nope", "-5"], "no account with id or name 'nope'"),
    (["accounts", "add-credits", "nope", "0"], "must not be zero"),
    (["accounts", "add-credits", "nope", "1x"], "invalid amount"),
    (["keys", "update", "nope", "--rpm", "5"], "no key with id"),
    (["keys", "renew", "nope"], "no key with id"),
    (["keys", "rotate", "nope"], "no key with id"),
    (["keys", "delete", "nope"], "no key with id"),
    (["keys", "list", "--account", "nope"], "no account with id or name"),
    (["serve", "--upstream", "ftp://inference:8000"], "must be http:// or https://"),
    (["serve", "--upstream", "http://"], "has no host"),
    (["serve", "--upstream", "http://localhost:99999"], "--upstream: Port out of range"),
])
def test_bad_input_is_one_clear_line(redis_url: str, capsys: pytest.CaptureFixture[str],
                                     argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv, "--redis", redis_url)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and message in err, err


def test_redis_down_is_one_clear_line(tmp_path: object,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "list", "--redis", f"unix://{tmp_path}/none.sock")
    assert code == 1
    assert err.startswith("gateway: error: cannot reach Redis") and err.count("\n") == 1
    code, _, err = run(capsys, "keys", "list", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 1 and err.startswith("gateway: error: cannot reach Redis")
    assert "ssl_ca_certs" not in err  # the TLS hint is for rediss:// URLs only


def test_no_redis_configured_and_bad_config(tmp_path: object,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "keys", "list")
    assert code == 1 and "no Redis configured" in err
    bad = f"{tmp_path}/bad.toml"
    with open(bad, "w") as handle:
        handle.write("fail_mode = 'sideways'\n")
    code, _, err = run(capsys, "plans", "--config", bad)
    assert code == 1 and "fail_mode" in err


def test_plans_json_matches_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plans", "--json")
    assert code == 0
    assert json.loads(out)[1] == {"slug": "pro", "name": "Pro", "priceUsdc": "60",
                                  "rateLimits": {"tpm_limit": 13333, "rpm_limit": 200}}


def test_python_dash_m_gateway_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "plans"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and "standard" in result.stdout


def test_usage_mistakes_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys", "create", "--plan", "pro"],
                 ["keys", "create", "--name", "x", "--plan", "pro", "--credit"],
                 ["keys", "create", "--name", "x", "--plan", "pro", "--rpm", "abc"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        _, err = capsys.readouterr()
        assert exited.value.code == 2
        assert err.count("\n") == 1 and "error:" in err


def test_huge_credit_amounts_are_refused(redis_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "accounts", "create", "--name", "big", "--json",
                       "--redis", redis_url)
    account = json.loads(out)["id"]
    code, _, err = run(capsys, "accounts", "add-credits", account, "9300000000000",
                       "--redis", redis_url)
    assert code == 1 and "maximum" in err


SERVE_ENV = ("GATEWAY_UPSTREAM", "GATEWAY_UPSTREAM_API_KEY", "GATEWAY_REDIS_URL",
             "GATEWAY_CONFIG", "GATEWAY_LOG_LEVEL", "GATEWAY_LOG_FORMAT", "GATEWAY_FAIL_MODE")


def test_serve_hands_its_options_to_the_worker_apps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in SERVE_ENV:
        monkeypatch.setenv(name, "")  # _serve sets them; monkeypatch restores them after
    config = tmp_path / "gateway.toml"
    config.write_text('fail_mode = "open"\nlog_level = "warning"\nlog_format = "text"\n')
    runs: list[dict[str, Any]] = []

    def fake_run(app: str, **kwargs: Any) -> None:  # what a worker builds, without serving
        built = create_app()
        runs.append({"app": app, **kwargs, "built": built})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    code, _, err = run(capsys, "serve", "--upstream", "http://127.0.0.1:9", "--redis",
                       "redis://127.0.0.1:1/0", "--config", str(config),
                       "--upstream-api-key", "sk-upstream", "--log-level", "debug",
                       "--log-format", "json", "--port", "8099",
                       # a free port: the default 9464 may be another run's
                       "--metrics-port", str(free_port()))
    assert (code, err) == (0, "")
    [started] = runs
    assert (started["app"], started["factory"], started["port"], started["workers"]) == (
        "gateway.serve.serving:create_app", True, 8099, 1)
    assert started["log_level"] == "debug"  # the flag wins over the file
    built = started["built"]
    assert built.settings.fail_mode == "open"  # the workers read the same config file
    assert built.settings.redis_url == "redis://127.0.0.1:1/0"
    assert (built.settings.log_level, built.settings.log_format) == ("debug", "json")
    assert isinstance(built.app, UpstreamProxy)
    assert built.app._auth == (b"authorization", b"Bearer sk-upstream")


def test_serve_reads_its_upstream_from_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in SERVE_ENV:
        monkeypatch.setenv(name, "")
    config = tmp_path / "gateway.toml"
    config.write_text('[upstream]\nurl = "http://127.0.0.1:9"\napi_key = "sk-from-file"\n')
    built: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: built.append(create_app()))
    code, _, err = run(capsys, "serve", "--redis", "redis://127.0.0.1:1/0", "--config",
                       str(config), "--metrics-port", "0")
    assert (code, err) == (0, "")
    [app] = built
    assert app.settings.upstream_url == "http://127.0.0.1:9"
    assert app.app._auth == (b"authorization", b"Bearer sk-from-file")
    assert "sk-from-file" not in repr(app.settings)  # a secret never in a repr or a log


def test_serve_without_an_upstream_says_so_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in SERVE_ENV:
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("started"))
    code, _, err = run(capsys, "serve", "--redis", "redis://127.0.0.1:1/0")
    assert code == 1
    assert err.startswith("gateway: error: gateway serve needs an upstream")
    assert err.count("\n") == 1


def test_serve_refuses_zero_workers_before_starting(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("started"))
    code, _, err = run(capsys, "serve", "--upstream", "http://127.0.0.1:9", "--redis",
                       "redis://127.0.0.1:1/0", "--workers", "0")
    assert code == 1
    assert err == "gateway: error: --workers must be at least 1\n"


def test_text_output_and_listing_one_account(redis_url: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ids = []
    for name in ("first", "second"):
        code, out, _ = run(capsys, "accounts", "create", "--name", name, "--redis", redis_url,
                           "--json")
        ids.append(json.loads(out)["id"])
    code, out, _ = run(capsys, "keys", "create", "--account", ids[0], "--name", "prod",
                       "--plan", "pro", "--expires-in", "1d", "--json", "--redis", redis_url)
    plan_key = json.loads(out)
    run(capsys, "keys", "create", "--account", ids[1], "--name", "other", "--credit",
        "--redis", redis_url)
    code, out, _ = run(capsys, "keys", "list", "--account", ids[0], "--json",
                       "--redis", redis_url)
    assert [k["id"] for k in json.loads(out)] == [plan_key["id"]]
    code, out, _ = run(capsys, "keys", "deactivate", plan_key["id"], "--redis", redis_url)
    lines = out.splitlines()
    assert lines[0] == f"{plan_key['id']}  prod  subscription (pro)  [deactivated]"
    assert lines[1].startswith("  rpm 200 (plan), tpm 13333 (plan), budget unlimited per 30d, "
                               "spent $0.000000")
    assert lines[2] == f"  expires {plan_key['expires_at']}"
    code, _, err = run(capsys, "accounts", "add-credits", ids[0], "0", "--redis", redis_url)
    assert (code, err) == (1, "gateway: error: the amount of credits must not be zero\n")


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("gateway.serve.cli.Settings.load", interrupted)
    assert run(capsys, "plans") == (130, "", "")


def test_commands_give_redis_at_least_two_seconds(redis_url: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    timeouts: list[float] = []

    def recording(url: str, timeout: float) -> Store:
        timeouts.append(timeout)
        return connect(url, timeout)

    monkeypatch.setattr("gateway.serve.cli.connect", recording)
    for configured in ("0.1", "5"):
        monkeypatch.setenv("GATEWAY_REDIS_TIMEOUT", configured)
        assert run(capsys, "accounts", "list", "--redis", redis_url)[0] == 0
    assert timeouts == [2.0, 5.0]  # an admin command may wait longer than admission does


def test_hostile_cli_input_is_one_line_never_a_traceback(
        redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        redis_server: Any) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        (["keys", "list", "--config", str(binary), "--redis", redis_url],
         "is not UTF-8 text"),
        (["keys", "create", "--name", "a", "--plan", "pro", "--expires-in", "99999999999d",
          "--redis", redis_url], "longer than the maximum"),
        (["keys", "create", "--name", "a", "--plan", "pro", "--budget-duration",
          "99999999999999d", "--redis", redis_url], "longer than the maximum"),
        (["keys", "list", "--redis", f"redis+cluster://127.0.0.1:{redis_server.port}"],
         "is not a Redis Cluster"),
        (["serve", "--redis", redis_url, "--upstream", "http://a b"], "invalid host"),
        (["serve", "--redis", redis_url, "--upstream", "http://h", "--port", "99999"],
         "a port is a number from 1 to 65535"),
        (["serve", "--redis", redis_url, "--upstream", "http://h", "--port", "0"],
         "a port is a number from 1 to 65535"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        _, err = capsys.readouterr()
        assert code in (1, 2), argv
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err


def test_tenant_chosen_names_are_shown_escaped(redis_url: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    evil = "evil\x1b[2J\nroot key"
    code, _, err = run(capsys, "keys", "create", "--name", evil, "--plan", "pro", "--redis",
                       redis_url)
    assert code != 0 and "printable" in err  # refused now; older gateways stored such names
    code, out, _ = run(capsys, "keys", "create", "--name", "plain", "--plan", "pro", "--redis",
                       redis_url, "--json")
    assert code == 0
    created = json.loads(out)
    client = redis.Redis.from_url(redis_url)
    try:
        [name] = [n for n in client.scan_iter(match="gw:*:key:" + created["id"])]
        client.hset(name, "name", evil)  # what an older gateway let through
    finally:
        client.close()
    code, out, _ = run(capsys, "keys", "list", "--redis", redis_url)
    assert "\x1b" not in out and "evil\\x1b[2J\\x0aroot key" in out


def test_version_is_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"gateway {version('llm-gateway')}"


def test_demo_reads_the_config_and_refuses_a_redis_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[plans.standard]\nrmp = 7\n")
    code, _, err = run(capsys, "demo", "--config", str(bad))
    assert code == 1 and "did you mean 'rpm'?" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "demo", "--redis", "redis://127.0.0.1:1/0")
    assert code == 1 and "embedded store" in err


async def test_the_demo_keys_follow_the_configs_plans(tmp_path: Path) -> None:
    from gateway.config.settings import Settings
    from gateway.demo.app import DemoApp

    config = tmp_path / "gateway.toml"
    config.write_text("[plans.standard]\nrpm = 7\ntpm = 700\n")
    demo = DemoApp("127.0.0.1", 8080, Settings.load(str(config), env={}))
    await demo._seed()
    key = next(k for k in await demo.store.list_keys(
        (await demo.store.list_accounts())[0].id) if k.name == "demo-budget")
    assert (key.rpm, key.tpm) == (None, None)  # it follows the plan's
    assert demo.settings.limits_for(key.plan, key.rpm, key.tpm) == (7, 700)
    await demo.gateway.aclose()


def test_common_options_work_before_the_command_too(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--redis", redis_url, "--json", "accounts", "create",
                       "--name", "before")
    assert code == 0 and json.loads(out)["name"] == "before"
    code, out, _ = run(capsys, "accounts", "list", "--redis", redis_url, "--json")
    assert code == 0 and [a["name"] for a in json.loads(out)] == ["before"]
    # After the command wins over before it.
    code, out, _ = run(capsys, "--redis", "redis://127.0.0.1:1/0", "accounts", "list",
                       "--redis", redis_url, "--json")
    assert code == 0 and len(json.loads(out)) == 1


@pytest.mark.parametrize("argv, message", [
    (["accounts", "create", "--name", " acme "], "without spaces around it"),
    (["accounts", "create", "--name", "00000000-0000-0000-0000-000000000001"], "UUID"),
    (["keys", "create", "--credit", "--name", "n" * 201], "at most 200"),
    (["keys", "create", "--plan", "pro", "--name", "x", "--budget", "1_000"], "plain decimal"),
    (["keys", "create", "--plan", "pro", "--name", "x", "--budget-duration", "٣d"],
     "invalid duration"),
])
def test_names_and_numbers_are_plain(redis_url: str, capsys: pytest.CaptureFixture[str],
                                     argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv, "--redis", redis_url)
    assert (code, out) == (1, "") and message in err, err
