"""Token estimates before forwarding, and actual usage read from responses.

Estimates are deliberately simple (characters / 4); the settlement corrects them with the
upstream's reported usage, so they only size the reservation.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

METERED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_USAGE_KEY = b'"usage"'
_MAX_SSE_EVENT = 1024 * 1024


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 4  # a pre-tokenized prompt: one token per id
            elif isinstance(item, dict):
                total += _text_chars(item.get("text"))
            else:
                total += _text_chars(item)
        return total
    return 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                chars += _text_chars(message.get("content"))
    chars += _text_chars(body.get("prompt"))
    chars += _text_chars(body.get("input"))
    return max(1, -(-chars // 4))


MAX_COMPLETION_TOKENS = 10_000_000
MAX_CHOICES = 128


class InvalidEstimate(ValueError):
    """A request field makes the reservation meaningless; the message names the field."""


def _bounded(body: dict[str, Any], field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidEstimate(f"{field} must be an integer between {low} and {high}")
    return value


def completion_reservation(body: dict[str, Any], path: str, default_max_tokens: int) -> int:
    """Completion tokens to reserve: max_tokens (or the default) for every choice asked for."""
    if path == "/v1/embeddings":
        return 0
    per_choice = default_max_tokens
    for field in ("max_tokens", "max_completion_tokens"):
        value = _bounded(body, field, 0, MAX_COMPLETION_TOKENS)
        if value is not None:
            per_choice = value
    choices = max(_bounded(body, "n", 1, MAX_CHOICES) or 1,
                  _bounded(body, "best_of", 1, MAX_CHOICES) or 1)
    return per_choice * choices


def prepare_stream(body: dict[str, Any]) -> bool:
    """Ask a streaming upstream for its usage chunk. True when we injected the request,
    in which case the chunk is ours and is removed before the client sees it."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                              "include_usage": True}
    return True


MAX_REPORTED_TOKENS = 100_000_000


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_REPORTED_TOKENS else None


def _usage_numbers(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) from an OpenAI `usage` object; None when it is not believable,
    so the admission-time estimate stands instead."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        return None
    if "completion_tokens" in usage:
        completion = _count(usage["completion_tokens"])
    else:
        total = _count(usage.get("total_tokens", prompt))
        completion = None if total is None or total < prompt else total - prompt
    return None if completion is None else (prompt, completion)


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


def _usage_object(body: bytes, start: int) -> Any:
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


def usage_from_json(body: bytes) -> tuple[int, int] | None:
    """The `usage` object of a JSON response, read from the last occurrence of the key
    (OpenAI-compatible servers put it at the end) without parsing the whole body."""
    index = body.rfind(_USAGE_KEY)
    while index >= 0:
        start = body.find(b"{", index + len(_USAGE_KEY))
        colon = body.find(b":", index + len(_USAGE_KEY))
        if start > 0 and colon > 0 and body[colon + 1 : start].strip() == b"":
            return _usage_numbers(_usage_object(body, start))
        index = body.rfind(_USAGE_KEY, 0, index)
    return None


class JsonUsage:
    """Collects a JSON response body (bounded) to read its usage at the end."""

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        # Keep only the tail once over the limit: the usage object sits at the end.
        while self._size > self._limit and len(self._chunks) > 1:
            self._size -= len(self._chunks.pop(0))

    def usage(self) -> tuple[int, int] | None:
        return usage_from_json(b"".join(self._chunks))


_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _event_ends(data: bytes) -> list[int]:
    """Where each complete event in `data` ends (just after its blank line)."""
    if b"\r" in data:
        return [match.end() for match in _EVENT_END.finditer(data)]
    ends = []  # the usual "\n\n" only: bytes.find is ten times faster than the regex
    index = data.find(b"\n\n")
    while index >= 0:
        ends.append(index + 2)
        index = data.find(b"\n\n", index + 2)
    return ends


class SseUsage:
    """Incremental SSE reader: finds the usage chunk, counts streamed completion text, and
    optionally removes the usage chunk it injected. Holds at most one partial event."""

    def __init__(self, strip_usage: bool) -> None:
        self._strip = strip_usage
        self._pending = b""
        self._skipping = False
        self.skipped = False  # an event was too large to read: usage may have been missed
        self.found: tuple[int, int] | None = None  # the latest usage seen (may be running)
        self.final = False  # the usage chunk proper (no choices) has been seen
        self.streamed_chars = 0
        self.streamed_chunks = 0

    def feed(self, chunk: bytes) -> bytes:
        """Returns the bytes to forward now."""
        out: list[bytes] = []
        if self._skipping:
            # Inside an event too large to parse: pass it through up to its end.
            end = _EVENT_END.search(self._pending[-3:] + chunk)
            if end is None:
                self._pending = chunk[-3:]
                return chunk
            cut = max(0, end.end() - len(self._pending[-3:]))
            out.append(chunk[:cut])
            chunk, self._pending, self._skipping = chunk[cut:], b"", False
        data = self._pending + chunk
        position = 0
        for stop in _event_ends(data):
            event = data[position:stop]
            position = stop
            if not self._inspect(event):
                out.append(event)
        self._pending = data[position:]
        if len(self._pending) > _MAX_SSE_EVENT:
            # Never buffer without bound: forward this event unparsed and resume after it.
            out.append(self._pending)
            self._pending = self._pending[-3:]
            self._skipping = self.skipped = True
        return b"".join(out)

    def flush(self) -> bytes:
        pending, self._pending = self._pending, b""
        if self._skipping:
            self._skipping = False
            return b""  # already forwarded
        if pending and self._inspect(pending):
            return b""
        return pending

    def _inspect(self, event: bytes) -> bool:
        """Reads one event; True when it is the injected usage chunk to drop."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            usage = _usage_numbers(obj.get("usage"))
            if usage is not None:
                self.found = usage
                # Running usage (vLLM's continuous_usage_stats) rides on chunks that still
                # carry choices; only the chunk without choices is the final count.
                self.final = self.final or not obj.get("choices")
            self._count_text(obj.get("choices"))
            if usage is not None and self._strip and not obj.get("choices"):
                return True
        return False

    def _count_text(self, choices: Any) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                self.streamed_chars += len(text)
                self.streamed_chunks += 1

    def streamed_tokens(self) -> int:
        # Servers usually send one token per chunk; characters / 4 covers those that batch.
        return max(self.streamed_chunks, -(-self.streamed_chars // 4))
