"""Management reads and writes scoped to one account: management keys, usage snapshots,
rotation. A key of another account reads as absent.
"""

from __future__ import annotations

import asyncio
import uuid

from gateway.core.usage_windows import buckets_needed
from gateway.errors import (
    NotFound,
)
from gateway.store.base import pairs
from gateway.store.lifecycle import KeyChange, KeyLifecycle
from gateway.store.names import Names
from gateway.store.records import (
    KeyCounters,
    KeyRecord,
    MgmtKey,
    MgmtRef,
    Throttle,
    UsageSnapshot,
    _counters,
    _key_record,
    _text,
)


class Management(KeyLifecycle):
    """Scoped to one account: a key of another account reads as absent."""

    async def create_mgmt_key(self, account_id: str, secret_hash: str) -> MgmtKey:
        await self.get_account(account_id)
        now = await self.now_us()
        mgmt_id = str(uuid.uuid4())
        await self._hset(Names.mgmt_key(account_id, mgmt_id), {
            "id": mgmt_id, "account_id": account_id, "hash": secret_hash, "created_at": now})
        await self._cmd("SADD", Names.account_mgmt_keys(account_id), mgmt_id)
        await self._cmd("SET", Names.mgmt_index(mgmt_id), account_id)
        # Last, as for consumption keys: usable only once the record is complete.
        await self._cmd("SET", Names.mgmt_secret(secret_hash),
                                         f"{account_id}:{mgmt_id}")
        return MgmtKey(mgmt_id, account_id, now)

    async def list_mgmt_keys(self, account_id: str) -> list[MgmtKey]:
        ids = await self._cmd("SMEMBERS", Names.account_mgmt_keys(account_id))
        keys = []
        for mgmt_id in ids:
            raw = await self._hash(Names.mgmt_key(account_id, _text(mgmt_id)))
            if raw:
                f = {_text(k): _text(v) for k, v in raw.items()}
                keys.append(MgmtKey(f["id"], f["account_id"], int(f["created_at"])))
        return sorted(keys, key=lambda k: (k.created_at_us, k.id))

    async def revoke_mgmt_key(self, mgmt_id: str) -> MgmtKey:
        account_id = await self._cmd("GET", Names.mgmt_index(mgmt_id))
        if account_id is None:
            raise NotFound(f"no management key with id {mgmt_id}")
        account = _text(account_id)
        record = Names.mgmt_key(account, mgmt_id)
        raw = await self._hash(record)
        if not raw:
            raise NotFound(f"no management key with id {mgmt_id}")
        f = {_text(k): _text(v) for k, v in raw.items()}
        # The secret mapping goes first: the key stops working before anything else changes.
        await self._cmd("DEL", Names.mgmt_secret(f["hash"]))
        await self._cmd("DEL", record)
        await self._cmd("SREM", Names.account_mgmt_keys(account), mgmt_id)
        await self._cmd("DEL", Names.mgmt_index(mgmt_id))
        return MgmtKey(mgmt_id, account, int(f["created_at"]))

    async def mgmt_lookup(self, secret_hash: str) -> MgmtRef | None:
        value = await self._cmd("GET", Names.mgmt_secret(secret_hash))
        if value is None:
            return None
        account_id, _, mgmt_id = _text(value).partition(":")
        return MgmtRef(account_id, mgmt_id)

    async def account_exists(self, account_id: str) -> bool:
        return bool(await self._cmd("EXISTS", Names.account(account_id)))

    async def mgmt_throttle(self, account_id: str, principal: str, capacity: int,
                            period_seconds: int) -> Throttle:
        keys = [Names.mgmt_bucket(account_id, principal)]
        raw = await self._evalsha(self._mgmt_limit, keys, [capacity, period_seconds])
        n = [int(v) for v in raw]
        return Throttle(n[0] == 1, n[1], n[2], n[3], n[4])

    async def usage_snapshot(self, account_id: str, key_id: str | None = None) -> UsageSnapshot:
        """Key records and usage counters of an account (or one key of it) at Redis time.

        Two round trips whatever the number of keys: the key ids with Redis TIME, then one
        pipeline of HGETALLs over the records and the counter hashes the periods need.
        """
        index = await self._evalsha(self._account_index, [Names.account_keys(account_id)],
                                    [key_id or ""])
        now_us = int(index[0]) * 1_000_000 + int(index[1])
        key_ids = sorted(_text(i) for i in index[2:])
        buckets = buckets_needed(now_us // 1_000_000)
        per_key = 1 + len(buckets.hours) + len(buckets.days)
        names = []
        for kid in key_ids:
            names.append(Names.key(account_id, kid))
            names.extend(Names.usage_minutes(account_id, kid, hour) for hour in buckets.hours)
            names.extend(Names.usage_hours(account_id, kid, day) for day in buckets.days)
        # Issued together, they leave in one write on the multiplexed connection: a pipeline.
        flat = await self._call(asyncio.gather(*(self.client.call("HGETALL", name)
                                                 for name in names)))
        results = [pairs(raw) for raw in flat]
        keys = []
        for i, _ in enumerate(key_ids):
            chunk = results[i * per_key:(i + 1) * per_key]
            if not chunk[0]:
                continue  # removed between the two round trips
            hours = chunk[1:1 + len(buckets.hours)]
            days = chunk[1 + len(buckets.hours):]
            keys.append(KeyCounters(
                record=_key_record(chunk[0]),
                minute_hashes={h: _counters(raw) for h, raw in zip(buckets.hours, hours,
                                                                    strict=True)},
                hour_hashes={d: _counters(raw) for d, raw in zip(buckets.days, days,
                                                                 strict=True)}))
        return UsageSnapshot(now_us, sorted(keys, key=lambda k: (k.record.created_at_us,
                                                                  k.record.id)))

    async def account_key(self, account_id: str, key_id: str) -> KeyRecord | None:
        raw = await self._hash(Names.key(account_id, key_id))
        return _key_record(raw) if raw else None

    async def update_key(self, account_id: str, key_id: str, *, name: str | None = None,
                         active: bool | None = None) -> KeyRecord | None:
        """None for a key this account does not hold; ConfigError for a deleted one."""
        try:
            return await self.change_key(key_id, KeyChange(name=name, active=active),
                                         account_id)
        except NotFound:
            return None

    async def rotate_key(self, account_id: str, key_id: str,
                         secret_hash: str) -> KeyRecord | None:
        try:
            return await self.rotate_secret(key_id, secret_hash, account_id)
        except NotFound:
            return None
