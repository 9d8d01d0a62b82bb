"""An app mounted under a prefix routes on the path without it: the gateway must meter the
route the app serves, not the full path (uvicorn --root-path, Starlette's Mount)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from gateway.config.routes import route_path
from gateway.config.settings import Settings
from gateway.obs.metrics import Metrics
from gateway.store import Store
from tests.conftest import bearer, client_for, gateway, new_key, serving

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
USAGE = {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


def inference_app() -> tuple[Starlette, list[str]]:
    """A Starlette app serving chat completions; records what reached it."""
    served: list[str] = []

    async def chat(request: Request) -> JSONResponse:
        served.append(request.url.path)
        return JSONResponse({"id": "c", "object": "chat.completion", "model": "m",
                             "choices": [], "usage": USAGE})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]), served


@pytest.mark.parametrize(("scope", "expected"), [
    ({"path": "/v1/chat/completions", "root_path": ""}, "/v1/chat/completions"),
    ({"path": "/api/v1/chat/completions", "root_path": "/api"}, "/v1/chat/completions"),
    ({"path": "/api", "root_path": "/api"}, ""),
    ({"path": "/apiv1/chat/completions", "root_path": "/api"}, "/apiv1/chat/completions"),
    # a server that leaves the prefix out of `path` (the older ASGI reading)
    ({"path": "/v1/chat/completions", "root_path": "/api"}, "/v1/chat/completions"),
    ({"path": "/v1/chat/completions"}, "/v1/chat/completions"),
])
def test_route_path_is_what_starlette_routes_on(scope: dict[str, str], expected: str) -> None:
    assert route_path(scope) == expected


async def test_a_mounted_gateway_meters_the_route_the_app_serves(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    inner, served = inference_app()
    outer = Starlette(routes=[Mount("/api", app=gateway(inner, store, settings, metrics))])
    async with client_for(outer) as client:
        response = await client.post("/api/v1/chat/completions", json=CHAT)
        assert response.status_code == 401  # no key: inference is never free under a prefix
        response = await client.post("/api/v1/chat/completions", json=CHAT,
                                     headers=bearer(secret))
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-tokens"] == "3333"
        usage = (await client.get("/api/v1/usage", headers=bearer(secret))).json()
    assert served == ["/api/v1/chat/completions"]
    # default price 0.50 in / 1.50 out per million: ceil(10*0.5 + 8*1.5) = 17 micro-USD
    assert usage["budget"]["spent"] == pytest.approx(17e-6)


async def test_uvicorn_root_path_is_metered(store: Store, settings: Settings,
                                            metrics: Metrics) -> None:
    secret, _, _ = await new_key(store, settings)
    inner, served = inference_app()
    async with serving(gateway(inner, store, settings, metrics), "/api") as url, \
            httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 401
        response = await client.post("/v1/chat/completions", json=CHAT,
                                     headers=bearer(secret))
        assert response.status_code == 200
        usage = (await client.get("/v1/usage", headers=bearer(secret))).json()
    assert len(served) == 1
    assert usage["budget"]["spent"] == pytest.approx(17e-6)
