"""The only module that talks to Redis: key names, Lua scripts and records.

Every Redis key of one account carries the hash tag ``{acct:<id>}`` so each script runs on
one cluster slot. Money is integer micro-USD; time is Redis time in microseconds.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import hiredis
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import (
    ConfigError,
    LimitReached,
    NotFound,
    StoreAmbiguous,
    StoreCommandError,
    StoreUnavailable,
)
from gateway.usage_windows import buckets_needed

T = TypeVar("T")
RESERVATION_TTL_SECONDS = 24 * 3600
SUBSCRIPTION_DEFAULT_SECONDS = 30 * 86400


@dataclass(frozen=True, slots=True)
class HotNames:
    """The names one key's admissions and settlements use, built once per key."""

    key: str
    account: str
    reservation_prefix: str
    usage_prefix: str


class Names:
    """Every Redis key name the gateway uses is built here."""

    @staticmethod
    def _acct(account_id: str) -> str:
        return f"gw:{{acct:{account_id}}}"

    @classmethod
    def account(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:account"

    @classmethod
    def account_keys(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:keys"

    @classmethod
    def key(cls, account_id: str, key_id: str) -> str:
        return f"{cls._acct(account_id)}:key:{key_id}"

    @classmethod
    def reservation(cls, account_id: str, request_id: str) -> str:
        return cls.reservation_prefix(account_id) + request_id

    @classmethod
    def reservation_prefix(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:res:"

    @classmethod
    def hot(cls, ref: KeyRef) -> HotNames:
        return HotNames(cls.key(ref.account_id, ref.key_id), cls.account(ref.account_id),
                        cls.reservation_prefix(ref.account_id),
                        cls.usage_prefix(ref.account_id, ref.key_id))

    @classmethod
    def usage_prefix(cls, account_id: str, key_id: str) -> str:
        return f"{cls._acct(account_id)}:usage:{key_id}"

    @staticmethod
    def secret(secret_hash: str) -> str:
        return f"gw:secret:{secret_hash}"

    @staticmethod
    def key_index(key_id: str) -> str:
        return f"gw:keyid:{key_id}"

    @staticmethod
    def account_name(name: str) -> str:
        return f"gw:account-name:{name}"

    ACCOUNTS = "gw:accounts"

    # -- management ---------------------------------------------------------------------

    @classmethod
    def usage_minutes(cls, account_id: str, key_id: str, hour: int) -> str:
        """settle.lua's per-minute counters of one hour (it appends ':m:<hour>' itself)."""
        return f"{cls.usage_prefix(account_id, key_id)}:m:{hour}"

    @classmethod
    def usage_hours(cls, account_id: str, key_id: str, day: int) -> str:
        return f"{cls.usage_prefix(account_id, key_id)}:h:{day}"

    @classmethod
    def mgmt_key(cls, account_id: str, mgmt_id: str) -> str:
        return f"{cls._acct(account_id)}:mgmt:{mgmt_id}"

    @classmethod
    def account_mgmt_keys(cls, account_id: str) -> str:
        return f"{cls._acct(account_id)}:mgmt-keys"

    @classmethod
    def mgmt_bucket(cls, account_id: str, principal: str) -> str:
        return f"{cls._acct(account_id)}:mgmt-rl:{principal}"

    @staticmethod
    def mgmt_secret(secret_hash: str) -> str:
        return f"gw:mgmt-secret:{secret_hash}"

    @staticmethod
    def mgmt_index(mgmt_id: str) -> str:
        return f"gw:mgmt-id:{mgmt_id}"


_SOURCE_TREE_LUA = Path(__file__).resolve().parent.parent / "lua"


def lua_source(name: str) -> str:
    """A script from the installed package (`gateway.lua`, the wheel's copy of lua/)."""
    try:
        scripts = resources.files("gateway.lua")
    except ModuleNotFoundError:
        # `python -m gateway` run inside a source checkout imports gateway/ from the working
        # directory, beside which lua/ lies, not from the installed wheel.
        return (_SOURCE_TREE_LUA / f"{name}.lua").read_text()
    return scripts.joinpath(f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class KeyRef:
    account_id: str
    key_id: str


@dataclass(slots=True)
class Ask:
    """What one admission reserves: an upper bound of the request's tokens and its cost."""

    prompt_tokens: int
    per_sequence: int  # completion tokens one sequence may generate
    sequences: int
    cost: int  # micro-USD of the whole bound
    prompt_cost: int  # micro-USD of the prompt alone
    output_price: int  # micro-USD per million completion tokens
    clamp: bool = True  # lower the bound to what can be paid, rather than refuse

    @classmethod
    def flat(cls, tokens: int, cost: int) -> Ask:
        """A reservation of `tokens` prompt tokens costing `cost`, that nothing can lower."""
        return cls(tokens, 0, 1, cost, cost, 0)


@dataclass(frozen=True, slots=True)
class Decision:
    code: int
    rpm_limit: int
    rpm_remaining: int
    rpm_reset_us: int
    tpm_limit: int
    tpm_remaining: int
    tpm_reset_us: int
    retry_after_us: int
    plan: str
    key_type: str
    per_sequence: int = 0  # the completion bound admitted (at most the one asked for)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """What GET /v1/usage reports: one consistent read at Redis time `now_us`."""

    code: int
    now_us: int = 0
    name: str = ""
    key_type: str = ""
    plan: str = ""
    created_at_us: int = 0
    expires_at_us: int | None = None
    rpm: int = 0
    tpm: int = 0
    budget_limit: int | None = None
    budget_duration: int = 0
    spent: int = 0
    resets_at_us: int = 0
    credits: int = 0


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    credits: int
    created_at_us: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    account_id: str
    name: str
    key_type: str
    plan: str
    active: bool
    created_at_us: int
    expires_at_us: int | None
    rpm: int
    tpm: int
    budget_limit: int | None
    budget_duration: int
    spent: int
    resets_at_us: int
    total_spent: int


@dataclass(frozen=True, slots=True)
class MgmtKey:
    id: str
    account_id: str
    created_at_us: int


@dataclass(frozen=True, slots=True)
class MgmtRef:
    account_id: str
    mgmt_id: str


@dataclass(frozen=True, slots=True)
class Throttle:
    allowed: bool
    remaining: int
    retry_after_us: int
    reset_us: int
    now_us: int


@dataclass(frozen=True, slots=True)
class KeyCounters:
    record: KeyRecord
    minute_hashes: dict[int, dict[str, int]]
    hour_hashes: dict[int, dict[str, int]]


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    now_us: int
    keys: list[KeyCounters]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_int(value: Any) -> int | None:
    text = _text(value) if value is not None else ""
    return int(text) if text else None


def _key_record(raw: dict[Any, Any]) -> KeyRecord:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return KeyRecord(
        id=f["id"], account_id=f["account_id"], name=f["name"], key_type=f["type"],
        plan=f["plan"], active=f["active"] == "1", created_at_us=int(f["created_at"]),
        expires_at_us=_optional_int(f.get("expires_at")), rpm=int(f["rpm"]), tpm=int(f["tpm"]),
        budget_limit=_optional_int(f.get("budget_limit")),
        budget_duration=int(f["budget_duration"]), spent=int(f["spent"]),
        resets_at_us=int(f["resets_at"]), total_spent=int(f.get("total_spent", "0")),
    )


def _maybe_applied(exc: BaseException) -> bool:
    # A timeout or a connection lost after the command was written: Redis may have run it.
    # Failing to connect at all (refused, connect timeout) means it certainly did not.
    if not isinstance(exc, TimeoutError | RedisTimeoutError | RedisConnectionError):
        return False
    return "connecting to" not in str(exc)


# Errors Redis answers while it is starting, failing over or briefly busy: worth a retry.
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN",
                      "NOSCRIPT")


# redis-py turns those replies into these classes and drops the prefix from the message.
_TRANSIENT_ERRORS = (ClusterDownError, TryAgainError, ReadOnlyError, NoScriptError)


def _reply_error(message: str) -> StoreUnavailable:
    text = f"Redis error: {message[:80]}"
    if message.startswith(_TRANSIENT_REPLIES):
        return StoreUnavailable(text)
    return StoreCommandError(text)


def _response_error(exc: ResponseError) -> StoreUnavailable:
    if isinstance(exc, _TRANSIENT_ERRORS):
        return StoreUnavailable(f"Redis error: {type(exc).__name__}: {str(exc)[:80]}")
    return _reply_error(str(exc))


def _tls_reason(exc: BaseException) -> str:
    # A failed TLS handshake says why (e.g. "certificate verify failed: ..."): no secrets.
    cause: BaseException | None = exc
    for _ in range(8):  # a bounded walk: exception chains can be cyclic
        if cause is None:
            break
        if isinstance(cause, ssl.SSLError):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return f", TLS certificate verify failed: {cause.verify_message}"
            return f", TLS error: {cause.reason or 'handshake failed'}"
        cause = cause.__cause__ or cause.__context__
    return ""


class Store:
    """Typed operations over one redis-py asyncio client (standalone, cluster or embedded)."""

    def __init__(self, client: Any, hot: Multiplexed | None = None) -> None:
        self.client = client
        self._hot = hot
        self._names: dict[KeyRef, HotNames] = {}
        self._admit = client.register_script(lua_source("admit"))
        self._settle = client.register_script(lua_source("settle"))
        self._usage = client.register_script(lua_source("usage"))
        self._mgmt_limit = client.register_script(lua_source("mgmt_limit"))
        self._account_index = client.register_script(lua_source("account_index"))
        self._rotate = client.register_script(lua_source("rotate"))
        self._add_key = client.register_script(lua_source("add_key"))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        # Backend errors become one error type here, at the storage edge.
        try:
            return await awaitable
        except ResponseError as exc:
            raise _response_error(exc) from exc
        except (TimeoutError, RedisError, OSError) as exc:
            message = type(exc).__name__ + _tls_reason(exc)
            if _maybe_applied(exc):
                raise StoreAmbiguous(message) from exc
            raise StoreUnavailable(message) from exc
        except RedisClusterException as exc:  # not a RedisError: e.g. a plain Redis
            raise StoreUnavailable(f"Redis Cluster: {str(exc)[:120]}") from exc
        except (AttributeError, RuntimeError, ValueError, TypeError) as exc:
            # redis-py raising from a connection torn down under it (its issue #4287:
            # "'NoneType' object has no attribute 'writelines'"): the command may or may
            # not have been sent.
            raise StoreAmbiguous(f"Redis client error: {type(exc).__name__}") from exc

    async def ping(self) -> bool:
        if self._hot is not None:  # the connection the hot path really uses
            await self._hot_call("PING")
        return bool(await self._call(self.client.ping()))

    async def ensure_scripts(self) -> None:
        """Makes sure every registered script is cached in Redis, loading any that is not
        (after SCRIPT FLUSH or a failover). Raises StoreUnavailable when that fails."""
        scripts = (self._admit, self._settle, self._usage)
        present = await self._call(self.client.script_exists(*(s.sha for s in scripts)))
        for script, loaded in zip(scripts, present, strict=True):
            if not loaded:
                await self._call(self.client.script_load(script.script))

    async def close(self) -> None:
        if self._hot is not None:
            await self._hot.close()
        await self.client.aclose()

    async def _hot_call(self, *command: Any) -> Any:
        """A hot-path command: on the multiplexed connection when there is one."""
        if self._hot is None:
            return await self._call(self.client.execute_command(*command))
        try:
            return await self._hot.call(*command)
        except (_Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
            raise _hot_error(exc) from exc

    async def _evalsha(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        hot = self._hot
        if hot is None:
            return await self._call(script(keys=keys, args=args))
        # One frame between the caller and the socket: every admission runs this.
        try:
            try:
                return await hot.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except hiredis.ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            # After SCRIPT FLUSH or a failover (the script was not run): load every script
            # of the hot path, so the settlement queued after this admission finds its own
            # and lands before the client sees the response, then run.
            for loading in {script, self._admit, self._settle}:
                await hot.call("SCRIPT", "LOAD", loading.script)
            return await hot.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except (_Unsent, TimeoutError, OSError, hiredis.ReplyError) as exc:
            raise _hot_error(exc) from exc

    async def now_us(self) -> int:
        seconds, micros = await self._call(self.client.time())
        return int(seconds) * 1_000_000 + int(micros)

    # -- hot path -------------------------------------------------------------------------

    def _hot_names(self, ref: KeyRef) -> HotNames:
        names = self._names.get(ref)
        if names is None:
            if len(self._names) >= _MAX_CACHED_NAMES:
                self._names.clear()
            names = self._names[ref] = Names.hot(ref)
        return names

    async def lookup(self, secret_hash: str) -> KeyRef | None:
        value = await self._hot_call("GET", Names.secret(secret_hash))
        if value is None:
            return None
        account_id, _, key_id = _text(value).partition(":")
        return KeyRef(account_id, key_id)

    async def admit(self, ref: KeyRef, secret_hash: str, request_id: str,
                    ask: Ask) -> Decision:
        names = self._hot_names(ref)
        keys = [names.key, names.account, names.reservation_prefix + request_id]
        args = [secret_hash, ask.prompt_tokens, ask.per_sequence, ask.sequences, ask.cost,
                ask.prompt_cost, ask.output_price, RESERVATION_TTL_SECONDS,
                "clamp" if ask.clamp else "reject"]
        raw = await self._evalsha(self._admit, keys, args)
        n = [int(v) for v in raw[:8]]
        return Decision(n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], _text(raw[8]),
                        _text(raw[9]), int(raw[10]))

    async def settle(self, ref: KeyRef, request_id: str, prompt_tokens: int,
                     completion_tokens: int, cost: int, count_usage: bool = True) -> bool:
        args = [prompt_tokens, completion_tokens, cost, 1 if count_usage else 0]
        return bool(await self._evalsha(self._settle, self._settle_keys(ref, request_id), args))

    def _settle_keys(self, ref: KeyRef, request_id: str) -> list[str]:
        names = self._hot_names(ref)
        return [names.key, names.account, names.reservation_prefix + request_id,
                names.usage_prefix]

    def settle_started(self, ref: KeyRef, request_id: str, prompt_tokens: int,
                       completion_tokens: int, cost: int) -> asyncio.Future[Any] | None:
        """The settlement, queued on the hot connection before this returns, so that no
        cancellation of the caller can stop it; it is written when the caller next yields
        to the loop, before anything the caller writes after that. None when there is no
        connected hot connection (then use settle()). Read the outcome with settled()."""
        protocol = self._hot.connected() if self._hot is not None else None
        if protocol is None:
            return None
        return protocol.request(_pack(("EVALSHA", self._settle.sha, 4,
                                       *self._settle_keys(ref, request_id), prompt_tokens,
                                       completion_tokens, cost, 1)))

    @staticmethod
    def settled(reply: asyncio.Future[Any]) -> bool:
        """settle()'s answer from a settle_started() reply; raises what settle() raises
        (a NOSCRIPT reply is StoreUnavailable: settle() loads the script and retries)."""
        try:
            return bool(reply.result())
        except (TimeoutError, OSError, hiredis.ReplyError) as exc:
            raise _hot_error(exc) from exc

    async def key_usage(self, ref: KeyRef, secret_hash: str) -> KeyUsage:
        keys = [Names.key(ref.account_id, ref.key_id), Names.account(ref.account_id)]
        raw = await self._call(self._usage(keys=keys, args=[secret_hash]))
        if int(raw[0]) != 0:
            return KeyUsage(code=int(raw[0]))
        v = [_text(x) for x in raw]
        return KeyUsage(
            code=0, now_us=int(v[1]), name=v[2], key_type=v[3], plan=v[4],
            created_at_us=int(v[5]), expires_at_us=_optional_int(v[6]), rpm=int(v[7]),
            tpm=int(v[8]), budget_limit=_optional_int(v[9]), budget_duration=int(v[10]),
            spent=int(v[11]), resets_at_us=int(v[12]), credits=int(v[13]),
        )

    # -- administration -------------------------------------------------------------------

    async def create_account(self, name: str) -> Account:
        if not name.strip():
            raise ConfigError("account name must not be empty")
        account_id = str(uuid.uuid4())
        if not await self._call(self.client.set(Names.account_name(name), account_id, nx=True)):
            raise ConfigError(f"an account named {name!r} already exists")
        now = await self.now_us()
        await self._call(self.client.hset(Names.account(account_id), mapping={
            "id": account_id, "name": name, "credits": 0, "created_at": now, "total_spent": 0}))
        await self._call(self.client.sadd(Names.ACCOUNTS, account_id))
        return Account(account_id, name, 0, now)

    async def account_by_name(self, name: str) -> Account | None:
        account_id = await self._call(self.client.get(Names.account_name(name)))
        return None if account_id is None else await self.get_account(_text(account_id))

    async def get_account(self, account_id: str) -> Account:
        raw = await self._call(self.client.hgetall(Names.account(account_id)))
        if not raw:
            raise NotFound(f"no account with id {account_id}")
        f = {_text(k): _text(v) for k, v in raw.items()}
        return Account(f["id"], f["name"], int(f["credits"]), int(f["created_at"]))

    async def list_accounts(self) -> list[Account]:
        ids = sorted(_text(i) for i in await self._call(self.client.smembers(Names.ACCOUNTS)))
        return [await self.get_account(i) for i in ids]

    async def add_credits(self, account_id: str, micro: int) -> Account:
        await self.get_account(account_id)
        await self._call(self.client.hincrby(Names.account(account_id), "credits", micro))
        return await self.get_account(account_id)

    async def create_key(
        self, *, account_id: str, name: str, key_type: str, plan: str, rpm: int, tpm: int,
        budget_limit: int | None, budget_duration: int, expires_at_us: int | None,
        expires_in_seconds: int | None, secret_hash: str, max_keys: int = 100,
    ) -> KeyRecord:
        await self.get_account(account_id)
        now = await self.now_us()
        key_id = str(uuid.uuid4())
        added = await self._call(self._add_key(keys=[Names.account_keys(account_id)],
                                               args=[key_id, max_keys]))
        if not int(added):
            raise LimitReached(f"the account already holds its maximum of {max_keys} keys "
                               f"(max_keys_per_account)")
        if key_type == "subscription" and expires_at_us is None:
            expires_at_us = now + (expires_in_seconds or SUBSCRIPTION_DEFAULT_SECONDS) * 1_000_000
        record = {
            "id": key_id, "account_id": account_id, "name": name, "type": key_type,
            "plan": plan, "hash": secret_hash, "active": "1", "created_at": now,
            "expires_at": "" if expires_at_us is None else expires_at_us,
            "rpm": rpm, "tpm": tpm, "rpm_tat": 0, "tpm_tat": 0,
            "budget_limit": "" if budget_limit is None else budget_limit,
            "budget_duration": budget_duration, "spent": 0,
            "resets_at": now + budget_duration * 1_000_000, "total_spent": 0,
        }
        await self._call(self.client.hset(Names.key(account_id, key_id), mapping=record))
        await self._call(self.client.set(Names.key_index(key_id), account_id))
        # The secret mapping goes last: a key is usable only once its record is complete.
        await self._call(self.client.set(Names.secret(secret_hash), f"{account_id}:{key_id}"))
        return await self.get_key(key_id)

    async def key_account(self, key_id: str) -> str:
        account_id = await self._call(self.client.get(Names.key_index(key_id)))
        if account_id is None:
            raise NotFound(f"no key with id {key_id}")
        return _text(account_id)

    async def get_key(self, key_id: str) -> KeyRecord:
        account_id = await self.key_account(key_id)
        raw = await self._call(self.client.hgetall(Names.key(account_id, key_id)))
        if not raw:
            raise NotFound(f"no key with id {key_id}")
        return _key_record(raw)

    async def list_keys(self, account_id: str) -> list[KeyRecord]:
        ids = await self._call(self.client.smembers(Names.account_keys(account_id)))
        records = []
        for key_id in ids:
            raw = await self._call(self.client.hgetall(Names.key(account_id, _text(key_id))))
            if raw:  # a record deleted by hand is skipped, not fatal to the listing
                records.append(_key_record(raw))
        return sorted(records, key=lambda r: (r.created_at_us, r.id))

    async def set_active(self, key_id: str, active: bool) -> KeyRecord:
        account_id = await self.key_account(key_id)
        await self._call(self.client.hset(Names.key(account_id, key_id), "active",
                                          "1" if active else "0"))
        return await self.get_key(key_id)

    # -- management -----------------------------------------------------------------------
    # Everything below is scoped to one account: a key of another account reads as absent.

    async def create_mgmt_key(self, account_id: str, secret_hash: str) -> MgmtKey:
        await self.get_account(account_id)
        now = await self.now_us()
        mgmt_id = str(uuid.uuid4())
        await self._call(self.client.hset(Names.mgmt_key(account_id, mgmt_id), mapping={
            "id": mgmt_id, "account_id": account_id, "hash": secret_hash, "created_at": now}))
        await self._call(self.client.sadd(Names.account_mgmt_keys(account_id), mgmt_id))
        await self._call(self.client.set(Names.mgmt_index(mgmt_id), account_id))
        # Last, as for consumption keys: usable only once the record is complete.
        await self._call(self.client.set(Names.mgmt_secret(secret_hash),
                                         f"{account_id}:{mgmt_id}"))
        return MgmtKey(mgmt_id, account_id, now)

    async def list_mgmt_keys(self, account_id: str) -> list[MgmtKey]:
        ids = await self._call(self.client.smembers(Names.account_mgmt_keys(account_id)))
        keys = []
        for mgmt_id in ids:
            raw = await self._call(self.client.hgetall(Names.mgmt_key(account_id,
                                                                      _text(mgmt_id))))
            if raw:
                f = {_text(k): _text(v) for k, v in raw.items()}
                keys.append(MgmtKey(f["id"], f["account_id"], int(f["created_at"])))
        return sorted(keys, key=lambda k: (k.created_at_us, k.id))

    async def revoke_mgmt_key(self, mgmt_id: str) -> MgmtKey:
        account_id = await self._call(self.client.get(Names.mgmt_index(mgmt_id)))
        if account_id is None:
            raise NotFound(f"no management key with id {mgmt_id}")
        account = _text(account_id)
        record = Names.mgmt_key(account, mgmt_id)
        raw = await self._call(self.client.hgetall(record))
        if not raw:
            raise NotFound(f"no management key with id {mgmt_id}")
        f = {_text(k): _text(v) for k, v in raw.items()}
        # The secret mapping goes first: the key stops working before anything else changes.
        await self._call(self.client.delete(Names.mgmt_secret(f["hash"])))
        await self._call(self.client.delete(record))
        await self._call(self.client.srem(Names.account_mgmt_keys(account), mgmt_id))
        await self._call(self.client.delete(Names.mgmt_index(mgmt_id)))
        return MgmtKey(mgmt_id, account, int(f["created_at"]))

    async def mgmt_lookup(self, secret_hash: str) -> MgmtRef | None:
        value = await self._call(self.client.get(Names.mgmt_secret(secret_hash)))
        if value is None:
            return None
        account_id, _, mgmt_id = _text(value).partition(":")
        return MgmtRef(account_id, mgmt_id)

    async def account_exists(self, account_id: str) -> bool:
        return bool(await self._call(self.client.exists(Names.account(account_id))))

    async def mgmt_throttle(self, account_id: str, principal: str, capacity: int,
                            period_seconds: int) -> Throttle:
        keys = [Names.mgmt_bucket(account_id, principal)]
        raw = await self._call(self._mgmt_limit(keys=keys, args=[capacity, period_seconds]))
        n = [int(v) for v in raw]
        return Throttle(n[0] == 1, n[1], n[2], n[3], n[4])

    async def usage_snapshot(self, account_id: str, key_id: str | None = None) -> UsageSnapshot:
        """Key records and usage counters of an account (or one key of it) at Redis time.

        Two round trips whatever the number of keys: the key ids with Redis TIME, then one
        pipeline of HGETALLs over the records and the counter hashes the periods need.
        """
        index = await self._call(self._account_index(
            keys=[Names.account_keys(account_id)], args=[key_id or ""]))
        now_us = int(index[0]) * 1_000_000 + int(index[1])
        key_ids = sorted(_text(i) for i in index[2:])
        buckets = buckets_needed(now_us // 1_000_000)
        per_key = 1 + len(buckets.hours) + len(buckets.days)
        async with self.client.pipeline(transaction=False) as pipe:
            for kid in key_ids:
                pipe.hgetall(Names.key(account_id, kid))
                for hour in buckets.hours:
                    pipe.hgetall(Names.usage_minutes(account_id, kid, hour))
                for day in buckets.days:
                    pipe.hgetall(Names.usage_hours(account_id, kid, day))
            results = await self._call(pipe.execute()) if key_ids else []
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
        raw = await self._call(self.client.hgetall(Names.key(account_id, key_id)))
        return _key_record(raw) if raw else None

    async def update_key(self, account_id: str, key_id: str, *, name: str | None = None,
                         active: bool | None = None) -> KeyRecord | None:
        record = Names.key(account_id, key_id)
        if not await self._call(self.client.exists(record)):
            return None
        fields: dict[str, str] = {}
        if name is not None:
            fields["name"] = name
        if active is not None:
            fields["active"] = "1" if active else "0"
        if fields:
            await self._call(self.client.hset(record, mapping=fields))
        return await self.account_key(account_id, key_id)

    async def rotate_key(self, account_id: str, key_id: str,
                         secret_hash: str) -> KeyRecord | None:
        old = await self._call(self._rotate(keys=[Names.key(account_id, key_id)],
                                            args=[secret_hash]))
        if old is None:
            return None
        await self._call(self.client.set(Names.secret(secret_hash), f"{account_id}:{key_id}"))
        await self._call(self.client.delete(Names.secret(_text(old))))
        return await self.account_key(account_id, key_id)


def _counters(raw: dict[Any, Any]) -> dict[str, int]:
    return {_text(k): int(v) for k, v in raw.items()}

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def _no_retries() -> Any:
    # Never resend a script on our own: a resent admit.lua after a read timeout could apply
    # twice. Failures surface as StoreUnavailable; settlements are retried by request id.
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 0)


def connect(url: str, timeout_seconds: float = 0.25) -> Store:
    """A Store over a real Redis at `url`.

    redis://, rediss://, unix:// select a single server (password and db in the URL as
    usual); redis+cluster://host:port[,host:port...] and rediss+cluster://... select a
    Redis Cluster discovered from those startup nodes. TLS options ride in the query string
    (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname).
    """
    options: dict[str, Any] = {"socket_timeout": timeout_seconds,
                               "socket_connect_timeout": timeout_seconds,
                               "retry": _no_retries()}
    scheme = url.partition("://")[0].lower()
    _check_tls_files(url)
    try:
        if scheme in _CLUSTER_SCHEMES:
            return Store(_cluster_client(url, scheme, {**options, "max_connections": 256}))
        from redis.asyncio import BlockingConnectionPool, Redis

        # A burst beyond the pool waits briefly for a connection instead of failing.
        pool = BlockingConnectionPool.from_url(
            url, max_connections=512, timeout=max(1.0, timeout_seconds * 4), **options)
        hot = Multiplexed(url, timeout_seconds) if scheme in ("redis", "unix") else None
        return Store(Redis.from_pool(pool), hot)
    except (ValueError, RedisError) as exc:
        raise ConfigError(f"invalid Redis URL: {exc}") from None


def _check_tls_files(url: str) -> None:
    """A mistyped certificate path is named at startup, not reported as unreachable Redis."""
    from urllib.parse import parse_qsl

    for name, value in parse_qsl(url.partition("?")[2]):
        if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and \
                not os.path.isfile(value):
            raise ConfigError(f"invalid Redis URL: {name} file {value!r} does not exist")


def _cluster_client(url: str, scheme: str, options: dict[str, Any]) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import parse_url

    # The query goes first: its values (certificate paths) may contain slashes.
    rest, _, query = url.partition("://")[2].partition("?")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    userinfo, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {item.strip()!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    first = f"{_CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{hosts.split(',')[0].strip()}"
    kwargs = {**options, **parse_url(first + ("?" + query if query else ""))}
    for name in ("host", "port", "db", "path"):
        kwargs.pop(name, None)
    kwargs.pop("connection_class", None)
    if scheme == "rediss+cluster":
        kwargs["ssl"] = True
    startup = [ClusterNode(host, port) for host, port in nodes]
    return RedisCluster(startup_nodes=startup, **kwargs)


_MAX_CACHED_NAMES = 100_000


class _Unsent(Exception):
    """The command was never written: Redis certainly did not run it."""


def _hot_error(exc: Exception) -> StoreUnavailable:
    """The store's error for a failure on the hot connection."""
    if isinstance(exc, _Unsent):
        return StoreUnavailable(str(exc))
    if isinstance(exc, hiredis.ReplyError):
        return _reply_error(str(exc))
    return StoreAmbiguous(type(exc).__name__)  # written, then no answer: it may have run


class _RespProtocol(asyncio.Protocol):
    """RESP over one connection: commands are written in order and answered in order.

    Each command gets a deadline; one timer watches the oldest (replies come in order, so
    the oldest is always the first overdue) instead of a timer per command.
    """

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outbox: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None

    def request(self, command: bytes) -> asyncio.Future[Any]:
        """Queues `command`, to be written as soon as the running callback yields to the
        loop, with every other command queued meanwhile; its reply (or error) completes
        the returned future."""
        if self.transport is None or self.lost:
            raise _Unsent("not connected")
        loop = self.loop
        waiter = loop.create_future()
        self.waiters.append(waiter)
        deadline = loop.time() + self.timeout
        self.deadlines.append(deadline)
        # Commands issued in one loop iteration leave in one write (one system call).
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(command)
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._check_deadline)
        return waiter

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        transport = self.transport
        # A closing transport refuses writes (uvloop raises); its waiters fail on connection_lost.
        if outbox and transport is not None and not self.lost and not transport.is_closing():
            transport.write(b"".join(outbox))

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self.deadlines:
            return
        if self.deadlines[0] > self.loop.time():
            self._watchdog = self.loop.call_at(self.deadlines[0], self._check_deadline)
            return
        # No reply in time: presume the connection dead (a silent partition never resets
        # it), fail everything that waits on it, and let the next call reconnect.
        self._fail_all(TimeoutError("Redis did not answer in time"))
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: Exception) -> None:
        self.lost = True
        self.deadlines.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            self.deadlines.popleft()
            if waiter.done():
                continue  # its caller was cancelled; the order of replies is kept all the same
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionResetError("connection to Redis lost"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Multiplexed:
    """One pipelined connection for the hot path (admit, settle, key lookup).

    Every call is written at once and answered in order, so all concurrent requests of a
    process share one socket: no connection pool and no per-command client machinery on the
    hot path, and Redis reads many commands per system call. After a failure the next call
    reconnects. Used for redis:// and unix:// URLs; TLS and Cluster go through redis-py.
    """

    def __init__(self, url: str, timeout_seconds: float) -> None:
        from redis.asyncio.connection import parse_url

        options = parse_url(url)
        self._path: str | None = options.get("path")
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self._db = int(options.get("db", 0))
        self._timeout = timeout_seconds
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._failed_at = 0.0
        self._closed = False

    def _new_protocol(self) -> _RespProtocol:
        return _RespProtocol(self._timeout)

    async def _connect(self) -> _RespProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        asked = time.monotonic()
        async with self._connecting:
            current = self._protocol
            if current is not None and not current.lost:
                return current
            if self._failed_at >= asked:  # an attempt made while we waited just failed
                raise _Unsent("cannot connect to Redis")
            if self._closed:  # a late retry must not open a connection nobody will close
                raise _Unsent("the store is closed")
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout):
                    if self._path:
                        _, protocol = await loop.create_unix_connection(self._new_protocol,
                                                                        self._path)
                    else:
                        transport, protocol = await loop.create_connection(
                            self._new_protocol, self._host, self._port)
                        sock = transport.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    self._protocol = protocol
                    if self._password:
                        auth = ((self._username, self._password) if self._username
                                else (self._password,))
                        await protocol.request(_pack(("AUTH", *auth)))
                    if self._db:
                        await protocol.request(_pack(("SELECT", self._db)))
            except (OSError, TimeoutError, hiredis.ReplyError) as exc:
                self._failed_at = time.monotonic()
                self._drop()
                raise _Unsent(f"cannot connect to Redis: {type(exc).__name__}") from exc
            return protocol

    def connected(self) -> _RespProtocol | None:
        protocol = self._protocol
        return None if protocol is None or protocol.lost else protocol

    async def call(self, *command: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            protocol = await self._connect()
        return await protocol.request(_pack(command))

    def _drop(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._protocol = None

    async def close(self) -> None:
        self._closed = True
        self._drop()


def _pack(command: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(command)
    return packed
