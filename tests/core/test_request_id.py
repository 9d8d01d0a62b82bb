"""The request-id and forwarded-header policy."""

from __future__ import annotations

from gateway.core.request_id import outbound_scope, with_request_id


def test_the_app_sees_our_id_and_the_body_length_declared_anew() -> None:
    scope = {"headers": [(b"x-request-id", b"client"), (b"transfer-encoding", b"chunked"),
                         (b"content-length", b"5"), (b"accept", b"*/*")]}
    rewritten = outbound_scope(scope, "ours", 42)
    assert rewritten["headers"] == [(b"accept", b"*/*"), (b"content-length", b"42"),
                                    (b"x-request-id", b"ours")]
    kept = outbound_scope(scope, "ours")
    assert kept["headers"][:3] == scope["headers"][1:]
    assert kept["headers"][-1] == (b"x-request-id", b"ours")
    assert scope["headers"][0] == (b"x-request-id", b"client")  # the original untouched


def test_a_response_carries_one_request_id_whatever_the_app_sent() -> None:
    headers = [(b"X-Request-Id", b"app"), (b"content-type", b"application/json"),
               (b"x-request-id", b"again")]
    assert with_request_id(headers, b"ours") == [(b"content-type", b"application/json"),
                                                (b"x-request-id", b"ours")]
