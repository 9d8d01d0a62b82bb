"""The Store: every operation on Redis the gateway makes, one layer per module."""

from __future__ import annotations

from gateway.store.management import Management


class Store(Management):
    """Typed operations over one redis-py asyncio client (standalone, cluster or embedded)."""
