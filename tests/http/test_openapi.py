"""GET /openapi.json is served, and real responses of every endpoint fit it."""

from __future__ import annotations

import dataclasses
import re
import uuid

import pytest
from jsonschema import ValidationError

from gateway.config.settings import Settings
from gateway.config.units import MAX_RATE
from gateway.core.keys import hash_secret, new_management_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.http.openapi import document
from gateway.obs.metrics import Metrics
from gateway.store import Store
from gateway.store.lifecycle import KeyChange
from tests.conftest import METRICS_AUTH, bearer, client_for, new_key
from tests.openapi_check import check, validate

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


async def test_served_document_is_openapi_31(store: Store, settings: Settings,
                                             metrics: Metrics) -> None:
    app = GatewayMiddleware(MockUpstream(), settings=settings, store=store, metrics=metrics)
    async with client_for(app) as client:
        response = await client.get("/openapi.json")
    check(response)
    doc = response.json()
    assert doc == document() and doc["openapi"] == "3.1.0"
    for path in ("/v1/usage", "/api/usage", "/api/usage/{keyId}", "/api/plans", "/api/keys",
                 "/api/keys/{keyId}", "/api/keys/{keyId}/rotate", "/healthz", "/readyz",
                 "/metrics", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert path in doc["paths"], path


async def test_real_responses_fit_the_document(store: Store, settings: Settings,
                                               metrics: Metrics) -> None:
    secret, key_id, account = await new_key(store, settings, rpm=3)
    _, credit_id, _ = await new_key(store, settings, account=account, credit=True)
    mk = new_management_secret()
    await store.create_mgmt_key(account, hash_secret(mk))
    mgmt, user = bearer(mk), bearer(secret)
    app = GatewayMiddleware(MockUpstream(), settings=settings, store=store, metrics=metrics)
    app.endpoints.management.usage_capacity = 3
    async with client_for(app) as client:
        responses = [
            await client.get("/healthz"), await client.get("/readyz"),
            await client.get("/metrics", headers=METRICS_AUTH), await client.get("/api/plans"),
            await client.get("/v1/usage", headers=user), await client.get("/v1/usage"),
            await client.post("/v1/usage", headers=user),
            await client.post("/v1/chat/completions", json=CHAT, headers=user),
            await client.post("/v1/completions", json={"model": "m", "prompt": "p",
                                                       "max_tokens": 2}, headers=user),
            await client.post("/v1/embeddings", json={"model": "m", "input": "e"},
                              headers=user),
            await client.post("/v1/embeddings", json={"model": "m", "input": "e"},
                              headers=user),  # rpm 3: 429
            await client.post("/v1/chat/completions", content=b"{", headers=user),
            await client.post("/v1/chat/completions", json=CHAT),
            await client.get("/api/usage", headers=mgmt),
            await client.get(f"/api/usage/{key_id}", headers=mgmt),
            await client.get(f"/api/usage/{credit_id}", headers=mgmt),
            await client.get("/api/usage", headers=mgmt),  # capacity 3: 429
            await client.get("/api/usage/x", headers=mgmt), await client.get("/api/usage"),
            await client.post("/api/usage", headers=mgmt),
            await client.get("/api/keys", headers=mgmt),
            await client.post("/api/keys", json={"name": "n", "plan": "pro"}, headers=mgmt),
            await client.post("/api/keys", json={"name": "n"}, headers=mgmt),
            await client.get(f"/api/keys/{key_id}", headers=mgmt),
            await client.get(f"/api/keys/{uuid.uuid4()}", headers=mgmt),
            await client.patch(f"/api/keys/{key_id}", json={"name": "m"}, headers=mgmt),
            await client.patch(f"/api/keys/{key_id}", json={"name": 1}, headers=mgmt),
            await client.post(f"/api/keys/{credit_id}/rotate", headers=mgmt),
            await client.post(f"/api/keys/{uuid.uuid4()}/rotate", headers=mgmt),
            await client.get(f"/api/keys/{key_id}/rotate", headers=mgmt),
        ]
        await store.change_key(key_id, KeyChange(active=False))
        responses.append(await client.get("/v1/usage", headers=user))
    small = GatewayMiddleware(MockUpstream(), store=store, metrics=metrics,
                              settings=dataclasses.replace(settings, max_body_bytes=64))
    async with client_for(small) as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            too_big = await client.post(path, content=b" " * 65, headers=user)
            assert too_big.status_code == 413
            responses.append(too_big)
    for response in responses:
        check(response)
    assert {200, 201, 400, 401, 403, 404, 405, 429} <= {r.status_code for r in responses}


def test_every_429_documents_retry_after_and_the_rate_headers() -> None:
    operations = [(path, method, op) for path, item in document()["paths"].items()
                  for method, op in item.items()]
    limited = [(path, method, op["responses"]["429"]) for path, method, op in operations
               if "429" in op["responses"]]
    assert len(limited) >= 5
    for path, method, response in limited:
        headers = response["headers"]
        assert {"Retry-After", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests"} <= set(headers), (path, method)
        pattern = headers["Retry-After"]["schema"]["pattern"]
        assert re.fullmatch(pattern, "1") and re.fullmatch(pattern, "30")
        assert not re.fullmatch(pattern, "0")  # a client must never be told to retry at once


@pytest.mark.parametrize("schema,instance", [
    ("KeyUsage", {"budget": {"spent": 0, "limit": None, "duration": "30d",
                             "resets_at": "2026-01-01T00:00:00.000Z"},
                  "rate_limits": {"rpm": 1, "tpm": 1},
                  "plan": {"slug": None, "status": "active", "expires_at": None},
                  "credits": {"balance": 0},
                  "key": {"name": "k", "type": "credit",
                          "created_at": "2026-01-01T00:00:00.000Z"},
                  "budgets": []}),
    ("Plan", {"slug": "pro", "name": "Pro", "priceUsdc": "60",
              "rateLimits": {"tpm_limit": 1, "rpm_limit": 1}, "models": []}),
    ("Ready", {"status": "ready", "redis": True, "scripts": True}),
])
def test_the_schemas_are_closed_and_require_every_field(
        schema: str, instance: dict[str, object]) -> None:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    validate(ref, instance)
    with pytest.raises(ValidationError):
        validate(ref, {**instance, "unexpected": 1})
    for name in instance:
        with pytest.raises(ValidationError):
            validate(ref, {k: v for k, v in instance.items() if k != name})


@pytest.mark.parametrize("when", ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000+00:00",
                                  "2026-01-01 00:00:00.000Z", "2026-01-01T00:00:00.000Zjunk"])
def test_times_are_utc_with_milliseconds(when: str) -> None:
    validate({"$ref": "#/components/schemas/Key/properties/created_at"},
             "2026-01-01T00:00:00.000Z")
    with pytest.raises(ValidationError):
        validate({"$ref": "#/components/schemas/Key/properties/created_at"}, when)


@pytest.mark.parametrize("field", ["rpm", "tpm"])
def test_key_create_rates_have_the_config_bounds(field: str) -> None:
    ref = {"$ref": "#/components/schemas/KeyCreate"}
    for good in (1, MAX_RATE, None):
        validate(ref, {"name": "n", field: good})
    for bad in (0, -1, MAX_RATE + 1, 1.5):
        with pytest.raises(ValidationError):
            validate(ref, {"name": "n", field: bad})
