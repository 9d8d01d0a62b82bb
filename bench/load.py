"""The bundled load generator: closed-loop HTTP/1.1 keep-alive clients on raw asyncio streams.

Used when wrk is not installed, and always for the one-connection latency and time-to-first-
byte runs (wrk cannot see the first byte). Prints one JSON object:
`python -m bench.load --port P --path /v1/chat/completions --body-file F --connections 8
--duration 5` (or `--requests N` for an exact count).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    non_2xx: int = 0
    total_ns: list[int] = field(default_factory=list)
    first_byte_ns: list[int] = field(default_factory=list)
    # Streams whose events carry the upstream's send time (bench.upstream with a chunk
    # delay): per event, arrival minus sending; per stream, its slowest event.
    event_lag_ns: list[int] = field(default_factory=list)
    slowest_event_ns: list[int] = field(default_factory=list)


def build_request(host: str, port: int, path: str, body: bytes,
                  headers: list[tuple[str, str]]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


_SENT = b'"bench_sent_ns":'


def _sent_ns(chunk: bytes) -> int | None:
    at = chunk.find(_SENT)
    if at < 0:
        return None
    start = at + len(_SENT)
    end = start
    while chunk[end:end + 1].isdigit():
        end += 1
    return int(chunk[start:end])


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes, lags: list[int]) -> tuple[int, int, int]:
    """Sends one request, reads the whole response; returns (status, first byte, end) ns.
    The relay lag of each event that carries its send time is appended to `lags`."""
    started = time.perf_counter_ns()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    first = 0
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunk = await reader.readexactly(size + 2)
            sent = _sent_ns(chunk)
            if sent is not None:
                lags.append(time.monotonic_ns() - sent)
            if not first:
                first = time.perf_counter_ns()
    elif length > 0:
        await reader.readexactly(length)
    elif length < 0:
        raise ConnectionError("response without length on a keep-alive connection")
    end = time.perf_counter_ns()
    return status, (first or end) - started, end - started


async def _client(host: str, port: int, request: bytes, tally: Tally, deadline: float,
                  budget: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            lags: list[int] = []
            try:
                status, first, total = await _exchange(reader, writer, request, lags)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                tally.errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            tally.requests += 1
            if not 200 <= status < 300:
                tally.non_2xx += 1
            tally.total_ns.append(total)
            tally.first_byte_ns.append(first)
            if lags:
                tally.event_lag_ns.extend(lags)
                tally.slowest_event_ns.append(max(lags))
    finally:
        writer.close()


def percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile of nanosecond samples, in milliseconds."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index] / 1e6


async def run(host: str, port: int, request: bytes, connections: int, duration: float,
              requests: int | None) -> dict[str, Any]:
    tally = Tally()
    budget = [requests if requests is not None else 1 << 62]
    deadline = time.monotonic() + (duration if requests is None else 3600.0)
    started = time.perf_counter()
    await asyncio.gather(*(_client(host, port, request, tally, deadline, budget)
                           for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {
        "requests": tally.requests, "errors": tally.errors, "non_2xx": tally.non_2xx,
        "elapsed_s": elapsed, "rps": tally.requests / elapsed if elapsed else 0.0,
        "p50_ms": percentile(tally.total_ns, 50), "p90_ms": percentile(tally.total_ns, 90),
        "p99_ms": percentile(tally.total_ns, 99),
        "first_byte_p50_ms": percentile(tally.first_byte_ns, 50),
        "first_byte_p99_ms": percentile(tally.first_byte_ns, 99),
        "event_lag_p50_ms": percentile(tally.event_lag_ns, 50),
        "slowest_event_lag_p50_ms": percentile(tally.slowest_event_ns, 50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int)
    args = parser.parse_args()
    with open(args.body_file, "rb") as handle:
        body = handle.read()
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in args.header)]
    request = build_request(args.host, args.port, args.path, body, headers)
    result = asyncio.run(run(args.host, args.port, request, args.connections, args.duration,
                             args.requests))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
