"""The Redis side of the spend ledger: each account's stream, read through a consumer group.

settle.lua appends an entry per settled request (with the counters, in one script); the
exporter reads entries here, stores them in PostgreSQL, then acknowledges, which deletes
them. A stream's length is therefore what is not yet stored. Accounts are found in the
account set (one key), so no command walks the keyspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store.client import Script
from gateway.store.names import Names
from gateway.store.records import _text
from gateway.store.scripts import lua_source
from gateway.store.store import Store


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One settled request, as settle.lua recorded it (times: Redis time, microseconds)."""

    stream_id: str  # "<ms>-<seq>", the stream's order
    request_id: str
    account_id: str
    key_id: str
    route: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micro: int
    status: int
    admitted_us: int | None  # None: reserved by a version that did not record it
    settled_us: int


@dataclass(frozen=True, slots=True)
class LedgerState:
    """One account's stream and lifetime counters, read at one instant (ledger_state.lua)."""

    length: int
    oldest_id: str  # "" when the stream is empty
    last_id: str  # the last id the stream ever gave ("" for none)
    now_ms: int  # Redis time
    account_total: int
    # The lifetime spend before the ledger's first entry; None: no entry was ever appended
    # (then all of the total is from before the ledger).
    account_base: int | None
    dropped: int  # entries dropped at the cap, and their cost
    dropped_micro: int
    key_totals: dict[str, tuple[int, int | None]]  # key id -> (total_spent, ledger_base)


def stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _int(value: Any) -> int:
    return int(value) if value not in (None, b"", "") else 0


def _maybe(value: Any) -> int | None:
    return int(value) if value not in (None, b"", "") else None


def _entry(stream_id: Any, flat: Sequence[Any]) -> LedgerEntry:
    # Client text (route, model) may hold anything: undecodable bytes are replaced.
    f = {_text(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}

    def text(name: str) -> str:
        value = f.get(name, b"")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    admitted = text("admitted_us")
    return LedgerEntry(
        _text(stream_id), text("request_id"), text("account_id"), text("key_id"),
        text("route"), text("model"), _int(f.get("prompt_tokens")),
        _int(f.get("cached_tokens")), _int(f.get("completion_tokens")),
        _int(f.get("cost_micro")), _int(f.get("status")),
        int(admitted) if admitted else None, _int(f.get("settled_us")))


class LedgerStreams:
    """The exporter's and reconcile's operations on the account streams."""

    def __init__(self, store: Store, group: str = Names.LEDGER_GROUP,
                 consumer: str = "exporter") -> None:
        self.store = store
        self.group = group
        self.consumer = consumer
        self._read = Script.of(lua_source("group_read"))
        self._ack = Script.of(lua_source("group_ack"))
        self._state = Script.of(lua_source("ledger_state"))
        store.client.register((self._read, self._ack, self._state))

    async def accounts(self) -> list[str]:
        return sorted(_text(a) for a in await self.store._cmd("SMEMBERS", Names.ACCOUNTS))

    async def read(self, account_id: str, count: int, start: str = ">",
                   claim_idle_ms: int = 0) -> list[LedgerEntry]:
        """`start`: '>' new entries, '0' this consumer's unacknowledged ones, 'claim' any
        consumer's that waited `claim_idle_ms` (see lua/group_read.lua)."""
        raw = await self.store._evalsha(
            self._read, [Names.ledger(account_id)],
            [self.group, self.consumer, count, start, claim_idle_ms])
        return [_entry(stream_id, flat) for stream_id, flat in raw]

    async def ack(self, account_id: str, stream_ids: Sequence[str]) -> int:
        """Only after the entries are committed in PostgreSQL: deletes them from Redis."""
        if not stream_ids:
            return 0
        return int(await self.store._evalsha(self._ack, [Names.ledger(account_id)],
                                             [self.group, *stream_ids]))

    async def tail(self, account_id: str, after: str = "-", upto: str = "+",
                   count: int = 1000) -> list[LedgerEntry]:
        """Entries still in the stream (not yet stored, or stored and not yet deleted)."""
        raw = await self.store._cmd("XRANGE", Names.ledger(account_id), after, upto,
                                    "COUNT", count)
        return [_entry(stream_id, flat) for stream_id, flat in raw]

    async def state(self, account_id: str, key_ids: Sequence[str] = ()) -> LedgerState:
        keys = [Names.ledger(account_id), Names.account(account_id),
                *(Names.key(account_id, k) for k in key_ids)]
        raw = await self.store._evalsha(self._state, keys, [])
        account = raw[4]
        totals = {k: (_int(pair[0]), _maybe(pair[1]))
                  for k, pair in zip(key_ids, raw[5:], strict=True)}
        return LedgerState(int(raw[0]), _text(raw[1]), _text(raw[2]), int(raw[3]),
                           _int(account[0]), _maybe(account[1]), _int(account[2]),
                           _int(account[3]), totals)

    async def key_ids(self, account_id: str) -> list[str]:
        """Every key of the account (deleted ones too: their records and spend stay)."""
        return sorted(_text(k) for k in await self.store._cmd(
            "SMEMBERS", Names.account_keys(account_id)))
