"""The figures an operator needs (issue 15): upstream answers by status class, requests in
flight, a stream's time to first byte and to first token, tokens and spend by configured
model, RPM and TPM refusals apart, settlement round trips, the retry queue's lag; and the
request log's model, account id, upstream status and time to first token. In process, on
both stores, against the real gateway and (for the proxy) a real closed port."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest

from gateway.config.settings import Price, Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.obs.metrics import Metrics, exposition, rejection_reason
from gateway.store import Store
from gateway.types import ASGIApp, Message, Receive, Scope, Send
from gateway.upstream.proxy import UpstreamProxy
from tests.conftest import METRICS_TOKEN, bearer, client_for, free_port, gateway, new_key
from tests.obs.test_observability import CHAT, access_lines, sample


def scraped(metrics: Metrics) -> str:
    return exposition(metrics.registry)[0].decode()


def by_class(text: str) -> dict[str, float | None]:
    return {c: sample(text, "gateway_upstream_duration_seconds_count", status_class=c)
            for c in ("2xx", "3xx", "4xx", "5xx", "error", "cancelled")}


async def _drain_body(receive: Receive) -> None:
    while (await receive()).get("more_body", False):
        pass


def answering(status: int) -> ASGIApp:
    """An upstream that answers every request with `status` (and a usage block)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _drain_body(receive)
        body = orjson.dumps({"model": "m", "usage": {"prompt_tokens": 3,
                                                     "completion_tokens": 2}})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


async def raising(scope: Scope, receive: Receive, send: Send) -> None:
    await _drain_body(receive)
    raise RuntimeError("the host application failed")


# --------------------------------------------------------------------------- upstream answers


async def test_upstream_answers_are_counted_by_status_class(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    for status, times in ((200, 2), (302, 1), (404, 1), (500, 3)):
        async with client_for(gateway(answering(status), store, settings, metrics)) as client:
            for _ in range(times):
                response = await client.post("/v1/chat/completions", json=CHAT,
                                             headers=bearer(secret))
                assert response.status_code == status
    text = scraped(metrics)
    assert by_class(text) == {"2xx": 2, "3xx": 1, "4xx": 1, "5xx": 3, "error": 0,
                              "cancelled": 0}
    # Admission let all seven through: that is what gateway_requests_total says.
    assert sample(text, "gateway_requests_total", decision="allowed", reason="ok",
                  plan="standard") == 7


async def test_an_unreachable_upstream_is_no_answer_not_a_5xx(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    secret, _, _ = await new_key(store, settings)
    proxy = UpstreamProxy(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        async with client_for(gateway(proxy, store, settings, metrics)) as client:
            gone = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    finally:
        await proxy.close()
    assert gone.status_code == 502 and gone.json()["error"]["code"] == "upstream_unavailable"
    assert by_class(scraped(metrics))["error"] == 1
    assert by_class(scraped(metrics))["5xx"] == 0
    (line,) = access_lines(caplog)
    assert (line["status"], line["upstream_status"]) == (502, None)


async def test_an_app_that_raises_gave_no_answer(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    secret, _, _ = await new_key(store, settings)
    async with client_for(gateway(raising, store, settings, metrics)) as client:
        failed = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
        served = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    assert failed.status_code == 500 and served.status_code == 500
    assert by_class(scraped(metrics))["error"] == 2
    assert [line["upstream_status"] for line in access_lines(caplog)] == [None, None]


async def test_a_client_gone_before_the_answer_is_cancelled(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)

    async def waits_for_the_client(scope: Scope, receive: Receive, send: Send) -> None:
        await _drain_body(receive)
        assert (await receive())["type"] == "http.disconnect"  # and returns, unanswered

    body = orjson.dumps(CHAT)
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False},
                               {"type": "http.disconnect"}]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing is sent to a client that left: {message}")

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", f"Bearer {secret}".encode()),
                         (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    await gateway(waits_for_the_client, store, settings, metrics)(scope, receive, send)
    assert by_class(scraped(metrics)) == {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "error": 0,
                                          "cancelled": 1}


# --------------------------------------------------------------------------- in flight


async def in_flight(metrics: Metrics, expected: float) -> float | None:
    """gateway_requests_in_flight once it reads `expected` (it is published within 50 ms)."""
    deadline = time.monotonic() + 5
    while True:
        value = sample(scraped(metrics), "gateway_requests_in_flight")
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.01)


async def test_requests_in_flight_rise_and_fall(store: Store, settings: Settings,
                                                metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    release = asyncio.Event()
    inner = MockUpstream()

    async def held(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await inner(scope, receive, send)

    async with client_for(gateway(held, store, settings, metrics)) as client:
        assert await in_flight(metrics, 0) == 0
        pending = [asyncio.ensure_future(client.post(
            "/v1/chat/completions", json=CHAT, headers=bearer(secret))) for _ in range(3)]
        assert await in_flight(metrics, 3) == 3
        # The gateway's own endpoints are not counted: probes and scrapes are not traffic.
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/metrics", headers={
            "Authorization": f"Bearer {METRICS_TOKEN}"})).status_code == 200
        assert await in_flight(metrics, 3) == 3
        release.set()
        assert [r.status_code for r in await asyncio.gather(*pending)] == [200] * 3
        assert await in_flight(metrics, 0) == 0
        refused = await client.post("/v1/chat/completions", json=CHAT,
                                    headers=bearer("sk_live_" + "r" * 40))
        assert refused.status_code == 401
        assert await in_flight(metrics, 0) == 0  # a refusal leaves as well


# --------------------------------------------------------------------------- streams


def streaming(prefill: float) -> ASGIApp:
    """A stream whose head and first (role-only) event come at once, and whose first output
    comes `prefill` seconds later."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _drain_body(receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(doc: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + orjson.dumps({"model": "m", **doc}) + b"\n\n"})

        await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(prefill)
        await event({"choices": [{"index": 0, "delta": {"content": "Hello"}}]})
        await event({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 1}})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


async def test_a_streams_first_byte_and_first_token_are_timed(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    secret, _, _ = await new_key(store, settings)
    stream = {**CHAT, "stream": True}
    async with client_for(gateway(streaming(0.3), store, settings, metrics)) as client:
        response = await client.post("/v1/chat/completions", json=stream,
                                     headers=bearer(secret))
        assert response.status_code == 200 and "Hello" in response.text
    async with client_for(gateway(answering(200), store, settings, metrics)) as client:
        await client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    text = scraped(metrics)
    # one stream each: the answer that is not a stream has neither figure
    assert sample(text, "gateway_stream_first_byte_seconds_count") == 1
    assert sample(text, "gateway_stream_first_token_seconds_count") == 1
    first_byte = sample(text, "gateway_stream_first_byte_seconds_sum")
    first_token = sample(text, "gateway_stream_first_token_seconds_sum")
    assert first_byte is not None and first_byte < 0.2
    assert first_token is not None and 0.3 <= first_token < 5  # not the role-only event
    stream_line, plain_line = access_lines(caplog)
    assert 300 <= stream_line["ttft_ms"] < 5000
    assert plain_line["ttft_ms"] is None


# --------------------------------------------------------------------------- models


def serving_as(served: str) -> ASGIApp:
    """An upstream that reports serving `served`, whatever the request asked for."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _drain_body(receive)
        body = orjson.dumps({"model": served, "usage": {"prompt_tokens": 4,
                                                        "completion_tokens": 2}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_tokens_and_spend_by_configured_model_others_as_other(
        store: Store, metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    settings = Settings(api_plan_keys=True, metrics_token=METRICS_TOKEN,
                        model_prices={"alpha": Price(1_000_000, 2_000_000),
                                      "beta": Price(3_000_000, 4_000_000)})
    secret, _, _ = await new_key(store, settings)
    asks = [("alpha", "alpha"), ("beta", "alpha"), ("alpha", "unlisted-7b"),
            ("unlisted-13b", None)]  # (asked, reported served); None: the stream says none
    for asked, served in asks:
        app = MockUpstream() if served is None else serving_as(served)
        body = {**CHAT, "model": asked}
        if served is None:
            body["stream"] = True  # the mock's stream names the model asked
        async with client_for(gateway(app, store, settings, metrics)) as client:
            assert (await client.post("/v1/chat/completions", json=body,
                                      headers=bearer(secret))).status_code == 200
    text = scraped(metrics)
    # priced (and so labelled) as served: alpha twice; beta asked but alpha served
    assert sample(text, "gateway_tokens_total", kind="prompt", plan="standard",
                  model="alpha") == 8
    assert sample(text, "gateway_spend_usd_total", plan="standard",
                  model="alpha") == pytest.approx(2 * (4 * 1 + 2 * 2) * 1e-6)
    assert sample(text, "gateway_tokens_total", kind="prompt", plan="standard",
                  model="beta") is None
    assert sample(text, "gateway_tokens_total", kind="completion", plan="standard",
                  model="other") == 2 + 8
    assert "unlisted" not in text  # a name the config does not give is never a label
    assert [line["model"] for line in access_lines(caplog)] == [
        "alpha", "alpha", "unlisted-7b", "unlisted-13b"]


def test_a_logged_model_name_is_capped() -> None:
    from gateway.obs.logs import MODEL_LOG_CHARS, RequestRecord

    record = RequestRecord("r", "POST", "/v1/chat/completions", model="x" * 10_000)
    assert record.fields()["model"] == "x" * MODEL_LOG_CHARS


# --------------------------------------------------------------------------- refusals


async def test_rpm_and_tpm_refusals_have_reasons_of_their_own(
        store: Store, settings: Settings, metrics: Metrics,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    by_requests, _, _ = await new_key(store, settings, name="rpm", rpm=1)
    by_tokens, _, _ = await new_key(store, settings, name="tpm", tpm=30)
    async with client_for(gateway(MockUpstream(), store, settings, metrics)) as client:
        codes = []
        # a bucket smaller than one request admits it once, then waits for the whole bucket
        for secret in (by_requests, by_requests, by_tokens, by_tokens):
            response = await client.post("/v1/chat/completions", json=CHAT,
                                         headers=bearer(secret))
            codes.append((response.status_code, response.json().get("error", {}).get("code")))
    # the client sees one code for both, as OpenAI writes it
    limited = (429, "rate_limit_exceeded")
    assert codes == [(200, None), limited, (200, None), limited]
    text = scraped(metrics)
    for reason in ("rate_limit_exceeded_rpm", "rate_limit_exceeded_tpm"):
        assert sample(text, "gateway_requests_total", decision="rejected", reason=reason,
                      plan="standard") == 1
    assert sample(text, "gateway_requests_total", decision="rejected",
                  reason="rate_limit_exceeded", plan="standard") is None
    lines = access_lines(caplog)
    assert [line["reason"] for line in lines] == [
        "ok", "rate_limit_exceeded_rpm", "ok", "rate_limit_exceeded_tpm"]
    assert [line["model"] for line in lines] == ["m"] * 4  # refused ones: the model asked


def test_other_refusals_keep_their_code_as_reason() -> None:
    from gateway.errors import Rejected

    assert rejection_reason(Rejected(429, "budget_exceeded", "", "insufficient_quota")) == (
        "budget_exceeded")
    assert rejection_reason(Rejected(429, "rate_limit_exceeded", "", "requests")) == (
        "rate_limit_exceeded_rpm")
