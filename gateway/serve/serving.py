"""The ASGI app `gateway serve` runs in each worker, built from GATEWAY_* environment."""

from __future__ import annotations

import os

from gateway.config.settings import Settings
from gateway.http.middleware import GatewayMiddleware
from gateway.obs import access_log
from gateway.upstream.proxy import UpstreamProxy


def create_app() -> GatewayMiddleware:
    settings = Settings.load()
    access_log.install(settings.log_level, settings.log_format)
    upstream = UpstreamProxy(os.environ["GATEWAY_UPSTREAM"],
                             os.environ.get("GATEWAY_UPSTREAM_API_KEY") or None,
                             routes=settings.routes, deadlines=settings.upstream_deadlines)
    return GatewayMiddleware(upstream, settings=settings)
