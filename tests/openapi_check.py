"""Validates real responses against the gateway's OpenAPI document (gateway/openapi.py)."""

from __future__ import annotations

import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from gateway.http.openapi import document

DOC = document()
_TEMPLATES = [(re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", p) + "$"), p) for p in DOC["paths"]]


def template_for(path: str) -> str | None:
    exact = [p for rx, p in _TEMPLATES if p == path]
    if exact:
        return exact[0]
    found = [p for rx, p in _TEMPLATES if rx.match(path)]
    return found[0] if found else None


def validate(schema: dict[str, Any], instance: Any) -> None:
    root = {**schema, "components": DOC["components"]}
    Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(
        instance)


def check(response: httpx.Response) -> None:
    """The response's status is documented for its operation and its body fits the schema."""
    request = response.request
    path = request.url.path
    template = template_for(path)
    assert template is not None, f"undocumented path {path}"
    operation = DOC["paths"][template].get(request.method.lower())
    status = str(response.status_code)
    if operation is None:
        assert response.status_code == 405, (request.method, path, status)
        validate({"$ref": "#/components/schemas/Error"}, response.json())
        return
    spec = operation["responses"].get(status)
    assert spec is not None, f"{request.method} {template}: undocumented status {status}"
    for name in spec.get("headers", {}):
        if name == "Retry-After":
            assert re.fullmatch(r"[1-9][0-9]*", response.headers[name])
    media = response.headers["content-type"].split(";")[0].strip()
    assert media in spec["content"], f"{request.method} {template} {status}: {media}"
    if media == "application/json":
        validate(spec["content"][media]["schema"], response.json())
