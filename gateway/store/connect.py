"""A Store from a Redis URL: standalone, TLS, unix socket or Redis Cluster."""

from __future__ import annotations

import os
from typing import Any

from redis.exceptions import (
    RedisError,
)

from gateway.errors import (
    ConfigError,
)
from gateway.store.resp import Multiplexed
from gateway.store.store import Store

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _no_retries() -> Any:
    # Never resend a script on our own: a resent admit.lua after a read timeout could apply
    # twice. Failures surface as StoreUnavailable; settlements are retried by request id.
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


def connect(url: str, timeout_seconds: float = 0.25) -> Store:
    """A Store over a real Redis at `url`.

    redis://, rediss://, unix:// select a single server (password and db in the URL as
    usual); redis+cluster://host:port[,host:port...] and rediss+cluster://... select a
    Redis Cluster discovered from those startup nodes. TLS options ride in the query string
    (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname).
    """
    options: dict[str, Any] = {"socket_timeout": timeout_seconds,
                               "socket_connect_timeout": timeout_seconds,
                               "retry": _no_retries()}
    scheme = url.partition("://")[0].lower()
    _check_tls_files(url)
    try:
        if scheme in _CLUSTER_SCHEMES:
            return Store(_cluster_client(url, scheme, {**options, "max_connections": 256}))
        from redis.asyncio import BlockingConnectionPool, Redis

        # A burst beyond the pool waits briefly for a connection instead of failing.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=512, timeout=max(1.0, timeout_seconds * 4), **options)
        hot = Multiplexed(url, timeout_seconds) if scheme in ("redis", "unix") else None
        return Store(Redis.from_pool(pool), hot)
    except (ValueError, RedisError) as exc:
        raise ConfigError(f"invalid Redis URL: {exc}") from None


def _check_tls_files(url: str) -> None:
    """A mistyped certificate path is named at startup, not reported as unreachable Redis."""
    from urllib.parse import parse_qsl

    for name, value in parse_qsl(url.partition("?")[2]):
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and \
                not os.path.isfile(value):
            raise ConfigError(f"invalid Redis URL: {name} file {value!r} does not exist")


def _cluster_client(url: str, scheme: str, options: dict[str, Any]) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import parse_url

    # The query goes first: its values (certificate paths) may contain slashes.
    rest, _, query = url.partition("://")[2].partition("?")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    userinfo, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {item.strip()!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    first = f"{_CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{hosts.split(',')[0].strip()}"
    kwargs = {**options, **parse_url(first + ("?" + query if query else ""))}
    for name in ("host", "port", "db", "path"):
        kwargs.pop(name, None)
    kwargs.pop("connection_class", None)
    if scheme == "rediss+cluster":
        kwargs["ssl"] = True
    startup = [ClusterNode(host, port) for host, port in nodes]
    return RedisCluster(startup_nodes=startup, **kwargs)
