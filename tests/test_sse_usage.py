"""The SSE usage reader, whatever the chunking and line endings: it forwards every byte but
the usage chunk it injected, finds the usage, and counts the streamed text."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.metering import SseUsage


def _event(doc: object, newline: bytes) -> bytes:
    return b"data: " + orjson.dumps(doc) + newline + newline


words = st.lists(st.text(alphabet="ab cd\n\"\\é", min_size=1, max_size=12), min_size=0,
                 max_size=12)


@settings(max_examples=300, deadline=None)
@given(words=words, crlf=st.booleans(), strip=st.booleans(), cuts=st.data())
def test_any_chunking_gives_the_same_stream_usage_and_counts(
        words: list[str], crlf: bool, strip: bool, cuts: st.DataObject) -> None:
    newline = b"\r\n" if crlf else b"\n"
    text_events = [_event({"choices": [{"index": 0, "delta": {"content": w}}]}, newline)
                   for w in words]
    usage_event = _event({"choices": [], "usage": {"prompt_tokens": 7,
                                                   "completion_tokens": len(words)}}, newline)
    done = b"data: [DONE]" + newline + newline
    stream = b"".join(text_events) + usage_event + done
    points = sorted(cuts.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    reader = SseUsage(strip)
    out = b"".join(reader.feed(piece) for piece in pieces) + reader.flush()

    expected = b"".join(text_events) + (b"" if strip else usage_event) + done
    assert out == expected
    assert reader.found == (7, len(words)) and reader.final
    assert reader.streamed_chunks == len(words)
    assert reader.streamed_chars == sum(len(w) for w in words)
