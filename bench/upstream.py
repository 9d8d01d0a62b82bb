"""A minimal raw-asyncio OpenAI-shaped upstream, so the benchmark measures the gateway's CPU
and not the mock's.

It answers every POST with a canned completion carrying `usage` (JSON), or, when the body
asks for `"stream": true`, with chunked SSE events (a usage event only when the body sets
`stream_options.include_usage`, as real servers do). A request header
`x-bench-chunk-delay-ms: N` spaces the token events N ms apart, which is how the benchmark
sees whether anything between client and upstream buffers a stream: each of those events
carries `"bench_sent_ns"`, the upstream's CLOCK_MONOTONIC when it was written, so the load
generator (same machine, same clock) reads how long each event took to arrive. The usage
event and `[DONE]` leave with the last token, as a real server sends them: a delay before
them would make a stream longer whenever the gateway asks for usage the client did not.

`python -m bench.upstream --port N` serves it on 127.0.0.1 until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time

import orjson

WORDS = 16
_USAGE = {"prompt_tokens": 12, "completion_tokens": WORDS, "total_tokens": 12 + WORDS}
_TEXT = " ".join(["token"] * WORDS)


def _json_response(doc: object, status: bytes = b"200 OK") -> bytes:
    body = orjson.dumps(doc)
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


_COMPLETION = _json_response({
    "id": "cmpl-bench", "object": "chat.completion", "created": 0, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": _TEXT},
                 "finish_reason": "length"}],
    "usage": _USAGE})
_NOT_FOUND = _json_response({"error": {"message": "not found", "type": "invalid_request_error",
                                       "code": None}}, b"404 Not Found")
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(doc: object) -> bytes:
    return _chunk(b"data: " + orjson.dumps(doc) + b"\n\n")


_SSE_WORDS = [_event({"id": "cmpl-bench", "object": "chat.completion.chunk", "created": 0,
                      "model": "bench-model", "choices": [{"index": 0,
                                                           "delta": {"content": "token "},
                                                           "finish_reason": None}]})
              for _ in range(WORDS)]


def _stamped_word() -> bytes:
    return _event({"id": "cmpl-bench", "object": "chat.completion.chunk", "created": 0,
                   "model": "bench-model", "bench_sent_ns": time.monotonic_ns(),
                   "choices": [{"index": 0, "delta": {"content": "token "},
                                "finish_reason": None}]})


_SSE_USAGE = _event({"id": "cmpl-bench", "object": "chat.completion.chunk", "created": 0,
                     "model": "bench-model", "choices": [], "usage": _USAGE})
_SSE_END = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[tuple[bytes, bytes]] | None = None
        self.writer: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            declared = _header(head, b"content-length")
            length = int(declared) if declared else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        if self.queue is not None:  # a delayed stream is still being written: keep order
            self.queue.put_nowait((head, body))
            return
        streamed, usage = _stream_wanted(body)
        delay = _header(head, b"x-bench-chunk-delay-ms")
        if streamed and delay:
            self.queue = asyncio.Queue()
            self.queue.put_nowait((head, body))
            self.writer = asyncio.ensure_future(self._drain_slowly(float(delay) / 1000))
            return
        assert self.transport is not None
        if not head.startswith(b"POST "):
            self.transport.write(_NOT_FOUND)
        elif streamed:
            self.transport.write(_SSE_HEAD + b"".join(_SSE_WORDS)
                                 + (_SSE_USAGE if usage else b"") + _SSE_END)
        else:
            self.transport.write(_COMPLETION)

    async def _drain_slowly(self, delay: float) -> None:
        assert self.queue is not None
        while not self.queue.empty():
            _, body = self.queue.get_nowait()
            streamed, usage = _stream_wanted(body)
            if not streamed:
                if self.transport is not None:
                    self.transport.write(_COMPLETION)
                continue
            for index in range(WORDS):
                if self.transport is None:
                    return
                if index:
                    await asyncio.sleep(delay)
                part = _stamped_word()
                if index == 0:
                    part = _SSE_HEAD + part
                if index == WORDS - 1:
                    part += (_SSE_USAGE if usage else b"") + _SSE_END
                self.transport.write(part)
        self.queue = None
        self.writer = None


def _stream_wanted(body: bytes) -> tuple[bool, bool]:
    if b"stream" not in body:
        return False, False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, False
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return False, False
    options = doc.get("stream_options")
    return True, isinstance(options, dict) and options.get("include_usage") is True


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
