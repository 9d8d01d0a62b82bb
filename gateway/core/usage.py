"""Usage and the served model read from JSON bodies, in every shape the supported upstreams
send: OpenAI's `prompt_tokens` / `completion_tokens` (with
`prompt_tokens_details.cached_tokens`), the Responses API's `input_tokens` / `output_tokens`
and the Anthropic Messages API's, whose cache reads are counted apart. The model the upstream
reports decides the price. Streams are read in gateway.core.metering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

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


def token_count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_REPORTED_TOKENS else None


def _cached(usage: dict[str, Any]) -> int:
    for details in ("prompt_tokens_details", "input_tokens_details"):
        inner = usage.get(details)
        if isinstance(inner, dict):
            return token_count(inner.get("cached_tokens")) or 0
    return 0


def read_usage(usage: Any) -> Usage | None:
    """A usage object in any of the supported shapes; None when it is not believable, so
    the admission-time bound stands instead."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:
        prompt = token_count(usage["prompt_tokens"])
        if prompt is None:
            return None
        if "completion_tokens" in usage:
            completion = token_count(usage["completion_tokens"])
        else:  # embeddings, score: a total that is all prompt
            total = token_count(usage.get("total_tokens", prompt))
            completion = None if total is None or total < prompt else total - prompt
        return None if completion is None else Usage(prompt, completion, _cached(usage))
    if "input_tokens" in usage:
        prompt = token_count(usage["input_tokens"])
        completion = token_count(usage.get("output_tokens", 0))
        if prompt is None or completion is None:
            return None
        # Anthropic counts cache reads and writes apart from input_tokens.
        reads = token_count(usage.get("cache_read_input_tokens")) or 0
        writes = token_count(usage.get("cache_creation_input_tokens")) or 0
        return Usage(prompt + reads + writes, completion, reads or _cached(usage))
    total = token_count(usage.get("total_tokens"))  # vLLM's rerank reports a total only
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
