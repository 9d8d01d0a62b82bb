"""The SSE usage reader, whatever the chunking and line endings: it forwards every byte but
the usage chunk it injected, finds the usage, and counts the streamed text."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.routes import Kind
from gateway.core.metering import SseUsage, Usage


def _event(doc: object, newline: bytes) -> bytes:
    return b"data: " + orjson.dumps(doc) + newline + newline


words = st.lists(st.text(alphabet="ab cd\n\"\\é", min_size=1, max_size=12), min_size=0,
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(words=words, newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       strip=st.booleans(), cuts=st.data())
def test_any_chunking_gives_the_same_stream_usage_and_counts(
        words: list[str], newline: bytes, strip: bool, cuts: st.DataObject) -> None:
    text_events = [_event({"choices": [{"index": 0, "delta": {"content": w}}]}, newline)
                   for w in words]
    usage_event = _event({"choices": [], "usage": {"prompt_tokens": 7,
                                                   "completion_tokens": len(words)}}, newline)
    done = b"data: [DONE]" + newline + newline
    stream = b"".join(text_events) + usage_event + done
    points = sorted(cuts.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    reader = SseUsage(Kind.CHAT, strip)
    out = b"".join(reader.feed(piece) for piece in pieces) + reader.flush()

    expected = b"".join(text_events) + (b"" if strip else usage_event) + done
    assert out == expected
    assert reader.usage() == Usage(7, len(words)) and reader.ended
    assert reader.streamed_chunks == len(words)
    assert reader.streamed_chars == sum(len(w) for w in words)


def _stream(*docs: object) -> bytes:
    return b"".join(_event(d, b"\n") for d in docs) + b"data: [DONE]\n\n"


def _read(stream: bytes, kind: Kind = Kind.CHAT, strip: bool = False) -> tuple[SseUsage, bytes]:
    reader = SseUsage(kind, strip)
    out = reader.feed(stream) + reader.flush()
    return reader, out


def test_usage_blocks_per_choice_and_per_prompt_are_summed() -> None:
    # llama.cpp: one final block (no choices) for each choice of n > 1, or each prompt
    reader, _ = _read(_stream(
        {"choices": [{"index": 0, "delta": {"content": "a"}}], "model": "m"},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 0}}},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 5}}}))
    # the prompt is evaluated once for both choices (the second reuses it from the cache)
    assert reader.usage() == Usage(5, 14, 5)
    assert reader.model == "m"


def test_prompt_list_blocks_count_each_prompt_once_and_every_choice() -> None:
    # llama.cpp's completions: a block on each choice's finishing chunk, indexed prompt by
    # prompt (n = 2 here: indices 0-1 are the first prompt, 2-3 the second)
    def finishing(index: int, prompt: int, completion: int) -> dict[str, object]:
        return {"choices": [{"index": index, "text": "", "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}

    reader = SseUsage(Kind.COMPLETIONS, False, per_prompt=2)
    reader.feed(_stream(finishing(1, 6, 3), finishing(0, 6, 3), finishing(3, 4, 3),
                        finishing(2, 4, 3)))
    assert reader.usage() == Usage(10, 12)


def test_cumulative_running_usage_is_never_summed() -> None:
    # vLLM's continuous_usage_stats: every chunk with choices carries the running total
    running = [{"choices": [{"index": 0, "delta": {"content": "a"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": i}} for i in range(1, 4)]
    reader, _ = _read(_stream(*running))
    assert reader.usage() == Usage(5, 3)
    reader, _ = _read(_stream(*running, {"choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 3}}))
    assert reader.usage() == Usage(5, 3)


def test_a_stripped_usage_chunk_keeps_what_else_it_carried() -> None:
    timings = {"prompt_n": 5, "predicted_n": 3}
    _, out = _read(_stream({"choices": [], "usage": {"prompt_tokens": 5,
                                                     "completion_tokens": 3},
                            "timings": timings, "model": "m"}), strip=True)
    assert out == _event({"choices": [], "timings": timings, "model": "m"}, b"\n") \
        + b"data: [DONE]\n\n"


def test_responses_api_stream_usage_and_model() -> None:
    reader, _ = _read(
        _event({"type": "response.created", "response": {"model": "r1"}}, b"\n")
        + _event({"type": "response.output_text.delta", "delta": "hello"}, b"\n")
        + _event({"type": "response.completed", "response": {
            "model": "r1", "usage": {"input_tokens": 9, "output_tokens": 4,
                                     "input_tokens_details": {"cached_tokens": 2}}}},
            b"\n"), Kind.RESPONSES)
    assert reader.usage() == Usage(9, 4, 2) and reader.model == "r1" and reader.ended
    assert reader.streamed_chars == 5


def test_messages_api_stream_usage_from_start_and_delta() -> None:
    stream = (b"event: message_start\n" + _event({"type": "message_start", "message": {
        "model": "claude-ish", "usage": {"input_tokens": 11, "output_tokens": 1}}}, b"\n")
        + b"event: content_block_delta\n" + _event(
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
            b"\n"))
    reader = SseUsage(Kind.MESSAGES, False)
    reader.feed(stream)
    assert reader.known_prompt() == 11 and not reader.ended  # known before the end
    reader.feed(b"event: message_delta\n" + _event(
        {"type": "message_delta", "usage": {"output_tokens": 6}}, b"\n")
        + b"event: message_stop\n" + _event({"type": "message_stop"}, b"\n"))
    assert reader.usage() == Usage(11, 6) and reader.ended
    assert reader.model == "claude-ish"


def test_message_start_is_the_prompt_not_a_running_count() -> None:
    """llama.cpp's message_start always says output_tokens 0: a stream left before its
    message_delta has no usage yet, so the streamed text is what counts."""
    reader = SseUsage(Kind.MESSAGES, False)
    reader.feed(b"event: message_start\n" + _event({"type": "message_start", "message": {
        "usage": {"input_tokens": 20, "output_tokens": 0}}}, b"\n")
        + b"event: content_block_delta\n" + _event(
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abc"}},
            b"\n"))
    assert reader.usage() is None
    assert reader.known_prompt() == 20
    assert reader.streamed_tokens() >= 1


def test_a_messages_stream_without_its_prompt_count_says_so() -> None:
    reader = SseUsage(Kind.MESSAGES, False)
    reader.feed(b"event: message_delta\n" + _event(
        {"type": "message_delta", "usage": {"output_tokens": 5}}, b"\n"))
    assert reader.usage() == Usage(0, 5) and reader.prompt_missing
    told = SseUsage(Kind.MESSAGES, False)
    told.feed(b"event: message_delta\n" + _event(
        {"type": "message_delta", "usage": {"input_tokens": 9, "output_tokens": 5}}, b"\n"))
    assert told.usage() == Usage(9, 5) and not told.prompt_missing
