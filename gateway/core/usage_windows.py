"""Usage periods from the counters settle.lua writes. Pure: "now" is an argument.

settle.lua keeps per-minute fields r<m>/p<m>/c<m> (m = minute % 60) in one hash per hour and
per-hour fields r<h>/p<h>/c<h> (h = hour % 24) in one hash per day. last1h sums the last 60
minute buckets including the current minute; the longer periods sum whole hour buckets
including the current hour, so they are exact to the hour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MINUTES_IN_LAST_HOUR = 60
HOUR_PERIODS = (("last24h", 24), ("last7d", 168), ("last30d", 720))

# Parsed counter hashes: minute hashes keyed by hour number, hour hashes keyed by day number.
Counters = Mapping[int, Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class Buckets:
    hours: tuple[int, ...]  # which per-minute hashes (one per hour) to read
    days: tuple[int, ...]  # which per-hour hashes (one per day) to read


@dataclass(frozen=True, slots=True)
class Window:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def document(self) -> dict[str, int]:
        return {"requests": self.requests, "tokens": self.prompt_tokens + self.completion_tokens,
                "promptTokens": self.prompt_tokens, "completionTokens": self.completion_tokens}


def buckets_needed(now_seconds: int) -> Buckets:
    minute = now_seconds // 60
    hour = minute // 60
    first_minute = minute - MINUTES_IN_LAST_HOUR + 1
    longest = max(n for _, n in HOUR_PERIODS)
    return Buckets(hours=tuple(range(first_minute // 60, hour + 1)),
                   days=tuple(range((hour - longest + 1) // 24, hour // 24 + 1)))


def _sum(hashes: Counters, first: int, last: int, per_hash: int) -> Window:
    requests = prompt = completion = 0
    for slot in range(first, last + 1):
        fields = hashes.get(slot // per_hash)
        if not fields:
            continue
        index = slot % per_hash
        requests += fields.get(f"r{index}", 0)
        prompt += fields.get(f"p{index}", 0)
        completion += fields.get(f"c{index}", 0)
    return Window(requests, prompt, completion)


def aggregate(now_seconds: int, minute_hashes: Counters,
              hour_hashes: Counters) -> dict[str, Window]:
    """The four periods at `now_seconds` (Unix seconds, Redis time)."""
    minute = now_seconds // 60
    hour = minute // 60
    periods = {"last1h": _sum(minute_hashes, minute - MINUTES_IN_LAST_HOUR + 1, minute, 60)}
    for name, hours in HOUR_PERIODS:
        periods[name] = _sum(hour_hashes, hour - hours + 1, hour, 24)
    return periods


def usage_document(periods: Mapping[str, Window]) -> dict[str, Any]:
    return {name: window.document() for name, window in periods.items()}
