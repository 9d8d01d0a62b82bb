"""ASGI factories for the middleware shape, served by uvicorn in their own processes.

`mock` is gateway.mock_upstream.MockUpstream alone; `gateway_mock` is the same app wrapped in
GatewayMiddleware (settings and Redis from GATEWAY_* environment), as a user embeds it.
"""

from __future__ import annotations

from gateway.middleware import GatewayMiddleware
from gateway.mock_upstream import MockUpstream
from gateway.settings import Settings
from gateway.types import ASGIApp


def mock() -> ASGIApp:
    return MockUpstream()


def gateway_mock() -> ASGIApp:
    return GatewayMiddleware(MockUpstream(), settings=Settings.load())
