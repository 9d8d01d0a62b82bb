"""The ASGI app `gateway serve` runs in each worker, built from its Settings."""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.errors import ConfigError
from gateway.http.middleware import GatewayMiddleware
from gateway.obs import access_log
from gateway.upstream.proxy import UpstreamProxy


def create_app() -> GatewayMiddleware:
    settings = Settings.load()
    if settings.upstream_url is None:
        raise ConfigError("no upstream: set GATEWAY_UPSTREAM or [upstream] url")
    access_log.install(settings.log_level, settings.log_format)
    upstream = UpstreamProxy(settings.upstream_url, settings.upstream_api_key,
                             routes=settings.routes, deadlines=settings.upstream_deadlines)
    if not settings.alerts.enabled:
        return GatewayMiddleware(upstream, settings=settings)
    if settings.alerts.sender == "none":
        # The scripts still write events; a `gateway alerts send` run apart delivers them
        # (one sender instead of one per worker of every replica: docs/alerts.md, Scale).
        from gateway.alerts.outbox import enable_alerts

        app = GatewayMiddleware(upstream, settings=settings)
        enable_alerts(app.store, settings.alerts)
        return app
    # alerts: the scripts write events, and a sender runs beside the server (its lifespan)
    from gateway.alerts.lifespan import AlertsInServe

    alerts = AlertsInServe(upstream, settings.alerts)
    app = GatewayMiddleware(alerts, settings=settings)
    alerts.attach(app.store)
    return app
