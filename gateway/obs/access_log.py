"""The access log of `gateway serve`: one pre-built line per request, written in batches.

The stdlib `logging` path (a LogRecord per line, a lock, the formatter, a `getpid`, a write
system call per line) cost about a fifth of a proxied request's CPU under load. Here a line is
serialised once (orjson, or key=value text), with the same fields and layout the formatters
in logs.py give, appended to a buffer, and written at most every 100 ms (or once 64 KiB
gather) and at shutdown. Without an event loop (a script, a test) each line is written at
once. The middleware shape keeps the stdlib logger unless this writer is installed.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import IO, Any

import orjson

from gateway.obs.logs import QUIET_PATHS, RequestRecord, escape_control

FLUSH_SECONDS = 0.1
FLUSH_BYTES = 64 * 1024
_LOGGER = "gateway.access"


class AccessWriter:
    def __init__(self, level: str, fmt: str, stream: IO[bytes] | None = None) -> None:
        self._min = logging.getLevelName(level.upper())
        self._json = fmt == "json"
        self._stream = stream if stream is not None else sys.stderr.buffer
        self._pid = os.getpid()  # once: per-line getpid was a system call each
        self._buffer: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def write(self, record: RequestRecord) -> None:
        quiet = record.path in QUIET_PATHS
        level = logging.DEBUG if quiet else logging.INFO
        if level < self._min:
            return
        line = self._line(record.fields(), "debug" if quiet else "info")
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date part is formatted once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def _line(self, fields: dict[str, Any], level: str) -> bytes:
        if self._json:
            doc = {"ts": self._timestamp(), "level": level, "logger": _LOGGER,
                   "pid": self._pid, "msg": "request", **fields}
            return orjson.dumps(doc, default=str) + b"\n"
        parts = [self._timestamp(), level.upper(), _LOGGER, "request"]
        parts += [f"{k}={'-' if v is None else escape_control(str(v))}"
                  for k, v in fields.items()]
        return (" ".join(parts) + "\n").encode()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr gone (a closed pipe at exit): the lines cannot be written anywhere


_writer: AccessWriter | None = None


def install(level: str, fmt: str, stream: IO[bytes] | None = None) -> AccessWriter:
    """Makes request lines go through an AccessWriter in this process (gateway serve)."""
    global _writer
    if _writer is not None:
        _writer.flush()
    _writer = AccessWriter(level, fmt, stream)
    atexit.register(_writer.flush)
    return _writer


def installed() -> AccessWriter | None:
    return _writer


def flush() -> None:
    if _writer is not None:
        _writer.flush()
