"""Admission-time estimates: what a request reserves before the upstream answers."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.metering import (
    MAX_COMPLETION_TOKENS,
    InvalidEstimate,
    completion_reservation,
    estimate_prompt_tokens,
)

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("body,tokens", [
    ({"messages": [{"role": "user", "content": "x" * 41}]}, 11),  # characters / 4, rounded up
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 40},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "y" * 8}]}]}, 12),  # the text parts of a list content
    ({"prompt": [101, 102, 103]}, 3),  # pre-tokenized: one token per id
    ({"prompt": ["x" * 8, "y" * 8]}, 4),
    ({"input": "x" * 400}, 100),
    ({"input": ["x" * 8, "y" * 12]}, 5),
    ({}, 1),  # never 0
])
def test_prompt_estimate_counts_every_text_field(body: dict[str, Any], tokens: int) -> None:
    assert estimate_prompt_tokens(body) == tokens


@pytest.mark.parametrize("body,path,tokens", [
    ({}, CHAT, 1024),  # the default applies when the client names no limit
    ({"n": 3}, CHAT, 3 * 1024),
    ({"max_tokens": 50}, CHAT, 50),
    ({"max_completion_tokens": 70}, CHAT, 70),  # the newer name is honoured too
    ({"max_completion_tokens": 70, "n": 2}, CHAT, 140),
    ({"max_tokens": 10, "best_of": 5, "n": 2}, "/v1/completions", 50),  # best_of generates more
    ({"max_tokens": 10, "n": 4, "best_of": 2}, "/v1/completions", 40),
    ({"max_tokens": MAX_COMPLETION_TOKENS}, CHAT, MAX_COMPLETION_TOKENS),
    ({"max_tokens": 50, "n": 3}, "/v1/embeddings", 0),  # embeddings generate nothing
    ({}, "/v1/embeddings", 0),
])
def test_completion_reservation(body: dict[str, Any], path: str, tokens: int) -> None:
    assert completion_reservation(body, path, 1024) == tokens


@pytest.mark.parametrize("body", [
    {"max_tokens": MAX_COMPLETION_TOKENS + 1},
    {"max_completion_tokens": MAX_COMPLETION_TOKENS + 1},
    {"max_completion_tokens": -1},
    {"max_completion_tokens": 1.5},
    {"best_of": 0},
])
def test_absurd_limits_are_refused_naming_the_field(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidEstimate, match=next(iter(body))):
        completion_reservation(body, CHAT, 1024)
