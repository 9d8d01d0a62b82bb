"""Form bodies, read bounded and parsed strictly: urlencoded UTF-8, at most 8 KiB, only the
fields a form has, each once. Any other body is a BadForm (a 400 page, never a 500)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from gateway.errors import Rejected
from gateway.http import body
from gateway.http.auth import header
from gateway.types import Receive, Scope

MAX_FORM_BYTES = 8 * 1024
FORM_TYPE = b"application/x-www-form-urlencoded"


class BadForm(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_FORM_BYTES) -> bytes:
    """The form's bytes, bounded like any body the gateway reads (http/body.py); raises
    BadForm (413, or 400 for a Content-Length that is not a number) or ClientGone."""
    declared = header(scope["headers"], b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadForm(413 if declared.isdigit() else 400,
                      f"The form is larger than {limit // 1024} KiB."
                      if declared.isdigit() else "Bad Content-Length.")
    try:
        return await body.read_body(receive, limit)
    except Rejected:
        raise BadForm(413, f"The form is larger than {limit // 1024} KiB.") from None


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
