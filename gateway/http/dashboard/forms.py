"""Form bodies, read bounded and parsed strictly: urlencoded UTF-8, at most 8 KiB, only the
fields a form has, each once. Any other body is a BadForm (a 400 page, never a 500)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from gateway.http.auth import header
from gateway.types import Receive, Scope

MAX_FORM_BYTES = 8 * 1024
FORM_TYPE = b"application/x-www-form-urlencoded"


class BadForm(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    pass


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_FORM_BYTES) -> bytes:
    declared = header(scope["headers"], b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadForm(413 if declared.isdigit() else 400,
                      f"The form is larger than {limit // 1024} KiB."
                      if declared.isdigit() else "Bad Content-Length.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadForm(413, f"The form is larger than {limit // 1024} KiB.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_form(scope: Scope, body: bytes, fields: tuple[str, ...]) -> dict[str, str]:
    if not body:
        return {}  # an empty form, whatever its type says
    content_type = (header(scope["headers"], b"content-type") or b"").split(b";")[0]
    if content_type.strip().lower() != FORM_TYPE:
        raise BadForm(400, "The form must be sent as application/x-www-form-urlencoded.")
    try:
        text = body.decode("ascii")  # urlencoded: anything else is percent-escaped
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                          encoding="utf-8", errors="strict", max_num_fields=len(fields))
    except (UnicodeDecodeError, ValueError):
        raise BadForm(400, "The form could not be read.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in fields:
            raise BadForm(400, "The form has a field it should not have.")
        if name in form:
            raise BadForm(400, "The form gives a field twice.")
        form[name] = value
    return form
