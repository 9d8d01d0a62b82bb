"""The one table from Redis replies and client failures to the store's errors."""

from __future__ import annotations

import ssl

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
    StoreAmbiguous,
    StoreCommandError,
    StoreUnavailable,
)
from gateway.store.resp import _Unsent


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


def _hot_error(exc: Exception) -> StoreUnavailable:
    """The store's error for a failure on the hot connection."""
    if isinstance(exc, _Unsent):
        return StoreUnavailable(str(exc))
    if isinstance(exc, hiredis.ReplyError):
        return _reply_error(str(exc))
    return StoreAmbiguous(type(exc).__name__)  # written, then no answer: it may have run


# What redis-py raises, beside Redis's own error replies: connection and timeout failures,
# a cluster it cannot use (RedisClusterException is not a RedisError), and errors from a
# connection torn down under it (its issue #4287: "'NoneType' object has no attribute
# 'writelines'"), after which the command may or may not have been sent.
_CLIENT_FAILURES = (ResponseError, TimeoutError, RedisError, OSError, RedisClusterException,
                    AttributeError, RuntimeError, ValueError, TypeError)


def client_error(exc: BaseException) -> StoreUnavailable:
    """The store's error for a failure of a redis-py call (one of _CLIENT_FAILURES)."""
    if isinstance(exc, ResponseError):
        return _response_error(exc)
    if isinstance(exc, TimeoutError | RedisError | OSError):
        message = type(exc).__name__ + _tls_reason(exc)
        return StoreAmbiguous(message) if _maybe_applied(exc) else StoreUnavailable(message)
    if isinstance(exc, RedisClusterException):
        return StoreUnavailable(f"Redis Cluster: {str(exc)[:120]}")
    return StoreAmbiguous(f"Redis client error: {type(exc).__name__}")
