"""`gateway mgmt-keys create | list | revoke` against a real redis-server."""

from __future__ import annotations

import orjson
import pytest

from gateway.core.keys import hash_secret
from gateway.serve.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err




def test_mgmt_keys_lifecycle(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    r = ("--redis", redis_url, "--json")
    code, out, _ = run(capsys, "accounts", "create", "--name", "acme", *r)
    account = orjson.loads(out)["id"]
    code, out, _ = run(capsys, "mgmt-keys", "create", "--account", account, *r)
    created = orjson.loads(out)
    assert code == 0 and set(created) == {"id", "key", "account_id", "created_at"}
    assert created["key"].startswith("mk_") and created["account_id"] == account
    code, out, _ = run(capsys, "mgmt-keys", "list", "--account", account, *r)
    listed = orjson.loads(out)
    assert [k["id"] for k in listed] == [created["id"]]
    assert created["key"] not in out and hash_secret(created["key"]) not in out
    code, out, _ = run(capsys, "mgmt-keys", "revoke", created["id"], *r)
    assert code == 0 and orjson.loads(out)["revoked"] is True
    code, out, _ = run(capsys, "mgmt-keys", "list", *r)
    assert orjson.loads(out) == []
    code, _, err = run(capsys, "mgmt-keys", "revoke", created["id"], *r)
    assert code == 1 and "no management key" in err
    code, _, err = run(capsys, "mgmt-keys", "create", "--account", "nope", *r)
    assert code == 1 and "no account" in err
    code, out, err = run(capsys, "mgmt-keys", "list", "--account", "nope", *r)
    assert (code, out) == (1, "") and "no account" in err
