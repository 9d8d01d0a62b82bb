"""Unique ids without a system call per request.

A random per-process prefix plus a counter: os.urandom per request was a getrandom(2)
call each time on the hot path. The prefix is drawn again in a forked child, so a parent and
its children never hand out the same id.
"""

from __future__ import annotations

import itertools
import os

_PREFIX_BYTES = 8  # 64 random bits per process: collisions across processes are negligible


def _fresh() -> tuple[str, itertools.count[int]]:
    return os.urandom(_PREFIX_BYTES).hex(), itertools.count(1)


_prefix, _counter = _fresh()


def _reseed() -> None:
    global _prefix, _counter
    _prefix, _counter = _fresh()


os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """32 lowercase hex characters, unique across processes and restarts."""
    return f"{_prefix}{next(_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
