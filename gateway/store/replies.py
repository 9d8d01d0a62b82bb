"""The one table from Redis replies and client failures to the store's errors."""

from __future__ import annotations

import hiredis

from gateway.errors import (
    StoreAmbiguous,
    StoreCommandError,
    StoreUnavailable,
)
from gateway.store.resp import Unsent

# Errors Redis answers while it is starting, failing over or briefly busy, or when a command
# reached a node that does not serve its slot: the command did not run; worth a retry.
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN",
                      "NOSCRIPT", "MOVED", "ASK")

# What the client raises (client.py): never written, Redis's error reply, or written and
# then no answer.
FAILURES = (Unsent, hiredis.ReplyError, TimeoutError, OSError)


def _reply_error(message: str) -> StoreUnavailable:
    text = f"Redis error: {message[:80]}"
    if message.startswith(_TRANSIENT_REPLIES):
        return StoreUnavailable(text)
    return StoreCommandError(text)


def store_error(exc: BaseException) -> StoreUnavailable:
    """The store's error for one of FAILURES:

    Unsent                      StoreUnavailable   (Redis certainly did not run it)
    a transient error reply     StoreUnavailable   (LOADING, READONLY, MOVED, NOSCRIPT, ...)
    any other error reply       StoreCommandError  (retrying cannot help)
    TimeoutError, OSError       StoreAmbiguous     (written, then no answer: it may have run)
    """
    if isinstance(exc, Unsent):
        return StoreUnavailable(str(exc))
    if isinstance(exc, hiredis.ReplyError):
        return _reply_error(str(exc))
    return StoreAmbiguous(f"{type(exc).__name__}: {str(exc)[:120]}" if str(exc)
                          else type(exc).__name__)
