"""A redis-py client on the same Redis as a Store, for tests that look at or damage what the
store wrote (the store's own client has only the operations the gateway needs)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis_py
from redis.asyncio.cluster import RedisCluster

from gateway.store import Store
from gateway.store.client import NodeClient
from gateway.store.cluster import ClusterClient
from gateway.store.embedded import EmbeddedClient


class Inspector:
    """redis-py's methods, each on a client of its own that is closed when it returns (so
    no test leaves a connection open)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        if name == "scan_iter":
            async def scan(*args: Any, **kwargs: Any) -> Any:
                client = _client(self._store)
                try:
                    async for item in client.scan_iter(*args, **kwargs):
                        yield item
                finally:
                    await client.aclose()
            return scan

        async def run(*args: Any, **kwargs: Any) -> Any:
            client = _client(self._store)
            try:
                return await getattr(client, name)(*args, **kwargs)
            finally:
                await client.aclose()
        return run


def redis_of(store: Store) -> Any:
    """redis-py on `store`'s Redis, to look at or damage what the store wrote."""
    return Inspector(store)


def _client(store: Store) -> Any:
    client = store.client
    if isinstance(client, EmbeddedClient):
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=client.server)
    if isinstance(client, NodeClient):
        node = client.node
        credentials = node._credentials
        options: dict[str, Any] = {"db": credentials.db, "password": credentials.password,
                                   "username": credentials.username}
        if node.address is None:
            return redis_py.Redis(unix_socket_path=node._path, **options)
        return redis_py.Redis(host=node.address[0], port=node.address[1],
                              ssl=credentials.tls is not None, ssl_cert_reqs="none", **options)
    if isinstance(client, ClusterClient):
        host, port = client._startup[0]
        return RedisCluster(host=host, port=port, ssl=client._credentials.tls is not None,
                            ssl_cert_reqs="none")
    raise TypeError(f"no inspector for {type(client).__name__}")
