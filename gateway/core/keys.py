"""Secret formats: generation and hashing. Secrets are never stored, only their SHA-256."""

import hashlib
import secrets
import string

_BASE62 = string.digits + string.ascii_letters
SECRET_LENGTH = 40
CONSUMPTION_PREFIX = "sk_live_"
MANAGEMENT_PREFIX = "mk_"


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def new_consumption_secret() -> str:
    return CONSUMPTION_PREFIX + _random_base62(SECRET_LENGTH)


def new_management_secret() -> str:
    return MANAGEMENT_PREFIX + _random_base62(SECRET_LENGTH)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like(secret: str, prefix: str) -> bool:
    body = secret[len(prefix) :]
    return secret.startswith(prefix) and len(body) >= 32 and all(c in _BASE62 for c in body)


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
