"""An OpenAI-compatible upstream, run as its own process, that streams slowly and counts the
completions it is serving at once: the referee of what reached the GPUs.

`python -m tests.counting_upstream --port N --chunk-delay S` serves gateway.demo's
MockUpstream (one word per chunk, `max_tokens` words, `S` seconds apart) behind a counter:
a completion is in flight from the moment its request has arrived until the upstream starts
sending its last bytes, or the client (the gateway) has gone, whichever comes first. A
client that leaves cancels the completion at once, as vLLM aborts a request whose
connection closed, so a cancelled stream stops counting when the connection closes.

GET /counts  -> {"now": in flight, "peak": most at once, "served": completions begun,
                 "gone": completions whose client left before the end}
POST /reset  -> peak := now, served := gone := 0 (so a test measures a phase of its own)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import orjson

from gateway.demo.mock_upstream import MockUpstream
from gateway.types import Message, Receive, Scope, Send

COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


class CountingUpstream:
    def __init__(self, chunk_delay: float) -> None:
        # max_tokens decides the stream's length: `max_tokens * chunk_delay` seconds.
        self.inner = MockUpstream(max_words=10_000, chunk_delay=chunk_delay)
        self.now = 0
        self.peak = 0
        self.served = 0
        self.gone = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in (*COMPLETIONS, "/counts",
                                                            "/reset"):
            await self.inner(scope, receive, send)
            return
        if scope["path"] == "/counts":
            await self._json(send, {"now": self.now, "peak": self.peak,
                                    "served": self.served, "gone": self.gone})
            return
        if scope["path"] == "/reset":
            self.peak, self.served, self.gone = self.now, 0, 0
            await self._json(send, {"now": self.now})
            return
        await self._completion(scope, receive, send)

    async def _completion(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.served += 1
        counted = True
        finished = False

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.now -= 1

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def counting_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
                uncount()  # the work is done before its last bytes leave
            await send(message)

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:  # uncounted here, at once, not when the handler next runs
                self.gone += 1
                uncount()

        serving = asyncio.ensure_future(self.inner(scope, replay, counting_send))
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({serving, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():  # the client left: abort, as an inference server does
                serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await serving
        finally:
            uncount()
            watcher.cancel()
            serving.cancel()

    @staticmethod
    async def _json(send: Send, doc: object) -> None:
        data = orjson.dumps(doc)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m tests.counting_upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunk-delay", type=float, default=0.1)
    args = parser.parse_args()
    uvicorn.run(CountingUpstream(args.chunk_delay), host="127.0.0.1", port=args.port,
                log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
