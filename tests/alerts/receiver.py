"""A real HTTP webhook receiver on loopback for the alert tests: it answers its first calls
with the failures a scripted list names, then accepts, and records every call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


def expected_signature(secret: str, body: bytes) -> str:
    """Computed here, as a receiver would, not with the gateway's own signing code."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    outcome: str  # "200", "500", "reset", "hang", "big" (200 with a body of big_bytes)


@dataclass
class Receiver:
    # What the first calls get, in order; every later call is accepted (200).
    script: list[str] = field(default_factory=list)
    always: str = "200"
    hang_seconds: float = 5.0
    big_bytes: int = 50 * 1024 * 1024
    big_sent: int = 0  # body bytes of "big" answers the sender let us write
    calls: list[Call] = field(default_factory=list)
    url: str = ""

    def accepted(self) -> list[Call]:
        return [c for c in self.calls if c.outcome == "200"]

    def accepted_ids(self) -> set[str]:
        return {c.headers["x-gateway-event-id"] for c in self.accepted()}

    def verifies(self, secret: str) -> bool:
        return all(hmac.compare_digest(expected_signature(secret, c.body),
                                       c.headers["x-gateway-signature"])
                   for c in self.calls)

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                index = len(self.calls)
                outcome = self.script[index] if index < len(self.script) else self.always
                self.calls.append(Call(path, headers, body, outcome))
                if outcome == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if outcome == "hang":
                    await asyncio.sleep(self.hang_seconds)
                    writer.close()
                    return
                if outcome == "big":
                    await self._stream_big(writer)
                    return
                status = b"200 OK" if outcome == "200" else b"500 Internal Server Error"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _stream_big(self, writer: asyncio.StreamWriter) -> None:
        """A 200 whose body is `big_bytes` long, streamed 64 KiB at a time (never held
        whole here), until the sender hangs up."""
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.big_bytes)
        piece = b"x" * 65536
        while self.big_sent < self.big_bytes:
            writer.write(piece[:self.big_bytes - self.big_sent])
            await writer.drain()
            self.big_sent += min(len(piece), self.big_bytes - self.big_sent)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver, path: str = "/hook") -> AsyncIterator[Receiver]:
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield receiver
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
