"""A key's life after creation: its settings changed, renewed, its secret rotated, deleted.

Every change is one script on the key's record (or one per hash slot), so an admission on
any replica sees all of a change or none of it, at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ConfigError, NotFound
from gateway.store.admin import Administration
from gateway.store.codes import UpdateCode
from gateway.store.names import Names
from gateway.store.records import KeyRecord, _text

# A field given as FOLLOW_PLAN clears the key's own value: it follows its plan again.
FOLLOW_PLAN = "plan"


@dataclass(frozen=True, slots=True)
class KeyChange:
    """What one update changes; None leaves a setting as it is."""

    name: str | None = None
    plan: str | None = None
    rpm: int | str | None = None  # an int, or FOLLOW_PLAN
    tpm: int | str | None = None
    budget_limit: int | str | None = None  # micro-USD, or "none" for no limit
    budget_duration: int | None = None  # seconds; restarts the budget period now
    expires_at_us: int | None = None
    expires_in_seconds: int | None = None
    renew_seconds: int | None = None
    active: bool | None = None
    models: str | None = None  # patterns joined by commas, or FOLLOW_PLAN
    max_concurrent: int | str | None = None  # or FOLLOW_PLAN
    windows: str | None = None  # budget windows, encoded (config/windows.py), or FOLLOW_PLAN

    def fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.plan is not None:
            out["plan"] = self.plan
        for field, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None:
                out[field] = "" if value == FOLLOW_PLAN else str(value)
        if self.budget_limit is not None:
            out["budget_limit"] = "" if self.budget_limit == "none" else str(self.budget_limit)
        if self.budget_duration is not None:
            out["budget_duration"] = str(self.budget_duration)
        if self.expires_at_us is not None:
            out["expires_at"] = str(self.expires_at_us)
        if self.active is not None:
            out["active"] = "1" if self.active else "0"
        if self.models is not None:
            out["models"] = "" if self.models == FOLLOW_PLAN else self.models
        if self.windows is not None:
            out["windows"] = "" if self.windows == FOLLOW_PLAN else self.windows
        if self.max_concurrent is not None:
            out["max_concurrent"] = ("" if self.max_concurrent == FOLLOW_PLAN
                                     else str(self.max_concurrent))
        return out

    def is_empty(self) -> bool:
        return (not self.fields() and self.expires_in_seconds is None
                and self.renew_seconds is None)


class KeyLifecycle(Administration):
    """Update, renew, rotate and delete, by key id (the operator's view: any account)."""

    async def change_key(self, key_id: str, change: KeyChange,
                         account_id: str | None = None) -> KeyRecord:
        """Applies `change` to a key (of `account_id` when given: another account's key is
        NotFound). Raises NotFound, or ConfigError for a deleted key or a past expiry."""
        account_id = account_id or await self.key_account(key_id)
        args: list[str] = [
            "1" if change.budget_duration is not None else "0",
            "" if change.expires_in_seconds is None else str(change.expires_in_seconds),
            "" if change.renew_seconds is None else str(change.renew_seconds),
            str(self.alert_cap)]  # alerts: a deactivation writes key.deactivated
        keys = [Names.key(account_id, key_id)]
        if self.alert_cap:
            keys += [Names.account(account_id), Names.alerts(account_id)]
        for field, value in change.fields().items():
            args += [field, value]
        reply = await self._evalsha(self._update_key, keys, args)
        code = int(reply[0])
        if code == UpdateCode.MISSING:
            raise NotFound(f"no key with id {key_id}")
        if code == UpdateCode.DELETED:
            raise ConfigError(f"key {key_id} was deleted; deleted keys cannot change")
        if code == UpdateCode.EXPIRY_PAST:
            raise ConfigError("the expiry would be in the past (Redis time)")
        if code == UpdateCode.EXPIRY_TOO_LATE:
            raise ConfigError("the expiry would be after 9999-12-31")
        return await self.get_key(key_id)

    async def rotate_secret(self, key_id: str, secret_hash: str,
                            account_id: str | None = None) -> KeyRecord:
        """The key's secret becomes the one hashed to `secret_hash`; the old one stops
        working at once (admission compares the record's hash)."""
        account_id = account_id or await self.key_account(key_id)
        old = await self._evalsha(self._rotate, [Names.key(account_id, key_id)], [secret_hash])
        if old is None:
            record = await self._hash(Names.key(account_id, key_id))
            if record:
                raise ConfigError(f"key {key_id} was deleted; deleted keys cannot change")
            raise NotFound(f"no key with id {key_id}")
        await self._cmd("SET", Names.secret(secret_hash), f"{account_id}:{key_id}")
        await self._cmd("DEL", Names.secret(_text(old)))
        return await self.get_key(key_id)

    async def delete_key(self, key_id: str, account_id: str | None = None) -> KeyRecord:
        """The secret stops working at once; the record and usage counters stay (shown as
        deleted), and the key no longer counts towards max_keys_per_account. Deleting a
        deleted key changes nothing."""
        account_id = account_id or await self.key_account(key_id)
        old = await self._evalsha(
            self._delete_key,
            [Names.key(account_id, key_id), Names.deleted_keys(account_id)], [key_id])
        if old is None:
            raise NotFound(f"no key with id {key_id}")
        if _text(old):
            await self._cmd("DEL", Names.secret(_text(old)))
        return await self.get_key(key_id)
