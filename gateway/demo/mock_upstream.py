"""A small OpenAI-compatible upstream for the demo, tests and benchmarks.

Usage is deterministic: prompt tokens = characters / 4 of the prompt text (rounded up),
completion tokens = min(max_tokens, 16) words. `python -m gateway.demo.mock_upstream` serves it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson

from gateway.types import Receive, Scope, Send

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "then",
          "rests", "under", "a", "tree")


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v.get("text") if isinstance(v, dict) else v) for v in value)
    return 0


def prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    chars = sum(_chars(m.get("content")) for m in (messages if isinstance(messages, list) else [])
                if isinstance(m, dict))
    chars += _chars(body.get("prompt")) + _chars(body.get("input"))
    return max(1, -(-chars // 4))


class MockUpstream:
    def __init__(self, max_words: int = 16, chunk_delay: float = 0.0) -> None:
        self.max_words = max_words
        self.chunk_delay = chunk_delay
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.requests += 1
        path = scope["path"]
        if path == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [
                {"id": "mock-model", "object": "model", "owned_by": "mock"}]})
            return
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            await self._json(send, 400, {"error": {"message": "invalid JSON", "type":
                                                   "invalid_request_error", "code": None}})
            return
        if path == "/v1/embeddings":
            await self._embeddings(send, body)
        elif path in ("/v1/chat/completions", "/v1/completions"):
            await self._completion(send, body, chat=path.endswith("chat/completions"))
        else:
            await self._json(send, 404, {"error": {"message": "not found",
                                                   "type": "invalid_request_error",
                                                   "code": None}})

    async def _json(self, send: Send, status: int, doc: Any) -> None:
        data = orjson.dumps(doc)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _embeddings(self, send: Send, body: dict[str, Any]) -> None:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = prompt_tokens(body)
        await self._json(send, 200, {
            "object": "list", "model": body.get("model", "mock-model"),
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
                     for i in range(len(items))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _completion(self, send: Send, body: dict[str, Any], chat: bool) -> None:
        limit = body.get("max_tokens", body.get("max_completion_tokens"))
        if isinstance(limit, bool) or not isinstance(limit, int):
            limit = self.max_words
        words = max(0, min(limit, self.max_words))
        prompt = prompt_tokens(body)
        usage = {"prompt_tokens": prompt, "completion_tokens": words,
                 "total_tokens": prompt + words}
        model = body.get("model", "mock-model")
        created = int(time.time())
        if body.get("stream") is True:
            await self._stream(send, body, chat, words, usage, model, created)
            return
        text = " ".join(_WORDS[i % len(_WORDS)] for i in range(words))
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "length"} if chat else
                                  {"index": 0, "text": text, "finish_reason": "length"})
        await self._json(send, 200, {
            "id": "cmpl-mock", "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": usage})

    async def _stream(self, send: Send, body: dict[str, Any], chat: bool, words: int,
                      usage: dict[str, int], model: Any, created: int) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(words):
            word = _WORDS[i % len(_WORDS)] + " "
            choice = ({"index": 0, "delta": {"content": word}, "finish_reason": None} if chat
                      else {"index": 0, "text": word, "finish_reason": None})
            event = {"id": "cmpl-mock", "object": kind, "created": created, "model": model,
                     "choices": [choice]}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(event) + b"\n\n"})
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            event = {"id": "cmpl-mock", "object": kind, "created": created, "model": model,
                     "choices": [], "usage": usage}
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps(event) + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m gateway.demo.mock_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(MockUpstream(chunk_delay=args.chunk_delay), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
