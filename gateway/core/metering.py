"""Actual usage read from responses: JSON bodies and server-sent event streams.

Every usage shape the supported upstreams send is read here: OpenAI's `prompt_tokens` /
`completion_tokens` (with `prompt_tokens_details.cached_tokens`), the Responses API's
`input_tokens` / `output_tokens` and the Anthropic Messages API's, whose cache reads are
counted apart. The model the upstream reports is read too: it decides the price.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config.routes import Kind
from gateway.core.sse import SseEvents

_USAGE_KEY = b'"usage"'
_MODEL_KEY = b'"model"'
MAX_REPORTED_TOKENS = 100_000_000
_TAIL_BYTES = 256 * 1024  # of a JSON body: kept whole up to this, then its tail
_HEAD_BYTES = 16 * 1024


@dataclass(slots=True)
class Usage:
    prompt: int
    completion: int
    cached: int = 0  # of the prompt tokens, those served from a prompt cache

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt + other.prompt, self.completion + other.completion,
                     self.cached + other.cached)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_REPORTED_TOKENS else None


def _cached(usage: dict[str, Any]) -> int:
    for details in ("prompt_tokens_details", "input_tokens_details"):
        inner = usage.get(details)
        if isinstance(inner, dict):
            return _count(inner.get("cached_tokens")) or 0
    return 0


def read_usage(usage: Any) -> Usage | None:
    """A usage object in any of the supported shapes; None when it is not believable, so
    the admission-time bound stands instead."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:
        prompt = _count(usage["prompt_tokens"])
        if prompt is None:
            return None
        if "completion_tokens" in usage:
            completion = _count(usage["completion_tokens"])
        else:  # embeddings, score: a total that is all prompt
            total = _count(usage.get("total_tokens", prompt))
            completion = None if total is None or total < prompt else total - prompt
        return None if completion is None else Usage(prompt, completion, _cached(usage))
    if "input_tokens" in usage:
        prompt = _count(usage["input_tokens"])
        completion = _count(usage.get("output_tokens", 0))
        if prompt is None or completion is None:
            return None
        # Anthropic counts cache reads and writes apart from input_tokens.
        reads = _count(usage.get("cache_read_input_tokens")) or 0
        writes = _count(usage.get("cache_creation_input_tokens")) or 0
        return Usage(prompt + reads + writes, completion, reads or _cached(usage))
    total = _count(usage.get("total_tokens"))  # vLLM's rerank reports a total only
    return None if total is None else Usage(total, 0)


def _matching_brace(data: bytes, start: int) -> int:
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(data)):
        c = data[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i
    return -1


_BRACE_TRIES = 4


def _object_at(body: bytes, start: int) -> Any:
    """The JSON object that opens at `start`. Usage objects are small and nest little, so
    letting orjson try each closing brace in turn beats scanning bytes in Python."""
    end = start
    for _ in range(_BRACE_TRIES):
        end = body.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            return orjson.loads(body[start : end + 1])
        except orjson.JSONDecodeError:
            continue
    end = _matching_brace(body, start)
    if end < 0:
        return None
    try:
        return orjson.loads(body[start : end + 1])
    except orjson.JSONDecodeError:
        return None


def usage_from_json(body: bytes) -> Usage | None:
    """The `usage` object of a JSON body, read from the last occurrence of the key
    (OpenAI-compatible servers put it at the end) without parsing the whole body."""
    index = body.rfind(_USAGE_KEY)
    while index >= 0:
        start = body.find(b"{", index + len(_USAGE_KEY))
        colon = body.find(b":", index + len(_USAGE_KEY))
        if start > 0 and colon > 0 and body[colon + 1 : start].strip() == b"":
            return read_usage(_object_at(body, start))
        index = body.rfind(_USAGE_KEY, 0, index)
    return None


def model_from_json(body: bytes) -> str | None:
    """The first `"model": "..."` of a body too large to parse whole."""
    index = body.find(_MODEL_KEY)
    while index >= 0:
        colon = body.find(b":", index + len(_MODEL_KEY))
        quote = body.find(b'"', colon + 1) if colon > 0 else -1
        if quote > 0 and body[index + len(_MODEL_KEY) : colon].strip() == b"" \
                and body[colon + 1 : quote].strip() == b"":
            end = body.find(b'"', quote + 1)
            if end > 0:
                try:
                    value = orjson.loads(body[quote : end + 1])
                except orjson.JSONDecodeError:
                    return None
                return value if isinstance(value, str) else None
        index = body.find(_MODEL_KEY, index + 1)
    return None


def _choice_index(choices: list[Any]) -> object:
    choice = choices[0]
    index = choice.get("index", 0) if isinstance(choice, dict) else 0
    return index if isinstance(index, int) else 0


def _timings_usage(timings: dict[str, Any]) -> Usage | None:
    """llama.cpp's per-token `timings` (asked for with `timings_per_token`) as a running
    count: prompt_n tokens evaluated, cache_n reused, predicted_n generated."""
    predicted = _count(timings.get("predicted_n"))
    evaluated = _count(timings.get("prompt_n"))
    cached = _count(timings.get("cache_n")) or 0
    if predicted is None or evaluated is None:
        return None
    return Usage(evaluated + cached, predicted, cached)


class JsonUsage:
    """Collects a JSON response body (its head and a bounded tail) to read its usage and
    model at the end."""

    def __init__(self, limit: int = _TAIL_BYTES) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._first = b""  # the body's first piece: its head, should the rest be dropped
        self._dropped = False
        # llama.cpp's non-streamed answer to n > 1 or a prompt list reports the usage of
        # its first result only (it merges the others' choices but not their usage).
        self.first_result_only = False

    def feed(self, chunk: bytes) -> None:
        if not self._chunks and not self._dropped:
            self._first = chunk
        self._chunks.append(chunk)
        self._size += len(chunk)
        # Keep only the tail once over the limit: the usage object sits at the end.
        while self._size > self._limit and len(self._chunks) > 1:
            self._size -= len(self._chunks.pop(0))
            self._dropped = True

    def result(self) -> tuple[Usage | None, str | None]:
        """(usage, served model) of the body: parsed whole when it was kept whole (orjson
        reads a typical answer faster than a search for its keys), else read from where
        they sit: the last `"usage"` object of the tail, or one in the head (llama.cpp's
        embeddings put it first), and the first `"model"` of the head."""
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        if not self._dropped:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict):
                choices = doc.get("choices")
                # llama.cpp's answer to n > 1 or a prompt list: `timings`, several choices
                self.first_result_only = ("timings" in doc and isinstance(choices, list)
                                          and len(choices) > 1)
                usage = doc.get("usage")
                model = doc.get("model")
                if usage is None and isinstance(doc.get("response"), dict):
                    usage = doc["response"].get("usage")  # a Responses API event
                    model = doc["response"].get("model")
                return read_usage(usage), model if isinstance(model, str) else None
        head = self._first[:_HEAD_BYTES]
        # Too large to hold: llama.cpp's `timings` in the tail say its server answered, and
        # for n > 1 or a prompt list (the caller knows) only the first result's usage.
        self.first_result_only = self._dropped and b'"timings"' in body
        usage = usage_from_json(body)
        if usage is None:
            usage = usage_from_json(head)
        return usage, model_from_json(head)


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
                completion = _count(usage.get("output_tokens"))
                if completion is not None:
                    start = self._start
                    prompt = _count(usage.get("input_tokens")) or self._prompt
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
