"""The multiplexed connection at the protocol level, against a scripted RESP server: what is
written once is never written twice, silence is a timeout, and reconnection is at once after
a refusal and backs off after a refused AUTH."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import pytest

from gateway.store.client import NodeClient, Script
from gateway.store.resp import NodeConnection, Unsent
from gateway.store.urls import Credentials
from tests.conftest import free_port

Reply = bytes | None  # None: say nothing; b"": close the connection


class ScriptedServer:
    """A RESP server whose answer to each command is `answer(command)`."""

    def __init__(self, answer: Callable[[list[bytes]], Reply]) -> None:
        self.answer = answer
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self._writers:
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    reply = self.answer(command)
                    if reply == b"":
                        writer.close()
                        return
                    if reply is not None:
                        writer.write(reply)
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Callable[[list[bytes]], Reply]], Any]]:
    servers: list[ScriptedServer] = []

    async def make(answer: Callable[[list[bytes]], Reply]) -> ScriptedServer:
        server = ScriptedServer(answer)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def node(port: int, timeout: float = 0.3, password: str | None = None) -> NodeConnection:
    return NodeConnection(("127.0.0.1", port), Credentials(password=password), timeout)


async def test_replies_come_back_to_their_callers_in_order(scripted: Any) -> None:
    server = await scripted(lambda c: b"$%d\r\n%s\r\n" % (len(c[1]), c[1]))
    connection = node(server.port)
    replies = await asyncio.gather(*(connection.call(("ECHO", str(i))) for i in range(500)))
    assert replies == [str(i).encode() for i in range(500)]
    assert server.connections == 1  # 500 concurrent calls, one socket
    await connection.close()


async def test_a_command_answered_by_a_lost_connection_is_never_resent(scripted: Any) -> None:
    server = await scripted(lambda c: b"" if c[0] == b"EVALSHA" else b"+PONG\r\n")
    client = NodeClient(node(server.port))
    client.register([Script.of("return 1")])
    with pytest.raises(ConnectionResetError):  # written, then no answer: it may have run
        await client.evalsha(Script.of("return 1"), ["k"], [])
    assert [c[0] for c in server.commands] == [b"EVALSHA"]
    assert await client.call_any("PING") == b"PONG"  # the next call reconnects
    assert server.connections == 2
    assert [c[0] for c in server.commands] == [b"EVALSHA", b"PING"]
    await client.close()


async def test_silence_is_a_timeout_and_the_connection_is_dropped(scripted: Any) -> None:
    silent = True
    server = await scripted(lambda c: None if silent else b"+PONG\r\n")
    connection = node(server.port, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await connection.call(("PING",))
    assert 0.15 < time.monotonic() - started < 1.0
    silent = False
    assert await connection.call(("PING",)) == b"PONG"
    assert server.connections == 2  # the stalled socket was not reused
    await connection.close()


async def test_a_refused_connection_is_unsent_and_a_restarted_server_is_used_at_once(
        scripted: Any) -> None:
    port = free_port()
    connection = node(port)
    for _ in range(5):
        with pytest.raises(Unsent, match=f"127.0.0.1:{port}"):
            await connection.call(("PING",))
    server = ScriptedServer(lambda c: b"+PONG\r\n")
    server.port = port
    await server.start()
    try:
        assert await connection.call(("PING",)) == b"PONG"
    finally:
        await connection.close()
        await server.stop()


async def test_a_refused_auth_backs_off_instead_of_reconnecting_per_call(
        scripted: Any) -> None:
    server = await scripted(lambda c: b"-WRONGPASS invalid username-password pair\r\n"
                            if c[0] == b"AUTH" else b"+PONG\r\n")
    connection = node(server.port, password="wrong")
    with pytest.raises(Unsent, match="WRONGPASS"):
        await connection.call(("PING",))
    for _ in range(20):
        with pytest.raises(Unsent, match="retrying shortly"):
            await connection.call(("PING",))
    assert server.connections == 1
    await asyncio.sleep(0.06)  # past the first back-off
    with pytest.raises(Unsent):
        await connection.call(("PING",))
    assert server.connections == 2
    assert b"wrong" not in b"".join(b" ".join(c) for c in server.commands if c[0] != b"AUTH")
    await connection.close()


async def test_a_script_unknown_to_the_server_is_loaded_with_every_registered_one(
        scripted: Any) -> None:
    loaded: set[bytes] = set()
    first, second = Script.of("return 1"), Script.of("return 2")

    def answer(command: list[bytes]) -> Reply:
        if command[0] == b"SCRIPT":
            loaded.add(command[2])
            return b"$40\r\n%s\r\n" % Script.of(command[2].decode()).sha.encode()
        if command[1].decode() not in {Script.of(s.decode()).sha for s in loaded}:
            return b"-NOSCRIPT No matching script.\r\n"
        return b":7\r\n"

    server = await scripted(answer)
    client = NodeClient(node(server.port))
    client.register([first, second])
    assert await client.evalsha(first, ["k"], []) == 7
    assert loaded == {b"return 1", b"return 2"}
    assert [c[0] for c in server.commands].count(b"EVALSHA") == 2
    await client.close()
