"""The operator API, /admin/*: what the CLI does, over HTTP, for the operator alone.

It answers only with the operator's bearer token (GATEWAY_ADMIN_TOKEN or admin_token_file);
without one configured the whole /admin tree is 404, never forwarded upstream. Bodies and
answers are the CLI's --json documents. Credits are minted here and in the CLI only.
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs

import orjson

from gateway.config.routes import route_path
from gateway.config.settings import Settings
from gateway.config.units import usd_to_micro_signed
from gateway.core.keys import (
    CONSUMPTION_PREFIX,
    MANAGEMENT_PREFIX,
    bearer_token,
    hash_secret,
    looks_like,
    new_management_secret,
)
from gateway.errors import (
    ConfigError,
    LimitReached,
    NotFound,
    Rejected,
    StoreUnavailable,
    send_json,
    send_rejection,
)
from gateway.http.admin import (
    account_json,
    create_key,
    credit_json,
    key_json,
    mgmt_json,
)
from gateway.http.auth import header
from gateway.http.key_changes import renew_key, rotate_key, update_key
from gateway.http.management_body import (
    MAX_REASON_LENGTH,
    allow,
    bad_request,
    checked_duration,
    json_object,
    only_fields,
    optional_str,
    uuid_text,
)
from gateway.http.operator_body import (
    ACCOUNT_FIELDS,
    account_create,
    account_limits_of,
    admin_key_spec,
    change_spec,
)
from gateway.store import Store
from gateway.types import Receive, Scope, Send

CREDIT_HISTORY = 50


def _not_found(what: str = "No such endpoint.") -> Rejected:
    return Rejected(404, "not_found", what)


class Operator:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        token = settings.admin_token
        self.token = None if token is None else token.encode()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self.token is None:
                raise _not_found()
            self._authenticate(scope)
            await self._dispatch(scope, receive, send)
        except Rejected as rejected:
            await send_rejection(send, rejected)
        except NotFound as exc:
            await send_rejection(send, _not_found(str(exc)))
        except LimitReached as exc:
            await send_rejection(send, Rejected(403, "key_limit_reached", str(exc),
                                                "permission_error"))
        except ConfigError as exc:
            deleted = "was deleted" in str(exc)
            await send_rejection(send, Rejected(409, "key_deleted", str(exc)) if deleted
                                 else bad_request(str(exc)))
        except StoreUnavailable:
            await send_rejection(send, Rejected(
                503, "store_unavailable", "The gateway's store is temporarily unavailable.",
                "api_error"))

    def _authenticate(self, scope: Scope) -> None:
        assert self.token is not None
        token = bearer_token(header(scope["headers"], b"authorization"))
        if token is None or not hmac.compare_digest(token.encode(), self.token):
            raise Rejected(401, "invalid_admin_token",
                           "Send the operator's token as 'Authorization: Bearer ...'.")

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        parts = route_path(scope)[len("/admin/"):].split("/")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        head, rest = parts[0], parts[1:]
        if head == "accounts" and not rest:
            allow(method, "GET, POST")
            if method == "GET":
                await self._list_accounts(send, query.get("name", [None])[0])
            else:
                await self._create_account(send, await json_object(scope, receive))
        elif head == "accounts" and len(rest) == 1:
            allow(method, "GET, PATCH")
            account_id = uuid_text(rest[0], "account id")
            if method == "GET":
                await self._show_account(send, account_id)
            else:
                await self._account_limits(send, account_id, await json_object(scope, receive))
        elif head == "accounts" and len(rest) == 2 and rest[1] == "credits":
            allow(method, "POST")
            await self._credits(send, uuid_text(rest[0], "account id"),
                                await json_object(scope, receive))
        elif head == "keys" and rest == ["lookup"]:
            allow(method, "POST")
            await self._lookup(send, await json_object(scope, receive))
        elif head == "keys" and not rest:
            allow(method, "GET, POST")
            if method == "GET":
                await self._list_keys(send, query.get("account", [None])[0])
            else:
                await self._create_key(send, await json_object(scope, receive))
        elif head == "keys" and len(rest) == 1:
            allow(method, "GET, PATCH, DELETE")
            key_id = uuid_text(rest[0], "key id")
            if method == "GET":
                await self._key(send, 200, await self.store.get_key(key_id))
            elif method == "PATCH":
                await self._update_key(send, key_id, await json_object(scope, receive))
            else:
                await self._key(send, 200, await self.store.delete_key(key_id))
        elif head == "keys" and len(rest) == 2 and rest[1] in ("renew", "rotate"):
            allow(method, "POST")
            key_id = uuid_text(rest[0], "key id")
            if rest[1] == "rotate":
                record, secret = await rotate_key(self.store, key_id)
                await self._key(send, 200, record, secret)
            else:
                body = await _optional_object(scope, receive)
                only_fields(body, ("for",))
                period = checked_duration(body, "for")
                await self._key(send, 200, await renew_key(self.store, key_id, period))
        elif head == "mgmt-keys" and not rest:
            allow(method, "POST")
            await self._create_mgmt_key(send, await json_object(scope, receive))
        elif head == "mgmt-keys" and len(rest) == 1:
            allow(method, "DELETE")
            key = await self.store.revoke_mgmt_key(uuid_text(rest[0], "management key id"))
            await send_json(send, 200, orjson.dumps({**mgmt_json(key), "revoked": True}))
        else:
            raise _not_found()

    # -- accounts -------------------------------------------------------------------------

    async def _account_limits(self, send: Send, account_id: str,
                              body: dict[str, Any]) -> None:
        limits = account_limits_of(body, ACCOUNT_FIELDS)
        if not limits:
            raise bad_request("give at least one of rpm, tpm, max_concurrent, budget_windows")
        account = await self.store.set_account_limits(account_id, limits)
        await send_json(send, 200, orjson.dumps(account_json(account)))

    async def _list_accounts(self, send: Send, name: str | None) -> None:
        if name is not None:
            found = await self.store.account_by_name(name)
            accounts = [] if found is None else [found]
        else:
            accounts = await self.store.list_accounts()
        await send_json(send, 200, orjson.dumps([account_json(a) for a in accounts]))

    async def _create_account(self, send: Send, body: dict[str, Any]) -> None:
        name, limits = account_create(body)  # all checked before the account is made
        account = await self.store.create_account(name)
        if limits:
            account = await self.store.set_account_limits(account.id, limits)
        await send_json(send, 201, orjson.dumps(account_json(account)))

    async def _show_account(self, send: Send, account_id: str) -> None:
        doc = account_json(await self.store.get_account(account_id))
        doc["credit_history"] = [credit_json(e) for e in
                                 await self.store.credit_log(account_id, CREDIT_HISTORY)]
        await send_json(send, 200, orjson.dumps(doc))

    async def _credits(self, send: Send, account_id: str, body: dict[str, Any]) -> None:
        only_fields(body, ("usd", "reason"))
        usd = body.get("usd")
        if isinstance(usd, bool) or not isinstance(usd, int | float | str):
            raise bad_request("usd must be a USD amount (number or string), like 25 or -2.5")
        reason = optional_str(body, "reason")
        if reason is None or not reason.strip():
            raise bad_request("reason is required: it is kept with the account's history")
        if len(reason) > MAX_REASON_LENGTH:
            raise bad_request(f"reason must be at most {MAX_REASON_LENGTH} characters")
        micro = usd_to_micro_signed(usd, "usd")
        if micro == 0:
            raise bad_request("usd must not be zero")
        account = await self.store.add_credits(account_id, micro, reason.strip(), "admin-api")
        await send_json(send, 200, orjson.dumps(account_json(account)))

    # -- keys -----------------------------------------------------------------------------

    async def _key(self, send: Send, status: int, record: Any, secret: str | None = None) -> None:
        await send_json(send, status, orjson.dumps(key_json(record, self.settings, secret)))

    async def _list_keys(self, send: Send, account: str | None) -> None:
        if account is None:
            raise bad_request("give ?account=ID")
        account_id = uuid_text(account, "account")
        await self.store.get_account(account_id)
        records = await self.store.list_keys(account_id)
        await send_json(send, 200, orjson.dumps([key_json(r, self.settings) for r in records]))

    async def _create_key(self, send: Send, body: dict[str, Any]) -> None:
        account_id, spec = admin_key_spec(body)
        record, secret = await create_key(self.store, self.settings, account_id, spec)
        await self._key(send, 201, record, secret)

    async def _update_key(self, send: Send, key_id: str, body: dict[str, Any]) -> None:
        spec = change_spec(body)
        await self._key(send, 200, await update_key(self.store, self.settings, key_id, spec))

    async def _lookup(self, send: Send, body: dict[str, Any]) -> None:
        """The record of the key a secret belongs to (a customer pasted it into a ticket);
        the answer never holds the secret."""
        only_fields(body, ("secret",))
        secret = body.get("secret")
        if not isinstance(secret, str):
            raise bad_request("secret is required")
        secret = secret.strip()
        if looks_like(secret, MANAGEMENT_PREFIX):
            ref = await self.store.mgmt_lookup(hash_secret(secret))
            if ref is None:
                raise _not_found("No key has this secret (revoked, rotated or never issued).")
            key = next(k for k in await self.store.list_mgmt_keys(ref.account_id)
                       if k.id == ref.mgmt_id)
            await send_json(send, 200, orjson.dumps({**mgmt_json(key), "type": "management"}))
            return
        found = (await self.store.lookup(hash_secret(secret))
                 if looks_like(secret, CONSUMPTION_PREFIX) else None)
        if found is None:
            raise _not_found("No key has this secret (deleted, rotated or never issued).")
        await self._key(send, 200, await self.store.get_key(found.key_id))

    async def _create_mgmt_key(self, send: Send, body: dict[str, Any]) -> None:
        only_fields(body, ("account_id",))
        account = body.get("account_id")
        if not isinstance(account, str):
            raise bad_request("account_id is required")
        secret = new_management_secret()
        key = await self.store.create_mgmt_key(uuid_text(account, "account_id"),
                                               hash_secret(secret))
        await send_json(send, 201, orjson.dumps({**mgmt_json(key), "key": secret}))


async def _optional_object(scope: Scope, receive: Receive) -> dict[str, Any]:
    """A body that may be empty (POST .../renew with no options)."""
    if header(scope["headers"], b"content-length") in (None, b"0") and \
            header(scope["headers"], b"transfer-encoding") is None:
        return {}
    return await json_object(scope, receive)
