"""gateway serve's access log: the same line the stdlib formatter gives, written in batches."""

from __future__ import annotations

import asyncio
import io
import logging

import orjson

from gateway.obs.access_log import FLUSH_SECONDS, AccessWriter
from gateway.obs.logs import JsonFormatter, RequestRecord, TextFormatter


class CountingStream(io.BytesIO):
    writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def record(path: str = "/v1/chat/completions") -> RequestRecord:
    r = RequestRecord("rid-1", "POST", path)
    r.status, r.key_id, r.plan, r.decision, r.reason = 200, "k", "pro", "allowed", "ok"
    return r


def stdlib_line(r: RequestRecord, formatter: logging.Formatter) -> str:
    log = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None, None)
    log.fields = r.fields()
    return formatter.format(log)


async def test_lines_are_those_of_the_stdlib_formatters_written_in_one_batch() -> None:
    stream = CountingStream()
    writer = AccessWriter("info", "json", stream)
    for _ in range(50):
        writer.write(record())
    assert stream.writes == 0  # buffered
    await asyncio.sleep(FLUSH_SECONDS * 2)
    assert stream.writes == 1
    lines = stream.getvalue().decode().splitlines()
    assert len(lines) == 50
    ours, theirs = orjson.loads(lines[0]), orjson.loads(stdlib_line(record(), JsonFormatter()))
    for changing in ("ts", "duration_ms", "pid"):
        ours.pop(changing), theirs.pop(changing)
    assert ours == theirs


def test_text_lines_and_levels() -> None:
    stream = CountingStream()
    writer = AccessWriter("info", "text", stream)
    writer.write(record("/healthz"))  # probes are DEBUG: below info
    r = record("/v1/x\nFAKE")
    writer.write(r)  # no loop running: written at once
    line = stream.getvalue().decode()
    assert line.count("\n") == 1 and "\\x0aFAKE" in line
    expected = stdlib_line(r, TextFormatter())
    assert line.split(" ", 1)[1].split(" duration_ms=")[0] == \
        expected.split(" ", 1)[1].split(" duration_ms=")[0]
