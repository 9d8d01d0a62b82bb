"""Admission-time bounds: what a request reserves, and the body the upstream is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config.routes import Kind, Route
from gateway.core.bounds import (
    MAX_COMPLETION_TOKENS,
    TEMPLATE_ALLOWANCE_TOKENS,
    Bound,
    InvalidRequest,
    analyse,
    prompt_bound,
)

CHAT = Route("/v1/chat/completions", Kind.CHAT)
COMPLETIONS = Route("/v1/completions", Kind.COMPLETIONS)
EMBEDDINGS = Route("/v1/embeddings", Kind.EMBEDDINGS)
RESPONSES = Route("/v1/responses", Kind.RESPONSES)
MESSAGES = Route("/v1/messages", Kind.MESSAGES)


def bound(payload: dict[str, Any], route: Route = CHAT, maximum: int = 1024) -> Bound:
    body = orjson.dumps(payload)
    return analyse(route, route.kind, body, payload, maximum, 4096)


def forwarded(payload: dict[str, Any], route: Route = CHAT, admitted: int | None = None,
              maximum: int = 1024) -> dict[str, Any]:
    b = bound(payload, route, maximum)
    body = orjson.dumps(payload)
    out = b.forwarded_body(body, b.per_sequence if admitted is None else admitted)
    doc = orjson.loads(out)
    assert isinstance(doc, dict)
    return doc


def test_the_prompt_bound_is_the_body_in_bytes_plus_the_template_allowance() -> None:
    body = '{"messages":[{"role":"user","content":"héllo"}]}'.encode()
    assert prompt_bound(body, 4096) == len(body) + TEMPLATE_ALLOWANCE_TOKENS
    image = b'{"messages":[{"content":[{"type":"image_url","image_url":{"url":"x"}}]}]}'
    # "image_url" appears twice (the type and the key): each media marker adds an allowance
    assert prompt_bound(image, 100) == len(image) + TEMPLATE_ALLOWANCE_TOKENS + 2 * 100
    anthropic = (b'{"messages":[{"role":"user","content":[{"type":"image","source":'
                 b'{"type":"url","url":"https://example.com/cat.png"}}]}]}')
    assert prompt_bound(anthropic, 100) == len(anthropic) + TEMPLATE_ALLOWANCE_TOKENS + 100
    llama = b'{"prompt":{"prompt_string":"<__media__>","multimodal_data":["aGk="]}}'
    assert prompt_bound(llama, 100) == len(llama) + TEMPLATE_ALLOWANCE_TOKENS + 100


@pytest.mark.parametrize("payload,route,per_sequence,sequences", [
    ({}, CHAT, 1024, 1),  # the configured maximum when the client names no limit
    ({"n": 3}, CHAT, 1024, 3),
    ({"max_tokens": 50}, CHAT, 50, 1),
    ({"max_completion_tokens": 70}, CHAT, 70, 1),
    ({"max_completion_tokens": 70, "n": 2}, CHAT, 70, 2),
    # vLLM and SGLang read `max_completion_tokens or max_tokens`: 0 and null mean absent
    ({"max_tokens": 5000, "max_completion_tokens": 0}, CHAT, 1024, 1),
    ({"max_tokens": 500, "max_completion_tokens": 0}, CHAT, 500, 1),
    ({"max_tokens": 500, "max_completion_tokens": None}, CHAT, 500, 1),
    ({"max_tokens": 0}, CHAT, 1024, 1),
    ({"n_predict": -1, "max_tokens": 20}, CHAT, 20, 1),  # llama.cpp's "no limit"
    ({"n_predict": 30}, CHAT, 30, 1),
    ({"max_tokens": 99_999}, CHAT, 1024, 1),  # never above the configured maximum
    ({"max_tokens": 10, "best_of": 5, "n": 2}, COMPLETIONS, 10, 5),
    ({"max_tokens": 10, "n": 4, "best_of": 2}, COMPLETIONS, 10, 4),
    ({"max_tokens": 10, "n_cmpl": 3}, CHAT, 10, 3),  # llama.cpp's own name for n
    ({"max_tokens": 10, "prompt": ["a", "b", "c"]}, COMPLETIONS, 10, 3),
    ({"max_tokens": 10, "prompt": ["a", "b"], "n": 2}, COMPLETIONS, 10, 4),
    ({"max_tokens": 10, "prompt": [[1, 2], [3]]}, COMPLETIONS, 10, 2),
    ({"max_tokens": 10, "prompt": [1, 2, 3]}, COMPLETIONS, 10, 1),  # one tokenized prompt
    ({"max_tokens": 10, "prompt": "abc"}, COMPLETIONS, 10, 1),
    ({"max_output_tokens": 40, "max_tokens": 999}, RESPONSES, 40, 1),
    # llama.cpp serves a response as a chat request of the same body
    ({"n_predict": 30}, RESPONSES, 30, 1),
    ({"max_output_tokens": 0, "max_completion_tokens": 50}, RESPONSES, 50, 1),
    ({"n": 1, "n_cmpl": 1}, RESPONSES, 1024, 1),
    ({"max_tokens": 40}, MESSAGES, 40, 1),
    ({"max_tokens": 50, "n": 3}, EMBEDDINGS, 0, 1),  # embeddings generate nothing
])
def test_completion_bound(payload: dict[str, Any], route: Route, per_sequence: int,
                          sequences: int) -> None:
    b = bound(payload, route)
    assert (b.per_sequence, b.sequences) == (per_sequence, sequences)


@pytest.mark.parametrize("payload,field", [
    ({"max_tokens": MAX_COMPLETION_TOKENS + 1}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"max_tokens": "5000"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n_predict": -2}, "n_predict"),
    ({"best_of": 0}, "best_of"),
    ({"n": 0}, "n"),
    ({"n": "2"}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": "true"}, "stream"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "true"}}, "include_usage"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"n": 2, "n_cmpl": 3}, "n_cmpl"),  # llama.cpp reads n_cmpl, vLLM n: two readings
])
def test_fields_that_decide_money_must_be_well_typed(payload: dict[str, Any],
                                                     field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        bound(payload)


def test_the_bound_reserved_is_written_over_every_field_that_could_raise_it() -> None:
    doc = forwarded({"max_tokens": 5000, "max_completion_tokens": 0, "n_predict": -1,
                     "min_tokens": 4000}, maximum=2000)
    assert (doc["max_tokens"], doc["max_completion_tokens"], doc["n_predict"],
            doc["min_tokens"]) == (2000, 2000, 2000, 2000)
    assert forwarded({"messages": []})["max_tokens"] == 1024  # none named: the maximum
    assert forwarded({"input": "x"}, RESPONSES)["max_output_tokens"] == 1024
    clamped = forwarded({"max_completion_tokens": 100, "min_tokens": 50}, admitted=7)
    assert (clamped["max_completion_tokens"], clamped["min_tokens"]) == (7, 7)
    assert clamped["max_tokens"] == 7  # and the one field every upstream reads


@pytest.mark.parametrize("payload,route,added", [
    ({"n_predict": 30}, CHAT, "max_tokens"),  # vLLM ignores n_predict: unbounded there
    ({"max_completion_tokens": 30}, COMPLETIONS, "max_tokens"),
    ({"n_predict": 30}, RESPONSES, "max_output_tokens"),
    ({"max_tokens": 30}, RESPONSES, "max_output_tokens"),
])
def test_a_bound_in_a_field_some_upstream_ignores_is_also_written_where_all_read_it(
        payload: dict[str, Any], route: Route, added: str) -> None:
    doc = forwarded(payload, route)
    assert doc[added] == 30
    assert all(doc[name] == 30 for name in payload)


def test_responses_bound_every_chat_field_llama_cpp_reads() -> None:
    doc = forwarded({"input": "x", "max_output_tokens": 10, "n_predict": 5000,
                     "max_completion_tokens": 5000, "max_tokens": 5000}, RESPONSES)
    assert [doc[f] for f in ("max_output_tokens", "n_predict", "max_completion_tokens",
                             "max_tokens")] == [10, 10, 10, 10]


@pytest.mark.parametrize("payload", [{"n": 2}, {"n_cmpl": 4}, {"n": 1, "n_cmpl": 2}])
def test_a_response_is_one_response(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest, match="n"):
        bound({"input": "x", **payload}, RESPONSES)


@pytest.mark.parametrize("payload,choices", [
    ({"prompt": ["a", "b"], "n": 2}, 2),
    ({"prompt": ["a", "b"], "n_cmpl": 3}, 3),
    ({"prompt": ["a", "b"], "n": 3, "n_cmpl": 3}, 3),
    ({"prompt": ["a", "b"], "best_of": 4}, 1),  # best_of makes more, answers one
    ({"prompt": ["a", "b"], "best_of": 4, "n": 2}, 2),
])
def test_choices_per_prompt_group_the_indices_of_a_prompt_list(payload: dict[str, Any],
                                                               choices: int) -> None:
    b = bound(payload, COMPLETIONS)
    assert b.choices == choices
    assert b.sequences == 2 * max(choices, payload.get("best_of", 1))


def test_a_body_that_already_says_the_bound_is_forwarded_as_it_came() -> None:
    body = b'{"max_tokens":16,  "messages":[]}'
    payload = orjson.loads(body)
    b = analyse(CHAT, Kind.CHAT, body, payload, 1024, 4096)
    assert b.forwarded_body(body, 16) is body
    assert b.forwarded_body(body, 10) != body  # clamped: rewritten


@pytest.mark.parametrize("payload,injected", [
    ({"stream": True}, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, True),
    ({"stream": True, "stream_options": {"include_usage": True}}, False),
    ({"stream": False}, False),
    ({"stream": None}, False),
    ({}, False),
])
def test_the_usage_chunk_is_asked_for_when_the_client_did_not(payload: dict[str, Any],
                                                               injected: bool) -> None:
    b = bound({**payload, "max_tokens": 5})
    assert b.inject_usage is injected
    doc = forwarded({**payload, "max_tokens": 5})
    if payload.get("stream"):
        assert doc["stream_options"]["include_usage"] is True


def test_the_responses_and_messages_apis_are_not_asked_for_usage() -> None:
    assert not bound({"stream": True, "max_output_tokens": 5}, RESPONSES).inject_usage
    assert not bound({"stream": True, "max_tokens": 5}, MESSAGES).inject_usage


@pytest.mark.parametrize("raw", [
    b'{"max_tokens": 5000, "max_tokens": 16, "messages": []}',  # a first-wins parser: 5000
    b'{"n": 128, "n": 1, "max_tokens": 16, "messages": []}',
    b'{"max_\\u0074okens": 5000, "max_tokens": 16, "messages": []}',  # the same key, escaped
])
def test_a_body_another_parser_could_read_otherwise_is_forwarded_rewritten(raw: bytes) -> None:
    payload = orjson.loads(raw)
    b = analyse(CHAT, Kind.CHAT, raw, payload, 1024, 4096)
    out = b.forwarded_body(raw, b.per_sequence)
    assert out != raw
    assert out.count(b'"max_tokens"') == 1 and orjson.loads(out)["max_tokens"] == 16
    assert b"\\u" not in out and b.sequences == orjson.loads(out).get("n", 1)
