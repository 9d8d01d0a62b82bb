"""/readyz answers what Redis says at the moment it is asked: after a restart the first probe
is 200 although the connection the worker held is dead, and while Redis is down it is 503.
Against real redis-server processes (and a TCP relay that can go silent, as a connection does
when its peer vanishes without a word: a rescheduled pod, a lost NAT entry)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics
from gateway.store import connect
from tests.conftest import RedisServer, client_for, gateway

READY = {"status": "ready", "redis": True, "scripts": True}


@pytest.mark.parametrize("over", ["unix", "tcp"])
async def test_the_first_probe_after_a_redis_restart_is_ready(
        tmp_path: Path, settings: Settings, metrics: Metrics, over: str) -> None:
    server = RedisServer(tmp_path)
    server.start()
    url = server.url if over == "unix" else f"redis://127.0.0.1:{server.port}/0"
    store = connect(url, 1.0)
    try:
        async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
            assert (await client.get("/readyz")).json() == READY
            # Restarted between two probes, before this worker noticed its connection close:
            # one probe, and it must be Redis's answer now (the new server lacks the scripts).
            server.stop()
            server.start()
            probe = await client.get("/readyz")
            assert (probe.status_code, probe.json()) == (200, READY)
    finally:
        await store.close()
        server.stop()


async def test_a_probe_while_redis_is_down_is_503_and_the_next_one_after_is_200(
        tmp_path: Path, settings: Settings, metrics: Metrics) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = connect(server.url, 1.0)
    try:
        async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
            assert (await client.get("/readyz")).status_code == 200
            server.stop()
            down = await client.get("/readyz")
            assert (down.status_code, down.json()["redis"]) == (503, False)
            server.start()
            assert (await client.get("/readyz")).json() == READY
    finally:
        await store.close()
        server.stop()


class Relay:
    """A TCP relay to Redis whose open connections can go silent (nothing passes, nothing is
    closed), while new connections pass."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()
        self._mute: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        mute = asyncio.Event()
        self._mute.append(mute)
        self.silent += [writer, up_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    if not mute.is_set():
                        sink.write(data)

        for task in (pump(reader, up_writer), pump(up_reader, writer)):
            future = asyncio.ensure_future(task)
            self._pumps.add(future)

    def go_silent(self) -> None:
        for mute in self._mute:
            mute.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Relay]:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self.server.close()
            for task in self._pumps:
                task.cancel()
            for writer in self.silent:
                writer.close()


async def test_a_probe_over_a_connection_gone_silent_asks_redis_again(
        tmp_path: Path, settings: Settings, metrics: Metrics) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with Relay(server.port).running() as relay:
            store = connect(f"redis://127.0.0.1:{relay.port}/0", 0.3)
            try:
                async with client_for(gateway(MockUpstream(), store, settings,
                                              metrics)) as client:
                    assert (await client.get("/readyz")).json() == READY
                    relay.go_silent()  # Redis is up; the worker's connection leads nowhere
                    probe = await client.get("/readyz")
                    assert (probe.status_code, probe.json()) == (200, READY)
            finally:
                await store.close()
    finally:
        server.stop()
