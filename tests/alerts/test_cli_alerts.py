"""`gateway alerts send --once` as a real process, and the sender inside `gateway serve`'s
app (its lifespan), both against a real receiver."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest

from gateway.alerts.lifespan import AlertsInServe
from gateway.alerts.outbox import Outbox
from gateway.http.key_changes import ChangeSpec, update_key
from gateway.serve.cli import main
from gateway.serve.serving import create_app
from gateway.store import Store
from gateway.types import Message
from tests.alerts.helpers import SECRET, alert_settings, outbox, with_alerts
from tests.alerts.receiver import Receiver, receiving
from tests.conftest import new_key


def write_config(path: Path, url: str) -> Path:
    path.write_text(f'[alerts]\ntimeout = 1\n[[alerts.webhooks]]\nurl = "{url}"\n'
                    f'secret = "{SECRET}"\n')
    return path


async def send_once(redis_url: str, config: Path, *extra: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "alerts", "send", "--once", "--json", "--redis",
        redis_url, "--config", str(config), *extra, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    doc: dict[str, int] = orjson.loads(out)
    return doc


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_send_once_delivers_and_a_failed_event_waits_for_the_next_run(
        store: Store, redis_url: str, tmp_path: Path) -> None:
    async with receiving(Receiver(script=["500"])) as rx:
        config = write_config(tmp_path / "gateway.toml", rx.url)
        settings = alert_settings(rx.url)
        with_alerts(store, settings)
        _, key_id, account_id = await new_key(store, settings, plan="big")
        await update_key(store, settings, key_id, ChangeSpec(active=False))
        [event] = await outbox(store, account_id)
        first = await send_once(redis_url, config)
        assert (first["done"], first["failed"], first["waiting"]) == (0, 1, 1)
        second = await send_once(redis_url, config)  # the same (host's) name: its own
        assert (second["done"], second["failed"], second["waiting"]) == (1, 0, 0)
    assert [c.headers["x-gateway-event-id"] for c in rx.calls] == [event.id, event.id]
    assert rx.calls[0].body == rx.calls[1].body and rx.verifies(SECRET)
    assert await outbox(store, account_id) == []


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_an_event_a_dead_sender_was_given_is_claimed(
        store: Store, redis_url: str, tmp_path: Path) -> None:
    async with receiving(Receiver()) as rx:
        config = write_config(tmp_path / "gateway.toml", rx.url)
        settings = alert_settings(rx.url)
        with_alerts(store, settings)
        _, key_id, account_id = await new_key(store, settings, plan="big")
        await update_key(store, settings, key_id, ChangeSpec(active=False))
        [event] = await Outbox(store, "died").read(account_id, 10)  # given, never finished
        doc = await send_once(redis_url, config)
        assert (doc["done"], doc["waiting"]) == (0, 1)  # not idle long enough yet
        await asyncio.sleep(0.2)
        doc = await send_once(redis_url, config, "--claim-after", "0.1")
        assert (doc["done"], doc["waiting"]) == (1, 0)
    assert [c.headers["x-gateway-event-id"] for c in rx.accepted()] == [event.id]


def test_send_refuses_without_a_webhook(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "send", "--once", "--redis", "redis://127.0.0.1:1/0"]) == 1
    assert "no webhook configured" in capsys.readouterr().err


def test_help_names_the_command_and_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["alerts", "send", "--help"])
    out = capsys.readouterr().out
    assert "gateway alerts send --redis" in out and "--once" in out


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_gateway_serve_runs_a_sender_in_its_lifespan(
        store: Store, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with receiving(Receiver(script=["reset"])) as rx:
        config = write_config(tmp_path / "gateway.toml", rx.url)
        monkeypatch.setenv("GATEWAY_CONFIG", str(config))
        monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
        monkeypatch.setenv("GATEWAY_UPSTREAM", "http://127.0.0.1:9")
        app = create_app()
        assert isinstance(app.app, AlertsInServe)
        assert app.store.alert_cap == 10_000
        app.app.interval = 0.05
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await inbox.put({"type": "lifespan.startup"})
        task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         inbox.get, send))
        settings = alert_settings(rx.url)
        _, key_id, account_id = await new_key(app.store, settings, plan="big")
        await update_key(app.store, settings, key_id, ChangeSpec(active=False))
        for _ in range(200):
            if rx.accepted():
                break
            await asyncio.sleep(0.05)
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)
        await app.store.close()
    assert [m["type"] for m in sent] == ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"]
    assert [c.outcome for c in rx.calls] == ["reset", "200"]
    assert len({c.headers["x-gateway-event-id"] for c in rx.calls}) == 1
    assert await outbox(store, account_id) == []


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_gateway_serve_with_sender_none_writes_events_but_sends_none(
        store: Store, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with receiving(Receiver()) as rx:
        config = write_config(tmp_path / "gateway.toml", rx.url)
        config.write_text(config.read_text().replace("[alerts]\n", '[alerts]\nsender = "none"\n'))
        monkeypatch.setenv("GATEWAY_CONFIG", str(config))
        monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
        monkeypatch.setenv("GATEWAY_UPSTREAM", "http://127.0.0.1:9")
        app = create_app()
        assert not isinstance(app.app, AlertsInServe)  # no sender in its lifespan
        assert app.store.alert_cap == 10_000  # the scripts still write events
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        await inbox.put({"type": "lifespan.startup"})
        task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         inbox.get, send))
        settings = alert_settings(rx.url)
        _, key_id, account_id = await new_key(app.store, settings, plan="big")
        await update_key(app.store, settings, key_id, ChangeSpec(active=False))
        await asyncio.sleep(1.5)  # a sender would have posted it within its 1 s interval
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)
        await app.store.close()
        assert rx.calls == []
        [event] = await outbox(store, account_id)  # waiting for `gateway alerts send`
        doc = await send_once(redis_url, config)
        assert (doc["done"], doc["waiting"]) == (1, 0)
    assert [c.headers["x-gateway-event-id"] for c in rx.accepted()] == [event.id]
