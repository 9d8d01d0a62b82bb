"""The embedded store: fakeredis with Lua in this process, running the same scripts.

Single process and not durable; for `gateway demo` and fast tests. fakeredis is imported
only when an embedded store is made: a gateway on Redis never loads it (nor numpy, which
fakeredis imports when it is installed, with OpenBLAS threads of its own).
"""

from __future__ import annotations

from gateway.store import Store


def embedded_store() -> Store:
    import fakeredis

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), max_connections=2**20)
    return Store(client)
