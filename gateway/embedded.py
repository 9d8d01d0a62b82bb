"""The embedded store: fakeredis with Lua in this process, running the same scripts.

Single process and not durable; for `gateway demo` and fast tests.
"""

from __future__ import annotations

import fakeredis

from gateway.store import Store


def embedded_store() -> Store:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), max_connections=2**20)
    return Store(client)
