"""What an inference request may cost, decided before it is forwarded.

The gateway reserves an upper bound of the work and then makes the upstream keep to it: the
completion bound it reserved is written into the forwarded body, over every field that
could raise it. Fields that decide money must be well-typed; anything the gateway cannot
read the way the upstreams read it is a 400 naming the field, never a guess.

The prompt bound is the body's size in bytes: byte-level BPE and byte-fallback tokenizers
never make more tokens than bytes, the JSON around each message outweighs the chat
template's markers, and a small allowance covers a template's own system text. Media parts
(images, audio, video), which a server expands far beyond their URL's length, add a fixed
allowance each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config.limits import RunningUsage
from gateway.config.routes import (
    AUDIO,
    BOUND_FIELD_ADDED,
    BOUND_FIELDS,
    COMPLETIONS,
    RESPONSES,
    WITH_CHOICES,
    Kind,
    Route,
)

MAX_COMPLETION_TOKENS = 10_000_000
MAX_CHOICES = 128
MAX_PROMPTS = 10_000
TEMPLATE_ALLOWANCE_TOKENS = 32
# OpenAI chat and Responses parts, vLLM's audio and video parts, Anthropic's image parts
# ("type": "image") and llama.cpp's multimodal_data lists.
_MEDIA_MARKERS = (b'"image_url"', b'"input_image"', b'"input_audio"', b'"video_url"',
                  b'"audio_url"', b'"image"', b'"multimodal_data"')


class InvalidRequest(ValueError):
    """A field that decides the price cannot be read; the message names the field."""


@dataclass(slots=True)
class Bound:
    """An upper bound of one request's work: prompt tokens, and completion tokens as
    sequences x per_sequence."""

    kind: Kind
    prompt_tokens: int
    per_sequence: int
    sequences: int
    stream: bool = False
    inject_usage: bool = False  # the gateway asked a stream for its usage chunk
    inject_running: bool = False  # ... and for vLLM's running usage on every chunk
    inject_timings: bool = False  # ... and for llama.cpp's per-token timings
    model: str | None = None  # what the request names
    payload: dict[str, Any] | None = None
    prompts: int = 1
    _rewrite: bool = False  # the body does not already say `per_sequence` alone
    choices: int = 1  # the choices answered per prompt (their indices run prompt by prompt)

    @property
    def completion_tokens(self) -> int:
        return self.per_sequence * self.sequences

    def forwarded_body(self, body: bytes, admitted_per_sequence: int) -> bytes:
        """The body to forward when admission granted `admitted_per_sequence` (perhaps less
        than asked): the original bytes when they already say exactly that."""
        payload = self.payload
        if payload is None or (not self._rewrite and admitted_per_sequence == self.per_sequence):
            return body
        if self.kind in BOUND_FIELDS:
            payload[BOUND_FIELD_ADDED[self.kind]] = admitted_per_sequence
            for name in BOUND_FIELDS[self.kind]:
                if name in payload:
                    payload[name] = admitted_per_sequence
            minimum = payload.get("min_tokens")
            if isinstance(minimum, int) and minimum > admitted_per_sequence:
                payload["min_tokens"] = admitted_per_sequence
        if self.inject_usage or self.inject_running:
            options = payload.get("stream_options")
            options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            if self.inject_running:
                options["continuous_usage_stats"] = True
            payload["stream_options"] = options
        if self.inject_timings:
            payload["timings_per_token"] = True
        return orjson.dumps(payload)


# Fields whose value decides what the upstream generates, or its price.
_MONEY_FIELDS = tuple((name, b'"%s"' % name.encode()) for name in (
    "max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens", "n", "best_of",
    "n_cmpl", "min_tokens", "stream", "stream_options", "prompt", "model",
    "timings_per_token"))
_SMALL_BODY = 16 * 1024


def _ambiguous(body: bytes, payload: dict[str, Any]) -> bool:
    """Whether the raw body could be read differently from the payload parsed here: a
    money field written twice (orjson keeps the last; a parser that keeps the first would
    see another bound) or a key spelled with escapes. Such a body, and a large one (where
    the checks cost more than writing it anew), is forwarded as re-serialized."""
    if len(body) > _SMALL_BODY or b"\\u" in body:
        return True
    return any(name in payload and body.count(quoted) != 1 for name, quoted in _MONEY_FIELDS)


def media_parts(body: bytes) -> int:
    if (b"_url" not in body and b"input_" not in body and b'"image"' not in body
            and b"multimodal_data" not in body):
        return 0  # the common text-only body: four scans instead of seven
    return sum(body.count(marker) for marker in _MEDIA_MARKERS)


def prompt_bound(body: bytes, media_tokens: int) -> int:
    return len(body) + TEMPLATE_ALLOWANCE_TOKENS + media_parts(body) * media_tokens


def _limit(payload: dict[str, Any], name: str) -> int | None:
    """A completion limit: absent, null and 0 all mean "not set" (vLLM reads
    `max_completion_tokens or max_tokens`); llama.cpp's `n_predict: -1` means "no limit"."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if value == -1 and name == "n_predict":
        return None
    if not 0 <= value <= MAX_COMPLETION_TOKENS:
        raise InvalidRequest(f"{name} must be an integer between 0 and {MAX_COMPLETION_TOKENS}")
    return value or None


def _count(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise InvalidRequest(f"{name} must be an integer between 1 and {MAX_CHOICES}")
    return value


def _choices(payload: dict[str, Any]) -> int:
    """The choices answered per prompt: llama.cpp reads `n_cmpl` before its alias `n`, the
    others read `n` alone; a body where they disagree would be read two ways."""
    n = _count(payload, "n")
    if "n_cmpl" not in payload:
        return n
    n_cmpl = _count(payload, "n_cmpl")
    if "n" in payload and n != n_cmpl:
        raise InvalidRequest("n and n_cmpl must be equal when both are given")
    return n_cmpl


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds: a string or one list of token ids is
    one; a list of strings or of token-id lists is one each."""
    if not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return 1
    if len(prompt) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt must hold at most {MAX_PROMPTS} prompts")
    return len(prompt)


def _stream(payload: dict[str, Any], kind: Kind,
            running: RunningUsage) -> tuple[bool, bool, bool, bool]:
    """(streamed, ask for the usage chunk, for running usage, for per-token timings)."""
    stream = _flag(payload.get("stream"), "stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object")
    asked = continuous = False
    if options is not None:
        asked = _flag(options.get("include_usage"), "stream_options.include_usage")
        continuous = _flag(options.get("continuous_usage_stats"),
                           "stream_options.continuous_usage_stats")
    timings = _flag(payload.get("timings_per_token"), "timings_per_token")
    # The Responses and Messages APIs always end a stream with its usage.
    if not stream or kind not in WITH_CHOICES:
        return stream, False, False, False
    inject_running = running.continuous_usage and not continuous
    return stream, not asked, inject_running, running.timings_per_token and not timings


_NO_RUNNING = RunningUsage()


def analyse(route: Route, kind: Kind, body: bytes, payload: dict[str, Any] | None,
            max_output_tokens: int, media_tokens: int,
            running: RunningUsage = _NO_RUNNING) -> Bound:
    """The bound of a request on `route`; `kind` is the route's own, or for /invocations
    the one its body asks for. Raises InvalidRequest naming a field that cannot be read."""
    if payload is None or kind is AUDIO:  # priced per request
        return Bound(kind, 0, 0, 1)
    model = payload.get("model")
    model = model if isinstance(model, str) else None
    prompt = prompt_bound(body, media_tokens)
    if kind not in BOUND_FIELDS:
        stream = "stream" in payload and _flag(payload["stream"], "stream")
        return Bound(kind, prompt, 0, 1, stream, False, model=model)
    requested = None
    fields = BOUND_FIELDS[kind]
    added = BOUND_FIELD_ADDED[kind]
    only_added = added in payload  # the one field every upstream reads, and no other
    for name in fields:
        if name in payload:
            only_added = only_added and name == added
            value = _limit(payload, name)
            if requested is None:
                requested = value
    per_sequence = max_output_tokens if requested is None else min(requested,
                                                                    max_output_tokens)
    minimum = payload.get("min_tokens")
    if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int)
                                or minimum < 0):
        raise InvalidRequest("min_tokens must be a non-negative integer")
    sequences = prompts = choices = 1
    if kind in WITH_CHOICES and (
            "n" in payload or "best_of" in payload or "n_cmpl" in payload):
        choices = _choices(payload)
        sequences = max(choices, _count(payload, "best_of"))  # vLLM's best_of makes more
    elif kind is RESPONSES and ("n" in payload or "n_cmpl" in payload) \
            and _choices(payload) != 1:
        # llama.cpp would answer a list of responses, one usage each: one response only.
        raise InvalidRequest("n must be 1 on this route")
    if kind is COMPLETIONS:
        prompts = prompt_count(payload.get("prompt"))
        sequences *= prompts
    stream = inject = inject_running = inject_timings = False
    if "stream" in payload or "stream_options" in payload or "timings_per_token" in payload:
        stream, inject, inject_running, inject_timings = _stream(payload, kind, running)
    rewrite = (inject or inject_running or inject_timings or not only_added
               or requested != per_sequence
               or (isinstance(minimum, int) and minimum > per_sequence)
               or _ambiguous(body, payload))
    return Bound(kind, prompt, per_sequence, sequences, stream, inject, inject_running,
                 inject_timings, model, payload, prompts, rewrite, choices)

