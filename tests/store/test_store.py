"""Store internals that the HTTP tests do not pin down on their own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret
from gateway.errors import StoreCommandError, StoreUnavailable
from gateway.store import Ask, connect
from tests.conftest import PLAN_LIMITS, RedisServer, free_port, new_key
from tests.redis_inspect import redis_of


async def test_scripts_reload_after_script_flush(redis_url: str) -> None:
    store = connect(redis_url, timeout_seconds=5.0)
    settings = Settings()
    secret, key_id, account_id = await new_key(store, settings)
    ref = await store.lookup(hash_secret(secret))
    assert ref is not None and (ref.account_id, ref.key_id) == (account_id, key_id)
    await redis_of(store).script_flush()
    decision = await store.admit(ref, hash_secret(secret),
                                 "r1", Ask.flat(10, 5), PLAN_LIMITS)
    assert decision.code == 0
    # The admission loaded the settlement's script too: it will not miss it after the
    # client has seen the response (read-your-writes across replicas).
    assert await redis_of(store).script_exists(store._settle.sha) == [True]
    await redis_of(store).script_flush()  # flushed between admission and settlement
    assert await store.settle(ref, "r1", 3, 4, 5) is True
    assert await store.settle(ref, "r1", 3, 4, 5) is False  # idempotent per request id
    await store.close()


async def test_concurrent_hot_calls_share_one_connection(redis_url: str) -> None:
    store = connect(redis_url, timeout_seconds=5.0)
    settings = Settings()
    secret, _, _ = await new_key(store, settings, rpm=1000, tpm=10_000_000)
    ref = await store.lookup(hash_secret(secret))
    assert ref is not None
    decisions = await asyncio.gather(*(store.admit(ref, hash_secret(secret), f"r{i}",
                                                   Ask.flat(1, 0), PLAN_LIMITS)
                                       for i in range(200)))
    assert [d.code for d in decisions].count(0) == 200
    clients = await redis_of(store).client_list()
    assert len(clients) == 2  # the store's one connection, and this query's
    await store.close()


async def test_wrong_password_is_unavailable_not_a_crash(redis_url: str) -> None:
    store = connect(redis_url.replace("unix://", "unix://:wrong@"), timeout_seconds=1.0)
    with pytest.raises(StoreUnavailable):
        await store.lookup("0" * 64)
    await store.close()




def test_scripts_load_from_a_source_checkout_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m gateway` inside the repository imports gateway/ from the working tree,
    where there is no gateway.lua package: lua/ beside it must serve."""
    import gateway.store.scripts as store_module

    installed = store_module.lua_source("admit")

    def no_package(_: str) -> None:
        raise ModuleNotFoundError("No module named 'gateway.lua'")

    monkeypatch.setattr(store_module.resources, "files", no_package)
    assert store_module.lua_source("admit") == installed


async def test_transient_replies_are_unavailable_not_refused(tmp_path: Path) -> None:
    """READONLY (as CLUSTERDOWN, TRYAGAIN, NOSCRIPT, MOVED) is transient: a settlement that
    meets one is retried, not given up; a genuine command error is not."""
    server = RedisServer(tmp_path)
    server.start()
    store = connect(server.url, timeout_seconds=5.0)
    try:
        await store.create_account("before")
        # A replica of a master that does not exist: reachable, but refuses writes,
        # as the old master does for a moment after a failover.
        await redis_of(store).execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        with pytest.raises(StoreUnavailable) as refused:
            await store.create_account("during")
        assert not isinstance(refused.value, StoreCommandError)
        assert "READONLY" in str(refused.value)
        await redis_of(store).execute_command("REPLICAOF", "NO", "ONE")
        await redis_of(store).set("plain", "text")
        with pytest.raises(StoreCommandError):  # WRONGTYPE: retrying cannot help
            await store._cmd("HGET", "plain", "field")
    finally:
        await store.close()
        server.stop()
