"""The operator API's part of the OpenAPI document (gateway/http/operator.py)."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_ADMIN: list[Any] = [{"adminToken": []}]
_USD_AMOUNT: Schema = {"type": ["number", "string"]}
_DURATION: Schema = {"type": ["string", "null"], "pattern": r"^\s*\d+\s*[smhd]\s*$"}
_TIME: Schema = {"type": "string"}
# An account's own limits, shared by all its keys; null: none.
_ACCOUNT_LIMITS: dict[str, Schema] = {
    "rpm": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000_000},
    "tpm": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000_000},
    "max_concurrent": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
    "budget_windows": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 4,
                       "description": "USD/DURATION[/calendar] each, e.g. 100/30d; shared "
                                      "by all the account's keys; null or []: none"}}
# POST /api/keys's fields (KeyCreate), which POST /admin/keys takes too.
_KEY_CREATE = ("name", "plan", "credit", "rpm", "tpm", "budget", "budget_duration",
               "expires_at", "expires_in")
_MODELS: Schema = {"type": ["array", "null"], "items": {"type": "string", "minLength": 1},
                   "minItems": 1, "maxItems": 256}
_CONCURRENCY: Schema = {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000}
_WINDOWS: Schema = {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 4}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], required: list[str]) -> Schema:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


SCHEMAS: dict[str, Schema] = {
    "Account": _object({"id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
                        "credits": {"type": "number"},
                        "limits": _object(_ACCOUNT_LIMITS, list(_ACCOUNT_LIMITS))},
                       ["id", "name", "credits", "limits"]),
    "AccountLimits": _object(_ACCOUNT_LIMITS, []),
    "AccountWithHistory": _object({
        "id": {"type": "string", "format": "uuid"}, "name": {"type": "string"},
        "credits": {"type": "number"}, "limits": _object(_ACCOUNT_LIMITS, list(_ACCOUNT_LIMITS)),
        "credit_history": {"type": "array", "items": _object({
            "at": _TIME, "usd": {"type": "number"}, "balance": {"type": "number"},
            "by": {"type": "string", "enum": ["cli", "admin-api", "dashboard"]},
            "reason": {"type": "string"}}, ["at", "usd", "balance", "by", "reason"])},
    }, ["id", "name", "credits", "limits", "credit_history"]),
    "AccountCreate": _object({"name": {"type": "string", "minLength": 1, "maxLength": 200},
                              **_ACCOUNT_LIMITS}, ["name"]),
    "CreditChange": _object({
        "usd": {**_USD_AMOUNT, "description": "positive to add, negative to take away "
                                              "(never below a zero balance)"},
        "reason": {"type": "string", "minLength": 1, "maxLength": 500}}, ["usd", "reason"]),
    "AdminKeyCreate": _object({
        "account_id": {"type": "string", "format": "uuid"},
        **{field: _ref(f"KeyCreate/properties/{field}") for field in _KEY_CREATE},
        "models": {**_MODELS, "description": "names or 'prefix*'; ['*'] any; absent or "
                                             "null: follow the plan's"},
        "max_concurrent": {**_CONCURRENCY, "description": "requests in flight at once; "
                                                         "absent or null: the plan's"},
        "budget_windows": {**_WINDOWS, "description": "USD/DURATION[/calendar] each, e.g. "
                                                      "5/1d, 100/30d/calendar, each duration "
                                                      "once; absent or null: follow the "
                                                      "plan's budgets; []: none"},
    }, ["account_id", "name"]),
    "AdminKeyPatch": _object({
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "plan": {"type": "string", "description": "plan keys only"},
        "rpm": {"type": ["integer", "null"], "minimum": 1,
                "description": "the key's own limit; null: follow the plan's"},
        "tpm": {"type": ["integer", "null"], "minimum": 1},
        "budget": {"type": ["number", "string", "null"], "description": "null: no limit"},
        "budget_duration": {**_DURATION, "description": "restarts the period now"},
        "expires_at": {"type": "string", "description": "ISO 8601, in the future"},
        "expires_in": _DURATION,
        "is_active": {"type": "boolean"},
        "models": {**_MODELS,
                   "description": "names or 'prefix*'; ['*'] any; null: follow the plan's"},
        "max_concurrent": {**_CONCURRENCY,
                           "description": "requests in flight at once; null: the plan's"},
        "budget_windows": {**_WINDOWS, "description": "USD/DURATION[/calendar] each, "
                                                      "replacing the key's own; null: follow "
                                                      "the plan's budgets; []: none"},
    }, []),
    "Renew": _object({"for": {**_DURATION, "description": "default 30d"}}, []),
    "Lookup": _object({"secret": {"type": "string"}}, ["secret"]),
    "MgmtKey": _object({"id": {"type": "string", "format": "uuid"},
                        "account_id": {"type": "string"}, "created_at": _TIME,
                        "type": {"type": "string", "enum": ["management"]},
                        "revoked": {"type": "boolean"}, "key": {"type": "string"}},
                       ["id", "account_id", "created_at"]),
    "MgmtKeyCreate": _object({"account_id": {"type": "string", "format": "uuid"}},
                             ["account_id"]),
}

_REASONS = {400: "Invalid request (the message names the field)",
            401: "Missing or wrong operator token",
            403: "The account holds its maximum of keys",
            404: "Not found; the whole /admin tree is 404 when no admin token is configured",
            405: "Method not allowed", 409: "The key was deleted", 413: "Body too large",
            503: "Store temporarily unavailable"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, schema: Schema, *errors: int, body: Schema | None = None,
        parameters: list[Any] | None = None, status: str = "200") -> Schema:
    responses = {status: _json(schema, summary)}
    for code in (401, 404, 405, 503, *errors):
        responses[str(code)] = _json(_ref("Error"), _REASONS[code])
    op: Schema = {"summary": summary, "security": _ADMIN, "responses": responses,
                  "tags": ["operator"]}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": body}}}
    if parameters:
        op["parameters"] = parameters
    return op


def _optional_body(op: Schema) -> Schema:
    op["requestBody"]["required"] = False
    return op


def _id(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "format": "uuid"}}


_ACCOUNTS = {"type": "array", "items": _ref("Account")}
_KEYS = {"type": "array", "items": _ref("Key")}


def paths() -> dict[str, Any]:
    key, account = [_id("keyId")], [_id("accountId")]
    return {
        "/admin/accounts": {
            "get": _op("Accounts (?name= for one by its name)", _ACCOUNTS, 400,
                       parameters=[{"name": "name", "in": "query", "required": False,
                                    "schema": {"type": "string"}}]),
            "post": _op("Create an account", _ref("Account"), 400, 413,
                        body=_ref("AccountCreate"), status="201")},
        "/admin/accounts/{accountId}": {"get": _op(
            "An account with its recent credit adjustments", _ref("AccountWithHistory"),
            400, parameters=account), "patch": _op(
            "Set (an integer) or remove (null) the account's own limits, shared by all its "
            "keys", _ref("Account"), 400, 413, body=_ref("AccountLimits"),
            parameters=account)},
        "/admin/accounts/{accountId}/credits": {"post": _op(
            "Add or take away prepaid credits, with the reason recorded",
            _ref("Account"), 400, 413, body=_ref("CreditChange"), parameters=account)},
        "/admin/keys": {
            "get": _op("An account's keys (?account=ID)", _KEYS, 400,
                       parameters=[{"name": "account", "in": "query", "required": True,
                                    "schema": {"type": "string", "format": "uuid"}}]),
            "post": _op("Create a key on any plan, or a credit key; the secret is shown once",
                        _ref("KeyWithSecret"), 400, 403, 413, body=_ref("AdminKeyCreate"),
                        status="201")},
        "/admin/keys/lookup": {"post": _op(
            "The key a secret belongs to (never the secret itself)",
            {"oneOf": [_ref("Key"), _ref("MgmtKey")]}, 400, 413, body=_ref("Lookup"))},
        "/admin/keys/{keyId}": {
            "get": _op("One key", _ref("Key"), 400, parameters=key),
            "patch": _op("Change a key's name, plan, limits, budget, expiry or state; acts at "
                         "once on every replica", _ref("Key"), 400, 409, 413,
                         body=_ref("AdminKeyPatch"), parameters=key),
            "delete": _op("Delete a key: its secret stops working at once, its history stays",
                          _ref("Key"), 400, parameters=key)},
        "/admin/keys/{keyId}/renew": {"post": _optional_body(_op(
            "Extend a subscription from its expiry or now, whichever is later",
            _ref("Key"), 400, 409, 413, body=_ref("Renew"), parameters=key))},
        "/admin/keys/{keyId}/rotate": {"post": _op(
            "A new secret (shown once); the old one stops working at once",
            _ref("KeyWithSecret"), 400, 409, parameters=key)},
        "/admin/mgmt-keys": {"post": _op(
            "A management key (mk_) for an account; the secret is shown once",
            _ref("MgmtKey"), 400, 413, body=_ref("MgmtKeyCreate"), status="201")},
        "/admin/mgmt-keys/{mgmtKeyId}": {"delete": _op(
            "Revoke a management key", _ref("MgmtKey"), 400,
            parameters=[_id("mgmtKeyId")])},
    }
