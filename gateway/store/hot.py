"""The hot path: key lookup, admission, settlement and the usage read, one script each."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gateway.store.base import StoreBase
from gateway.store.names import RESERVATION_TTL_SECONDS, HotNames, Names
from gateway.store.records import (
    NO_DETAIL,
    Ask,
    Decision,
    KeyRef,
    KeyUsage,
    SpendDetail,
    WindowState,
    _optional_int,
    _text,
)
from gateway.store.replies import FAILURES, store_error

_MAX_CACHED_NAMES = 100_000


class HotPath(StoreBase):
    """Lookup, admission, settlement, and what /v1/usage reads."""

    # Entries each account's ledger stream may hold (settle.lua); 0: settlements append no
    # ledger entry. The gateway sets it from [ledger] when a PostgreSQL URL is configured.
    ledger_cap = 0
    # alerts (gateway/alerts/outbox.py enable_alerts, from [alerts]): events each account's
    # outbox may hold (0: no alert events) and settle.lua's ARGV[16...]
    alert_cap = 0
    alert_settle_args: tuple[int, ...] = ()

    def _hot_names(self, ref: KeyRef) -> HotNames:
        names = self._names.get(ref)
        if names is None:
            if len(self._names) >= _MAX_CACHED_NAMES:
                self._names.clear()
            names = self._names[ref] = Names.hot(ref)
        return names

    async def lookup(self, secret_hash: str) -> KeyRef | None:
        value = await self._cmd("GET", Names.secret(secret_hash))
        if value is None:
            return None
        account_id, _, key_id = _text(value).partition(":")
        return KeyRef(account_id, key_id)

    async def admit(self, ref: KeyRef, secret_hash: str, request_id: str,
                    ask: Ask, plan_limits: Sequence[str | int] = ()) -> Decision:
        """`plan_limits` (Settings.plan_limits): the limits of keys that follow their plan;
        such a key's plan missing from it is refused (PLAN_UNKNOWN)."""
        names = self._hot_names(ref)
        keys = [names.key, names.account, names.reservation_prefix + request_id,
                names.key_slots, names.account_slots, names.usage_prefix]
        args = [secret_hash, ask.prompt_tokens, ask.per_sequence, ask.sequences, ask.cost,
                ask.prompt_cost, ask.output_price, RESERVATION_TTL_SECONDS,
                "clamp" if ask.clamp else "reject", ask.model, *plan_limits]
        raw = await self._evalsha(self._admit, keys, args)
        n = [int(v) for v in raw[:8]]
        return Decision(n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], _text(raw[8]),
                        _text(raw[9]), int(raw[10]), int(raw[11]), int(raw[12]),
                        _text(raw[13]))

    async def count_refusal(self, ref: KeyRef) -> None:
        """Counts a refusal admit.lua left to the caller (a queueing plan's, refused in the
        end after or instead of a wait)."""
        await self._evalsha(self._refused, [self._hot_names(ref).usage_prefix], [])

    async def renew_slots(self, ref: KeyRef, reservation_ids: Sequence[str],
                          lease_us: int) -> int:
        """Extends the leases of these requests' slots (those still held) by `lease_us` from
        Redis's now; returns how many were renewed."""
        names = self._hot_names(ref)
        members = [names.reservation_prefix + request_id for request_id in reservation_ids]
        return int(await self._evalsha(self._renew_slots,
                                       [names.key_slots, names.account_slots],
                                       [lease_us, *members]))

    async def settle(self, ref: KeyRef, request_id: str, prompt_tokens: int,
                     completion_tokens: int, cost: int, count_usage: bool = True,
                     detail: SpendDetail = NO_DETAIL) -> bool:
        args = self._settle_args(ref, request_id, prompt_tokens, completion_tokens, cost,
                                 count_usage, detail)
        return bool(await self._evalsha(self._settle, self._settle_keys(ref, request_id), args))

    def _settle_keys(self, ref: KeyRef, request_id: str) -> list[str]:
        names = self._hot_names(ref)
        return [names.key, names.account, names.reservation_prefix + request_id,
                names.usage_prefix, names.ledger, names.key_slots, names.account_slots,
                names.alerts]

    def _settle_args(self, ref: KeyRef, request_id: str, prompt_tokens: int,
                     completion_tokens: int, cost: int, count_usage: bool,
                     detail: SpendDetail) -> list[Any]:
        if not count_usage:
            return [prompt_tokens, completion_tokens, cost, 0]
        if not self.ledger_cap:
            # ARGV[5..12] as the ledger's "off" but for the model served (the counters keep
            # spend by model), then the alerts' ARGV[13...]
            if not self.alert_cap:
                if not detail.model:  # settle.lua reads an absent ARGV[10] as ''
                    return [prompt_tokens, completion_tokens, cost, 1]
                return [prompt_tokens, completion_tokens, cost, 1, 0, "", "", "", "",
                        detail.model]
            return [prompt_tokens, completion_tokens, cost, 1, 0, "", "", "", "", detail.model,
                    "", "", self.alert_cap, ref.account_id, ref.key_id,
                    *self.alert_settle_args]
        args = [prompt_tokens, completion_tokens, cost, 1, self.ledger_cap, request_id,
                ref.key_id, ref.account_id, detail.route, detail.model, detail.cached_tokens,
                detail.status]
        if self.alert_cap:
            args += [self.alert_cap, ref.account_id, ref.key_id, *self.alert_settle_args]
        return args

    def settle_started(self, ref: KeyRef, request_id: str, prompt_tokens: int,
                       completion_tokens: int, cost: int,
                       detail: SpendDetail = NO_DETAIL) -> asyncio.Future[Any] | None:
        """The settlement, queued on the hot connection before this returns, so that no
        cancellation of the caller can stop it; it is written when the caller next yields
        to the loop, before anything the caller writes after that. None when there is no
        connected hot connection (then use settle()). Read the outcome with settled()."""
        return self.client.started(
            self._settle, self._settle_keys(ref, request_id),
            self._settle_args(ref, request_id, prompt_tokens, completion_tokens, cost, True,
                              detail))

    @staticmethod
    def settled(reply: asyncio.Future[Any]) -> bool:
        """settle()'s answer from a settle_started() reply; raises what settle() raises
        (a NOSCRIPT reply is StoreUnavailable: settle() loads the script and retries)."""
        try:
            return bool(reply.result())
        except FAILURES as exc:
            raise store_error(exc) from exc

    async def key_usage(self, ref: KeyRef, secret_hash: str,
                        plan_windows: Sequence[str] = ()) -> KeyUsage:
        """`plan_windows`: Settings.admission.windows, the plans' budget windows."""
        keys = [Names.key(ref.account_id, ref.key_id), Names.account(ref.account_id)]
        raw = await self._evalsha(self._usage, keys, [secret_hash, *plan_windows])
        if int(raw[0]) != 0:
            return KeyUsage(code=int(raw[0]))
        v = [_text(x) for x in raw]
        return KeyUsage(
            code=0, now_us=int(v[1]), name=v[2], key_type=v[3], plan=v[4],
            created_at_us=int(v[5]), expires_at_us=_optional_int(v[6]),
            rpm=_optional_int(v[7]), tpm=_optional_int(v[8]),
            budget_limit=_optional_int(v[9]), budget_duration=int(v[10]),
            spent=int(v[11]), resets_at_us=int(v[12]), credits=int(v[13]),
            windows=_windows(raw[14]),
        )


def _windows(flat: Sequence[Any]) -> tuple[WindowState, ...]:
    v = [_text(x) for x in flat]
    return tuple(WindowState(v[i], int(v[i + 1]), int(v[i + 2]), v[i + 3] == "c",
                             int(v[i + 4]), _optional_int(v[i + 5]))
                 for i in range(0, len(v) - 5, 6))
