"""Property-based fuzzing of the management API: no 500, every response fits /openapi.json."""

from __future__ import annotations

import asyncio
import string
import uuid
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_management_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store.embedded import embedded_store
from tests.conftest import client_for, new_key
from tests.openapi_check import check

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=30), st.sampled_from(
                         ["standard", "pro", "30d", "1h", "0d", "2030-01-01T00:00:00Z",
                          "9999-12-31T23:59:59Z", "10.5", "-1", "1e400", "99999999d"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
_FIELDS = st.sampled_from(["name", "plan", "credit", "rpm", "tpm", "budget", "budget_duration",
                           "expires_at", "expires_in", "isActive", "other"])
_DURATIONS = st.one_of(st.sampled_from(["30d", "1h", "90s", "0d", "3650d", "3651d"]),
                       st.text(max_size=6))
# Mostly well-formed bodies, so the fuzz reaches the handlers past validation too.
_KEY_BODY = st.fixed_dictionaries(
    {"name": st.one_of(st.text(min_size=1, max_size=20), _SCALARS)},
    optional={"plan": st.sampled_from(["standard", "pro", "gold", None]),
              "credit": st.one_of(st.booleans(), _SCALARS),
              "rpm": st.one_of(st.integers(-5, 10**9), _SCALARS),
              "tpm": st.integers(-5, 10**9),
              "budget": st.one_of(st.decimals(allow_nan=False, allow_infinity=False,
                                              places=3).map(str), st.floats(0, 1e12), _SCALARS),
              "budget_duration": _DURATIONS, "expires_in": _DURATIONS,
              "expires_at": st.one_of(st.datetimes().map(lambda d: d.isoformat() + "Z"),
                                      st.text(max_size=10)),
              "isActive": st.one_of(st.booleans(), _SCALARS)})
_VALID_CREATE = st.fixed_dictionaries(
    {"name": st.text(string.ascii_letters, min_size=1, max_size=10)},
    optional={"rpm": st.integers(1, 1000), "budget": st.floats(0, 1000),
              "budget_duration": st.sampled_from(["1h", "7d"]),
              "expires_in": st.sampled_from(["1d", "30d"])}).flatmap(
    lambda d: st.sampled_from([{**d, "plan": "pro"}, {**d, "plan": "standard"},
                               {**{k: v for k, v in d.items() if k != "expires_in"},
                                "credit": True}]))
_PATCH = st.fixed_dictionaries({}, optional={"isActive": st.booleans(),
                                             "name": st.text(min_size=1, max_size=10)})
_BODIES = st.one_of(
    _VALID_CREATE, _PATCH, _KEY_BODY, _KEY_BODY, st.none(), st.binary(max_size=40),
    st.dictionaries(_FIELDS, _SCALARS, max_size=6), _JSON)


class World:
    def __init__(self) -> None:
        self.store = embedded_store()
        registry = Metrics.create(CollectorRegistry())
        self.app = GatewayMiddleware(MockUpstream(), settings=Settings(), store=self.store,
                                     metrics=registry)
        # Deeper paths than a 429 after 12 requests: the limit has its own tests.
        self.app.endpoints.management.usage_capacity = 1_000_000
        self.client: httpx.AsyncClient = client_for(self.app)
        self.tokens: list[str] = []
        self.ids: list[str] = []

    async def setup(self) -> None:
        _, own, account = await new_key(self.store, Settings(), name="own")
        other = (await self.store.create_account("other")).id
        _, foreign, _ = await new_key(self.store, Settings(), account=other, credit=True)
        for acct in (account, other):
            secret = new_management_secret()
            await self.store.create_mgmt_key(acct, hash_secret(secret))
            self.tokens.append(secret)
        self.tokens += ["mk_" + "A" * 40, "junk", "sk_live_" + "b" * 40]
        self.ids = [own, own, foreign, str(uuid.uuid4()), own.replace("-", "").upper()]


_OPERATIONS = [("GET", "/api/usage"), ("GET", "/api/usage/{}"), ("GET", "/api/keys"),
               ("POST", "/api/keys"), ("POST", "/api/keys"), ("GET", "/api/keys/{}"),
               ("PATCH", "/api/keys/{}"), ("PATCH", "/api/keys/{}"),
               ("POST", "/api/keys/{}/rotate")]


def _requests(ids: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    key = st.one_of(st.sampled_from(ids), st.sampled_from(ids),
                    st.text(string.ascii_letters + string.digits + "-_~", min_size=1,
                            max_size=40))
    method = st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE"])
    documented = st.tuples(st.sampled_from(_OPERATIONS), key).map(
        lambda t: (t[0][0], t[0][1].format(t[1])))
    anything = st.tuples(method, st.sampled_from([t for _, t in _OPERATIONS]), key).map(
        lambda t: (t[0], t[1].format(t[2])))
    return st.one_of(documented, documented, documented, anything)


def test_fuzz_management_endpoints() -> None:
    runner = asyncio.Runner()
    world = World()
    runner.run(world.setup())

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def one_request(data: st.DataObject) -> None:
        method, path = data.draw(_requests(world.ids))
        pick = data.draw(st.integers(0, 9))  # mostly the account's own management key
        token = (world.tokens[0] if pick < 5 else None if pick == 5
                 else world.tokens[min(pick - 5, len(world.tokens) - 1)])
        body: Any = data.draw(_BODIES)
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if isinstance(body, bytes):
            request = world.client.request(method, path, headers=headers, content=body)
        elif body is None:
            request = world.client.request(method, path, headers=headers)
        else:
            request = world.client.request(method, path, headers=headers, json=body)
        response = runner.run(request)
        assert response.status_code < 500, response.text
        check(response)

    try:
        one_request()
    finally:
        runner.run(world.client.aclose())
        runner.run(world.store.close())
        runner.close()
