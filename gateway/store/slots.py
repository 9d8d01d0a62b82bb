"""Redis Cluster's slot of a key (CRC16/XMODEM of the key or its {hash tag}, mod 16384) and
the slot map read from CLUSTER SLOTS."""

from __future__ import annotations

from typing import Any

from gateway.store.urls import Address

SLOTS = 16384


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _table()


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The slot Redis Cluster assigns to `key`, honouring a non-empty {hash tag}."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return crc16(data) % SLOTS


def parse_cluster_slots(reply: Any, asked: Address) -> tuple[list[Address | None],
                                                             set[Address]]:
    """The primary of every slot, and every node the reply names (primaries and replicas),
    from a CLUSTER SLOTS reply given by the node at `asked`. An empty host means the node
    that answered; "?" an endpoint the node does not know yet (skipped)."""
    owners: list[Address | None] = [None] * SLOTS
    nodes: set[Address] = set()
    for entry in reply:
        low, high = int(entry[0]), int(entry[1])
        served: list[Address] = []
        for node in entry[2:]:
            host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
            if host == "?":
                continue
            served.append((host or asked[0], int(node[1])))
        if not served:
            continue
        nodes.update(served)
        primary = served[0] if entry[2][0] not in (b"?", "?") else None
        if primary is None:
            continue
        for slot in range(max(low, 0), min(high, SLOTS - 1) + 1):
            owners[slot] = primary
    return owners, nodes
