"""The OpenAPI 3.1 document of every endpoint the gateway itself answers (GET /openapi.json).

tests/test_openapi.py validates real responses against it, so keep the two in step.
"""

from __future__ import annotations

from typing import Any

from gateway.http import openapi_admin

ISO_MS = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# Allowed models: exact names or "prefix*"; empty: any model.
_MODELS: Schema = {"type": "array", "items": {"type": "string"}}


def _object(properties: dict[str, Schema], required: list[str] | None = None,
            closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": properties,
                      "required": list(properties) if required is None else required}
    if closed:
        schema["additionalProperties"] = False
    return schema


_TIME: Schema = {"type": "string", "pattern": ISO_MS}
_NULLABLE_TIME: Schema = {"type": ["string", "null"], "pattern": ISO_MS}
_COUNT: Schema = {"type": "integer", "minimum": 0}
_NULLABLE_COUNT: Schema = {"type": ["integer", "null"], "minimum": 0}
_USD: Schema = {"type": "number"}
_KEY_TYPE: Schema = {"type": "string", "enum": ["subscription", "credit"]}

_SCHEMAS: dict[str, Schema] = {
    "Error": _object({"error": _object({
        "message": {"type": "string"},
        "type": {"type": "string"},
        "code": {"type": ["string", "null"]},
    }, closed=False)}, closed=False),
    "UsageWindow": _object({"requests": _COUNT, "tokens": _COUNT, "promptTokens": _COUNT,
                            "completionTokens": _COUNT}),
    "UsagePeriods": _object({name: _ref("UsageWindow")
                             for name in ("last1h", "last24h", "last7d", "last30d")}),
    "KeyUsageRow": {
        **_object({
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "type": _KEY_TYPE,
            "plan": {"type": "string", "description": "plan slug, or \"credits\""},
            "isActive": {"type": "boolean"},
            "usage": _ref("UsagePeriods"),
            "subscription": _object({"status": {"type": "string",
                                                "enum": ["active", "expired"]},
                                     "expiresAt": _NULLABLE_TIME}),
            "createdAt": _TIME,
            "total_spent": {**_USD, "minimum": 0,
                            "description": "the key's lifetime spend in USD (beyond the "
                                           "seed's fields)"},
        }, required=["id", "name", "type", "plan", "isActive", "usage", "createdAt",
                     "total_spent"]),
        # `subscription` is present exactly for subscription keys.
        "if": {"properties": {"type": {"const": "subscription"}}},
        "then": {"required": ["subscription"]},
        "else": {"not": {"required": ["subscription"]},
                 "properties": {"plan": {"const": "credits"}}},
    },
    "UsageList": _object({"success": {"const": True},
                          "data": {"type": "array", "items": _ref("KeyUsageRow")}}),
    "KeyUsage": _object({
        "budget": _object({"spent": _USD, "limit": {"type": ["number", "null"]},
                           "duration": {"type": "string"}, "resets_at": _TIME}),
        "rate_limits": _object({"rpm": _COUNT, "tpm": _COUNT}),
        "plan": _object({"slug": {"type": ["string", "null"]},
                         "status": {"type": "string", "enum": ["active", "expired"]},
                         "expires_at": _NULLABLE_TIME}),
        "credits": _object({"balance": _USD}),
        "key": _object({"name": {"type": "string"}, "type": _KEY_TYPE, "created_at": _TIME}),
        "budgets": {"type": "array", "description": "every budget window of the key: the "
                    "primary one (`budget`) first, then its own or its plan's, then its "
                    "account's", "items": _object({
                        "scope": {"type": "string", "enum": ["key", "account"]},
                        "primary": {"type": "boolean"},
                        "limit": {"type": ["number", "null"]},
                        "duration": {"type": "string"},
                        "reset": {"type": "string", "enum": ["rolling", "calendar"]},
                        "spent": _USD, "resets_at": _NULLABLE_TIME})},
    }),
    "SpendLine": _object({
        "group": {"type": "string",
                  "description": "a key id, a model, or a UTC day (YYYY-MM-DD) by group_by"},
        "requests": _COUNT, "promptTokens": _COUNT, "completionTokens": _COUNT,
        "costUsd": {**_USD, "minimum": 0}}),
    "SpendList": _object({
        "success": {"const": True},
        "data": {"type": "array", "items": _ref("SpendLine")},
        "totalCostUsd": {**_USD, "minimum": 0,
                         "description": "the lines' costs summed in micro-USD, then "
                                        "converted"}}),
    "Plan": _object({"slug": {"type": "string"}, "name": {"type": "string"},
                     "priceUsdc": {"type": "string"},
                     "rateLimits": _object({"tpm_limit": _COUNT, "rpm_limit": _COUNT}),
                     "models": _MODELS}),
    "Key": _object({
        "id": {"type": "string", "format": "uuid"},
        "key": {"type": "string", "pattern": "^sk_live_[0-9A-Za-z]{32,}$",
                "description": "the secret; only in the create and rotate responses"},
        "name": {"type": "string"},
        "type": _KEY_TYPE,
        "account_id": {"type": "string"},
        "plan": {"type": ["string", "null"]},
        "is_active": {"type": "boolean"},
        "rate_limits": _object({"rpm": _COUNT, "tpm": _COUNT}),
        # the key's own limits; null: it follows its plan's
        "models": _MODELS,
        "max_concurrent": _NULLABLE_COUNT,
        # budget windows beyond `budget`, as USD/DURATION[/calendar]
        "budget_windows": {"type": "array", "items": {"type": "string"}},
        "overrides": _object({"rpm": _NULLABLE_COUNT, "tpm": _NULLABLE_COUNT,
                              "models": {"type": ["array", "null"], "items": {"type": "string"}},
                              "max_concurrent": _NULLABLE_COUNT,
                              "budget_windows": {"type": ["array", "null"],
                                                 "items": {"type": "string"}}}),
        "budget": _object({"limit": {"type": ["number", "null"]},
                           "duration": {"type": "string"}, "spent": _USD,
                           "resets_at": _TIME}),
        "total_spent": _USD,
        "expires_at": _NULLABLE_TIME,
        "created_at": _TIME,
        "deleted_at": _NULLABLE_TIME,
    }, required=["id", "name", "type", "account_id", "plan", "is_active", "rate_limits",
                 "models", "max_concurrent", "budget_windows", "overrides", "budget", "total_spent",
                 "expires_at", "created_at", "deleted_at"]),
    "KeyWithSecret": {"allOf": [_ref("Key"), {"required": ["key"]}]},
    "KeyCreate": _object({
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "plan": {"type": ["string", "null"], "description": "a plan slug; or credit: true"},
        "credit": {"type": ["boolean", "null"]},
        "rpm": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000_000},
        "tpm": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000_000},
        "budget": {"type": ["number", "string", "null"],
                   "description": "USD per budget period; absent or null = unlimited"},
        "budget_duration": {"type": ["string", "null"], "pattern": r"^\s*\d+\s*[smhd]\s*$",
                            "description": "default 30d; at most 3650d"},
        "expires_at": {"type": ["string", "null"], "description": "ISO 8601 (plan keys)"},
        "expires_in": {"type": ["string", "null"], "pattern": r"^\s*\d+\s*[smhd]\s*$",
                       "description": "plan keys; default 30d"},
    }, required=["name"]),
    "KeyPatch": _object({"isActive": {"type": "boolean"},
                         "name": {"type": "string", "minLength": 1, "maxLength": 200}},
                        required=[]),
    "Health": _object({"status": {"type": "string"}}),
    "Ready": _object({"status": {"type": "string"}, "redis": {"type": "boolean"},
                      "scripts": {"type": "boolean"}}),
}

_RATE_HEADERS = {
    "x-ratelimit-limit-requests": {"schema": {"type": "string"}},
    "x-ratelimit-remaining-requests": {"schema": {"type": "string"}},
    "x-ratelimit-reset-requests": {"schema": {"type": "string"}},
}
_RETRY_AFTER = {"Retry-After": {"description": "whole seconds (>= 1) until a retry can pass",
                                "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"}}}

_REASONS = {
    400: "Invalid request (the message names the field)",
    401: "Missing, invalid or unrecognized key",
    403: "Key deactivated or subscription expired",
    404: "Not found (for /api/*: no such key in your account)",
    405: "Method not allowed",
    409: "The key was deleted: it cannot change",
    413: "Request body too large",
    429: "Rate limit, budget or credits exhausted",
    502: "Usage data or upstream temporarily unavailable",
    503: "Store or limiter temporarily unavailable (for /api/spend: also the ledger "
         "database, ledger_unavailable)",
}


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {"description": description,
                        "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _errors(*statuses: int) -> dict[str, Schema]:
    out = {}
    for status in statuses:
        headers = {**_RATE_HEADERS, **_RETRY_AFTER} if status == 429 else None
        out[str(status)] = _json(_ref("Error"), _REASONS[status], headers)
    return out


_KEY_ID = {"name": "keyId", "in": "path", "required": True,
           "schema": {"type": "string", "format": "uuid"}}
_SPEND_PARAMETERS = [
    {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "ISO 8601 date (00:00 UTC) or date-time (UTC without an offset); "
                    "default: 30 days before `to`"},
    {"name": "to", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "exclusive, same forms; default: now. At most 366 days after `from`"},
    {"name": "group_by", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["key", "model", "day"], "default": "key"}},
]
_MGMT: list[Any] = [{"managementKey": []}]
_CONSUMER: list[Any] = [{"consumptionKey": []}]


def _op(summary: str, responses: dict[str, Schema], security: list[Any] | None = None,
        body: Schema | None = None, parameters: list[Any] | None = None) -> Schema:
    op: Schema = {"summary": summary, "responses": responses, "security": security or []}
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    if parameters:
        op["parameters"] = parameters
    return op


def _proxied(summary: str) -> Schema:
    upstream = {"description": "The upstream's answer, streamed through (JSON or SSE)",
                "headers": {**_RATE_HEADERS,
                            "x-ratelimit-limit-tokens": {"schema": {"type": "string"}},
                            "x-ratelimit-remaining-tokens": {"schema": {"type": "string"}},
                            "x-ratelimit-reset-tokens": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "string"}}}}
    return {"post": _op(summary, {"200": upstream, **_errors(400, 401, 403, 413, 429, 502, 503)},
                        _CONSUMER, {"type": "object"})}


def document() -> dict[str, Any]:
    usage_headers = dict(_RATE_HEADERS)
    paths: dict[str, Any] = {
        "/v1/usage": {"get": _op(
            "Budget, limits, plan and credits of the calling consumption key",
            {"200": _json(_ref("KeyUsage"), "Usage of the calling key"),
             **_errors(401, 403, 404, 405, 502)}, _CONSUMER)},
        "/api/usage": {"get": _op(
            "All keys of the account with usage over 4 periods (12 requests per 12 hours)",
            {"200": _json(_ref("UsageList"), "One row per key", usage_headers),
             **_errors(401, 405, 429, 502)}, _MGMT)},
        "/api/usage/{keyId}": {"get": _op(
            "One key of the account, same shape as a row of /api/usage (shares its limit)",
            {"200": _json(_ref("KeyUsageRow"), "The key's row", usage_headers),
             **_errors(400, 401, 404, 405, 429, 502)}, _MGMT, parameters=[_KEY_ID])},
        "/api/spend": {"get": _op(
            "The account's spend from the ledger over [from, to), by key, model or UTC day "
            "(shares the /api/usage limit)",
            {"200": _json(_ref("SpendList"), "One line per group, in group order",
                          usage_headers),
             **_errors(400, 401, 405, 429, 503)}, _MGMT, parameters=_SPEND_PARAMETERS)},
        "/api/plans": {"get": _op(
            "Plans with rate limits and prices (no authentication)",
            {"200": _json({"type": "array", "items": _ref("Plan")}, "The plan catalog")})},
        "/api/keys": {
            "get": _op("The account's consumption keys",
                       {"200": _json({"type": "array", "items": _ref("Key")}, "Keys"),
                        **_errors(401, 405, 503)}, _MGMT),
            "post": _op("Create a consumption key; the secret is in this response only",
                        {"201": _json(_ref("KeyWithSecret"), "The new key and its secret"),
                         **_errors(400, 401, 403, 405, 413, 503)}, _MGMT, _ref("KeyCreate")),
        },
        "/api/keys/{keyId}": {
            "get": _op("One consumption key of the account",
                       {"200": _json(_ref("Key"), "The key"),
                        **_errors(400, 401, 404, 405, 503)}, _MGMT, parameters=[_KEY_ID]),
            "patch": _op("Rename, deactivate or reactivate a key",
                         {"200": _json(_ref("Key"), "The updated key"),
                          **_errors(400, 401, 404, 405, 409, 413, 503)}, _MGMT, _ref("KeyPatch"),
                         [_KEY_ID]),
        },
        "/api/keys/{keyId}/rotate": {"post": _op(
            "Replace the key's secret; the old secret stops working at once",
            {"200": _json(_ref("KeyWithSecret"), "The key and its new secret"),
             **_errors(400, 401, 404, 405, 409, 503)}, _MGMT, parameters=[_KEY_ID])},
        "/healthz": {"get": _op("Liveness", {"200": _json(_ref("Health"), "Alive")})},
        "/readyz": {"get": _op("Readiness: Redis reachable", {
            "200": _json(_ref("Ready"), "Ready"),
            "503": _json(_ref("Ready"), "Redis unreachable")})},
        "/metrics": {"get": _op("Prometheus metrics (with the metrics_token; gateway serve "
                                "also serves them on its own --metrics-port)", {"200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401, 404)})},
        "/openapi.json": {"get": _op("This document", {
            "200": _json({"type": "object"}, "OpenAPI 3.1")})},
        "/v1/chat/completions": _proxied("Chat completion, metered (forwarded upstream)"),
        "/v1/completions": _proxied("Completion, metered (forwarded upstream)"),
        "/v1/embeddings": _proxied("Embeddings, metered (forwarded upstream)"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM gateway", "version": "0.1.0",
                 "description": "Endpoints the gateway answers itself, and the error "
                                "responses it adds in front of the metered upstream paths."},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": {**paths, **openapi_admin.paths()},
        "components": {
            "schemas": {**_SCHEMAS, **openapi_admin.SCHEMAS},
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "the operator's token (GATEWAY_ADMIN_TOKEN)"},
                "consumptionKey": {"type": "http", "scheme": "bearer",
                                   "description": "a consumption key, sk_live_..."},
                "managementKey": {"type": "http", "scheme": "bearer",
                                  "description": "a management key mk_... or a dashboard "
                                                 "session token (pluggable verifier)"},
            },
        },
    }
