"""A Store from a Redis URL: one server, a Redis Cluster or a Sentinel-managed primary."""

from __future__ import annotations

from gateway.store.client import NodeClient, RedisClient
from gateway.store.cluster import ClusterClient
from gateway.store.resp import NodeConnection
from gateway.store.sentinel import SentinelClient
from gateway.store.store import Store
from gateway.store.urls import parse_redis_url


def connect(url: str, timeout_seconds: float = 0.25) -> Store:
    """A Store over a real Redis at `url` (the URL forms are in gateway/store/urls.py).
    Nothing connects until the first call; a malformed URL is a ConfigError now."""
    return Store(client_for(url, timeout_seconds))


def client_for(url: str, timeout_seconds: float) -> RedisClient:
    target = parse_redis_url(url)
    if target.kind == "cluster":
        return ClusterClient(target.addresses, target.credentials, timeout_seconds)
    if target.kind == "sentinel":
        assert target.service is not None
        return SentinelClient(target.addresses, target.service, target.credentials,
                              target.sentinel_credentials, timeout_seconds)
    address = None if target.kind == "unix" else target.addresses[0]
    return NodeClient(NodeConnection(address, target.credentials, timeout_seconds,
                                     path=target.path))
