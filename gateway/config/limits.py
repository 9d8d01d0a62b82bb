"""Bounds and options the settings carry to the layers that enforce them."""

from __future__ import annotations

import os
from dataclasses import dataclass

LIMITS_ENV = "GATEWAY_SERVER_LIMITS"  # "header_bytes,header_timeout,body_timeout,connections"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may hold of a worker: bytes of a request head (431 beyond),
    seconds to send a head, seconds of silence inside a body (408 after either), and
    connections open at once; over that cap a new connection makes the one that has waited
    longest for its head make room, and if none is waiting it is refused with a 503."""

    header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    connections: int = 10_000

    def encode(self) -> str:
        return (f"{self.header_bytes},{self.header_timeout},{self.body_timeout},"
                f"{self.connections}")

    @classmethod
    def from_env(cls) -> ServerLimits:
        text = os.environ.get(LIMITS_ENV)
        if not text:
            return cls()
        header_bytes, header_timeout, body_timeout, connections = text.split(",")
        return cls(int(header_bytes), float(header_timeout), float(body_timeout),
                   int(connections))


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds: to connect, from the request to the response head (a slow prefill can be
    long), of silence between body bytes, and in all (None: no total deadline)."""

    connect: float = 5.0
    first_byte: float = 300.0
    idle: float = 60.0
    total: float | None = None


@dataclass(frozen=True, slots=True)
class RunningUsage:
    """What to ask a stream for beyond its final usage, so that a stream cut short is
    billed the server's own count: vLLM's (and SGLang's) `continuous_usage_stats`,
    llama.cpp's `timings_per_token`."""

    continuous_usage: bool = False
    timings_per_token: bool = False
