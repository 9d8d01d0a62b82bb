"""Concurrent bursts for the exactness tests: N requests spread over several gateways."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}],
                        "max_tokens": 8}
CHAT_COST = 17  # micro-USD at the default price: ceil(10 * 0.5 + 8 * 1.5)


async def burst(clients: list[httpx.AsyncClient], secret: str, n: int,
                body: dict[str, Any] = CHAT) -> tuple[Counter[int], float]:
    """Fires n concurrent chat requests round-robin over `clients`; (status counts, seconds)."""
    headers = {"Authorization": f"Bearer {secret}"}
    gate = asyncio.Event()

    async def one(i: int) -> int:
        await gate.wait()
        client = clients[i % len(clients)]
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        return response.status_code

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0)
    started = time.monotonic()
    gate.set()
    statuses = await asyncio.gather(*tasks)
    return Counter(statuses), time.monotonic() - started


def refill_bound(limit_per_minute: int, seconds: float) -> int:
    """How many extra requests a bucket can refill during `seconds` (rounded up, plus one)."""
    return int(seconds * limit_per_minute / 60) + 1
