"""The Redis side of alerts: the outbox streams read through the senders' consumer group,
acknowledged (deleted) once delivered, measured for the lag gauges; the key.expiring pass.

The events themselves are written by the scripts (settle.lua, update_key.lua,
alert_expiring.lua); `enable_alerts` gives the Store what they need. Accounts are found in
the account set and keys in each account's key set, so no command walks the keyspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config.alerts import AlertSettings
from gateway.store import Store
from gateway.store.client import Script
from gateway.store.names import Names
from gateway.store.records import _text
from gateway.store.scripts import lua_source

GROUP = "alert-send"  # the senders' consumer group on every outbox stream
EXPIRING_BATCH = 100  # key records per alert_expiring.lua call


def enable_alerts(store: Store, settings: AlertSettings) -> None:
    """Makes the store's scripts write alert events (settle.lua's budget.threshold and
    credits.low, update_key.lua's key.deactivated); nothing when no webhook is configured,
    so that a gateway without alerts sends settle.lua exactly the arguments it did before."""
    if not settings.enabled:
        store.alert_cap = 0
        store.alert_settle_args = ()
        return
    low = -1 if settings.credits_low_micro is None else settings.credits_low_micro
    store.alert_settle_args = (low, *settings.thresholds_ppm)
    store.alert_cap = settings.max_outbox_events


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One event as a script wrote it (money micro-USD, times Redis time in microseconds)."""

    stream_id: str  # "<ms>-<seq>": its place in the account's outbox
    account_id: str
    type: str
    fields: dict[str, str]

    @property
    def id(self) -> str:
        """The idempotency id: the same on every delivery of this event, unique across
        accounts (a stream id is unique within its stream)."""
        return f"evt_{self.account_id}_{self.stream_id}"

    @property
    def created_at_us(self) -> int:
        text = self.fields.get("created_at", "")
        return int(text) if text.isdigit() else int(self.stream_id.partition("-")[0]) * 1000


@dataclass(frozen=True, slots=True)
class OutboxState:
    length: int
    oldest_ms: int | None  # when the oldest waiting event was written (None: none waits)
    now_ms: int
    dropped: int


def _event(account_id: str, stream_id: Any, flat: Sequence[Any]) -> AlertEvent:
    fields = {_text(k): (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
              for k, v in zip(flat[::2], flat[1::2], strict=True)}
    return AlertEvent(_text(stream_id), fields.get("account_id") or account_id,
                      fields.get("type", ""), fields)


class Outbox:
    """The sender's operations on the account outboxes (one consumer of the group)."""

    def __init__(self, store: Store, consumer: str, group: str = GROUP) -> None:
        self.store = store
        self.consumer = consumer
        self.group = group
        self._read = Script.of(lua_source("group_read"))
        self._ack = Script.of(lua_source("group_ack"))
        self._state = Script.of(lua_source("alert_state"))
        self._expiring = Script.of(lua_source("alert_expiring"))
        store.client.register((self._read, self._ack, self._state, self._expiring))

    async def accounts(self) -> list[str]:
        return sorted(_text(a) for a in await self.store._cmd("SMEMBERS", Names.ACCOUNTS))

    async def read(self, account_id: str, count: int, start: str = ">",
                   claim_idle_ms: int = 0) -> list[AlertEvent]:
        """`start`: '>' new events, '0' this consumer's unacknowledged ones, 'claim' any
        consumer's that waited `claim_idle_ms` (lua/group_read.lua)."""
        raw = await self.store._evalsha(
            self._read, [Names.alerts(account_id)],
            [self.group, self.consumer, count, start, claim_idle_ms])
        return [_event(account_id, stream_id, flat) for stream_id, flat in raw]

    async def touch(self, account_id: str, stream_ids: Sequence[str]) -> None:
        """Marks events this sender is still retrying as its own and not idle, so that no
        other sender claims them meanwhile."""
        if stream_ids:
            await self.store._cmd("XCLAIM", Names.alerts(account_id), self.group,
                                  self.consumer, 0, *stream_ids, "JUSTID")

    async def ack(self, account_id: str, stream_ids: Sequence[str]) -> int:
        """Done with these events (delivered or given up): deleted from the outbox."""
        if not stream_ids:
            return 0
        return int(await self.store._evalsha(self._ack, [Names.alerts(account_id)],
                                             [self.group, *stream_ids]))

    async def state(self, account_id: str) -> OutboxState:
        raw = await self.store._evalsha(
            self._state, [Names.alerts(account_id), Names.account(account_id)], [])
        oldest = _text(raw[1])
        return OutboxState(int(raw[0]), int(oldest.partition("-")[0]) if oldest else None,
                           int(raw[2]), int(raw[3]))

    async def scan_expiring(self, account_id: str, settings: AlertSettings) -> int:
        """Writes key.expiring for the account's keys that expire within the window (each
        once per expiry); returns how many events were written."""
        key_ids = sorted(_text(k) for k in await self.store._cmd(
            "SMEMBERS", Names.account_keys(account_id)))
        written = 0
        for start in range(0, len(key_ids), EXPIRING_BATCH):
            batch = key_ids[start:start + EXPIRING_BATCH]
            written += int(await self.store._evalsha(
                self._expiring,
                [Names.account(account_id), Names.alerts(account_id),
                 *(Names.key(account_id, k) for k in batch)],
                [settings.max_outbox_events, settings.expiring_within, account_id]))
        return written
