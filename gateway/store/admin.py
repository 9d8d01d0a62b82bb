"""Administration: accounts, keys, credits."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping

import orjson

from gateway.errors import (
    ConfigError,
    LimitReached,
    NotFound,
)
from gateway.store.codes import CreditCode
from gateway.store.hot import HotPath
from gateway.store.names import SUBSCRIPTION_DEFAULT_SECONDS, Names
from gateway.store.records import (
    Account,
    CreditEntry,
    KeyRecord,
    _key_record,
    _optional_int,
    _text,
)

CREDIT_LOG_ENTRIES = 1000  # per account; older adjustments drop off


class Administration(HotPath):
    """Accounts, keys and credits, for the CLI, the demo and the management API."""

    async def create_account(self, name: str) -> Account:
        if not name.strip():
            raise ConfigError("account name must not be empty")
        if name != name.strip() or len(name) > 200 or not name.isprintable():
            raise ConfigError("an account name is at most 200 printable characters, without "
                              "spaces around it")
        with contextlib.suppress(ValueError):
            uuid.UUID(name)
            raise ConfigError("an account name must not look like an account id (a UUID)")
        account_id = str(uuid.uuid4())
        if not await self._cmd("SET", Names.account_name(name), account_id, "NX"):
            raise ConfigError(f"an account named {name!r} already exists")
        now = await self.now_us()
        await self._hset(Names.account(account_id), {
            "id": account_id, "name": name, "credits": 0, "created_at": now, "total_spent": 0})
        await self._cmd("SADD", Names.ACCOUNTS, account_id)
        return Account(account_id, name, 0, now)

    async def account_by_name(self, name: str) -> Account | None:
        account_id = await self._cmd("GET", Names.account_name(name))
        return None if account_id is None else await self.get_account(_text(account_id))

    async def get_account(self, account_id: str) -> Account:
        raw = await self._hash(Names.account(account_id))
        if not raw:
            raise NotFound(f"no account with id {account_id}")
        f = {_text(k): _text(v) for k, v in raw.items()}
        return Account(f["id"], f["name"], int(f["credits"]), int(f["created_at"]),
                       _optional_int(f.get("rpm")), _optional_int(f.get("tpm")),
                       _optional_int(f.get("max_concurrent")), f.get("windows", ""))

    async def set_account_limits(self, account_id: str,
                                 limits: Mapping[str, int | str | None]) -> Account:
        """Sets (an int) or clears (None) the account's rpm, tpm and max_concurrent, and its
        budget windows ("windows", encoded; "" none), all in one step
        (lua/account_limits.lua); raises NotFound for a missing account."""
        args: list[str] = []
        for field, value in limits.items():
            args += [field, "" if value is None else str(value)]
        if not await self._evalsha(self._account_limits, [Names.account(account_id)], args):
            raise NotFound(f"no account with id {account_id}")
        return await self.get_account(account_id)

    async def list_accounts(self) -> list[Account]:
        ids = sorted(_text(i) for i in await self._cmd("SMEMBERS", Names.ACCOUNTS))
        return [await self.get_account(i) for i in ids]

    async def add_credits(self, account_id: str, micro: int, reason: str = "",
                          by: str = "cli") -> Account:
        """Credits added (or, negative, taken away) with the reason recorded; a change that
        would leave a negative balance is refused."""
        reply = await self._evalsha(
            self._credits, [Names.account(account_id), Names.credit_log(account_id)],
            [micro, reason, by, CREDIT_LOG_ENTRIES])
        code = int(reply[0])
        if code == CreditCode.MISSING_ACCOUNT:
            raise NotFound(f"no account with id {account_id}")
        if code == CreditCode.NEGATIVE_BALANCE:
            raise ConfigError(f"the balance is {int(reply[1]) / 1e6:.6f} USD: taking "
                              f"{-micro / 1e6:.6f} would leave it negative")
        return await self.get_account(account_id)

    async def credit_log(self, account_id: str, count: int = 50) -> list[CreditEntry]:
        """The newest `count` adjustments, newest first."""
        raw = await self._cmd("LRANGE", Names.credit_log(account_id), 0, count - 1)
        entries = []
        for item in raw:
            doc = orjson.loads(item)
            entries.append(CreditEntry(int(doc["at"]), int(doc["micro"]), int(doc["balance"]),
                                       str(doc["by"]), str(doc["reason"])))
        return entries

    async def create_key(
        self, *, account_id: str, name: str, key_type: str, plan: str, rpm: int | None,
        tpm: int | None,
        budget_limit: int | None, budget_duration: int, expires_at_us: int | None,
        expires_in_seconds: int | None, secret_hash: str, max_keys: int = 100,
        models: str | None = None, max_concurrent: int | None = None,
        windows: str | None = None,
    ) -> KeyRecord:
        await self.get_account(account_id)
        now = await self.now_us()
        key_id = str(uuid.uuid4())
        added = await self._evalsha(
            self._add_key, [Names.account_keys(account_id), Names.deleted_keys(account_id)],
            [key_id, max_keys])
        if not int(added):
            raise LimitReached(f"the account already holds its maximum of {max_keys} keys "
                               f"(max_keys_per_account)")
        if key_type == "subscription" and expires_at_us is None:
            expires_at_us = now + (expires_in_seconds or SUBSCRIPTION_DEFAULT_SECONDS) * 1_000_000
        record = {
            "id": key_id, "account_id": account_id, "name": name, "type": key_type,
            "plan": plan, "hash": secret_hash, "active": "1", "created_at": now,
            "expires_at": "" if expires_at_us is None else expires_at_us,
            # No rpm/tpm of its own (''): the key follows its plan's (lua/admit.lua).
            "rpm": "" if rpm is None else rpm, "tpm": "" if tpm is None else tpm,
            "rpm_tat": 0, "tpm_tat": 0,
            "budget_limit": "" if budget_limit is None else budget_limit,
            "budget_duration": budget_duration, "spent": 0,
            "resets_at": now + budget_duration * 1_000_000, "total_spent": 0,
            # No models of its own (''): the plan's list decides (lua/admit.lua).
            "models": models or "",
            "max_concurrent": "" if max_concurrent is None else max_concurrent,
            "windows": windows or "",
        }
        await self._hset(Names.key(account_id, key_id), record)
        await self._cmd("SET", Names.key_index(key_id), account_id)
        # The secret mapping goes last: a key is usable only once its record is complete.
        await self._cmd("SET", Names.secret(secret_hash), f"{account_id}:{key_id}")
        return await self.get_key(key_id)

    async def key_account(self, key_id: str) -> str:
        account_id = await self._cmd("GET", Names.key_index(key_id))
        if account_id is None:
            raise NotFound(f"no key with id {key_id}")
        return _text(account_id)

    async def get_key(self, key_id: str) -> KeyRecord:
        account_id = await self.key_account(key_id)
        raw = await self._hash(Names.key(account_id, key_id))
        if not raw:
            raise NotFound(f"no key with id {key_id}")
        return _key_record(raw)

    async def list_keys(self, account_id: str) -> list[KeyRecord]:
        ids = await self._cmd("SMEMBERS", Names.account_keys(account_id))
        records = []
        for key_id in ids:
            raw = await self._hash(Names.key(account_id, _text(key_id)))
            if raw:  # a record deleted by hand is skipped, not fatal to the listing
                records.append(_key_record(raw))
        return sorted(records, key=lambda r: (r.created_at_us, r.id))

