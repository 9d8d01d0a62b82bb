"""GET /openapi.json is served, and real responses of every endpoint fit it."""

from __future__ import annotations

import uuid

from gateway.keys import hash_secret, new_management_secret
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
from gateway.mock_upstream import MockUpstream
from gateway.openapi import document
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import bearer, client_for, new_key
from tests.openapi_check import check

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
            await client.get("/metrics"), await client.get("/api/plans"),
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
        await store.set_active(key_id, False)
        responses.append(await client.get("/v1/usage", headers=user))
    for response in responses:
        check(response)
    assert {200, 201, 400, 401, 403, 404, 405, 429} <= {r.status_code for r in responses}
