"""Actual usage read from server-sent event streams (JSON bodies: gateway.core.usage).

Every stream shape the supported upstreams send: OpenAI-style chunks with usage blocks
(one in all, one per choice, one per prompt, or running), the Responses API's events and
the Anthropic Messages API's. The model the upstream reports is read too: it decides the
price.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config.routes import Kind
from gateway.core.sse import SseEvents
from gateway.core.usage import JsonUsage, Usage, read_usage, token_count

__all__ = ["JsonUsage", "SseUsage", "Usage", "read_usage"]

def _choice_index(choices: list[Any]) -> object:
    choice = choices[0]
    index = choice.get("index", 0) if isinstance(choice, dict) else 0
    return index if isinstance(index, int) else 0


def _timings_usage(timings: dict[str, Any]) -> Usage | None:
    """llama.cpp's per-token `timings` (asked for with `timings_per_token`) as a running
    count: prompt_n tokens evaluated, cache_n reused, predicted_n generated."""
    predicted = token_count(timings.get("predicted_n"))
    evaluated = token_count(timings.get("prompt_n"))
    cached = token_count(timings.get("cache_n")) or 0
    if predicted is None or evaluated is None:
        return None
    return Usage(evaluated + cached, predicted, cached)


_BOILERPLATE = frozenset({"id", "object", "created", "model", "system_fingerprint", "choices",
                          "usage", "service_tier"})
_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed",
                         "message_stop"})


class SseUsage(SseEvents):
    """Incremental SSE reader: sums the usage blocks of a stream, reads the served model,
    counts the streamed text, and strips the usage it injected. Holds at most one partial
    event (see SseEvents).

    Final blocks ride on chunks without choices: one per choice in llama.cpp's chat
    streams, one in all from vLLM and OpenAI. llama.cpp's completions put each choice's
    block on its finishing chunk (finish_reason set), indexed prompt by prompt, `n` each.
    Completion tokens are summed over the blocks; a prompt is counted once, as the server
    evaluates it once for all its choices. vLLM's `continuous_usage_stats` blocks, on
    every chunk, are cumulative: never summed; the latest stands only when nothing final
    came (a stream cut short)."""

    def __init__(self, kind: Kind, strip_usage: bool, strip_running: bool = False,
                 per_prompt: int = 1) -> None:
        super().__init__()
        self._kind = kind
        self._per_prompt = max(1, per_prompt)  # choices per prompt (n)
        self._strip = strip_usage  # the client did not ask for the final usage
        self._strip_running = strip_running  # nor for running usage on every chunk
        self._finals: Usage | None = None  # the sum of the choice-less usage blocks
        self._running: Usage | None = None  # the latest cumulative block (Messages API)
        # choice index -> its latest block: llama.cpp's completions put each choice's
        # final count on its finishing chunk; vLLM's continuous_usage_stats and llama.cpp's
        # per-token `timings` give a running count, what a stream cut short has used
        self._progress: dict[object, Usage] = {}
        self._prompt: int | None = None  # known early (Anthropic's message_start)
        self._start: Usage | None = None  # message_start's usage: the prompt and its cache
        self.prompt_missing = False  # a Messages stream's usage without its prompt count
        self.model: str | None = None
        self.ended = False  # the stream's own end marker ([DONE], response.completed...)
        self.streamed_chars = 0
        self.streamed_chunks = 0

    def usage(self) -> Usage | None:
        if self._finals is not None:
            return self._finals
        if self._progress:
            # Each choice's latest block (its finishing one once it finished); a prompt
            # counted once for its `n` choices, indexed prompt by prompt.
            prompts: dict[int, Usage] = {}
            completion = 0
            for index, block in self._progress.items():
                completion += block.completion
                prompt = index // self._per_prompt if isinstance(index, int) else 0
                seen = prompts.get(prompt)
                if seen is None or block.prompt > seen.prompt:
                    prompts[prompt] = block
            return Usage(sum(b.prompt for b in prompts.values()), completion,
                         sum(b.cached for b in prompts.values()))
        running = self._running
        if running is not None and self._prompt is not None and running.prompt == 0:
            return Usage(self._prompt, running.completion, running.cached)
        return running

    def known_prompt(self) -> int | None:
        """The server's own prompt count, when the stream has told it so far."""
        found = self.usage()
        return found.prompt if found is not None and found.prompt else self._prompt

    def _inspect(self, event: bytes) -> bytes | None:
        """Reads one event; returns what to forward instead (b"" drops it), or None to
        forward it unchanged."""
        replaced = None
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.ended = True
                continue
            if not payload or payload[:1] != b"{":
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if self.model is None:
                model = obj.get("model")
                if isinstance(model, str):
                    self.model = model
            choices = obj.get("choices")
            raw_usage = obj.get("usage")
            if raw_usage is None and choices:  # the common token chunk: count its text
                if isinstance(choices, list):
                    self._count_choices(choices)
                if "timings" in obj and isinstance(obj["timings"], dict):
                    progress = _timings_usage(obj["timings"])
                    if progress is not None:
                        self._progress[_choice_index(choices)] = progress
                continue
            kind = obj.get("type")
            if isinstance(kind, str):
                self._typed_event(kind, obj)
                continue
            usage = read_usage(raw_usage)
            if usage is not None:
                strip = self._strip
                if not choices:
                    self._finals = usage if self._finals is None else Usage(
                        max(self._finals.prompt, usage.prompt),
                        self._finals.completion + usage.completion,
                        max(self._finals.cached, usage.cached))
                else:
                    self._progress[_choice_index(choices)] = usage
                    strip = strip or self._strip_running
                if strip:
                    replaced = self._without_usage(obj)
            if isinstance(choices, list) and choices:
                self._count_choices(choices)
        return replaced

    def _without_usage(self, obj: dict[str, Any]) -> bytes:
        """A chunk carrying the usage the gateway asked for, as a client that did not ask
        sees it: without the usage, or gone when nothing else was in it (llama.cpp's
        `timings` and a finishing choice are kept)."""
        if not obj.get("choices") and all(key in _BOILERPLATE for key in obj):
            return b""
        del obj["usage"]
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _typed_event(self, kind: str, obj: dict[str, Any]) -> None:
        """Responses API and Anthropic Messages events."""
        if kind in _END_EVENTS:
            self.ended = True
        if kind.startswith("response."):
            inner = obj.get("response")
            if isinstance(inner, dict):
                if isinstance(inner.get("model"), str):
                    self.model = inner["model"]
                usage = read_usage(inner.get("usage"))
                if usage is not None:
                    self._finals = usage
            delta = obj.get("delta")
            if kind.endswith(".delta") and isinstance(delta, str):
                self._text(delta)
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                usage = read_usage(message.get("usage"))
                if usage is not None:
                    # The prompt only: its output count is no running count (llama.cpp
                    # always says 0), so a stream left early counts its streamed text.
                    self._prompt = usage.prompt
                    self._start = usage
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                completion = token_count(usage.get("output_tokens"))
                if completion is not None:
                    start = self._start
                    prompt = token_count(usage.get("input_tokens")) or self._prompt
                    if prompt is None:
                        self.prompt_missing = True  # no message_start (llama.cpp skips it)
                    self._running = Usage(prompt or 0, completion,
                                          start.cached if start is not None else 0)
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for field in ("text", "partial_json", "thinking"):
                    if isinstance(delta.get(field), str):
                        self._text(delta[field])

    def _count_choices(self, choices: list[Any]) -> None:
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content") or delta.get("reasoning_content")
                if isinstance(text, str):
                    self.streamed_chars += len(text)
                    self.streamed_chunks += 1
                elif "tool_calls" in delta and isinstance(delta["tool_calls"], list):
                    for call in delta["tool_calls"]:
                        function = call.get("function") if isinstance(call, dict) else None
                        if isinstance(function, dict):
                            self._text(str(function.get("arguments") or ""))
            else:
                # completions: a chunk per token, its text empty while a character's bytes
                # are incomplete; the finishing chunk carries none
                text = choice.get("text")
                if isinstance(text, str) and (text or choice.get("finish_reason") is None):
                    self.streamed_chars += len(text)
                    self.streamed_chunks += 1

    def _text(self, text: str) -> None:
        if text:
            self.streamed_chars += len(text)
            self.streamed_chunks += 1

    def streamed_tokens(self) -> int:
        # Servers usually send one token per chunk; characters / 4 covers those that batch.
        return max(self.streamed_chunks, -(-self.streamed_chars // 4))
