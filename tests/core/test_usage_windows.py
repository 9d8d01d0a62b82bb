"""The pure aggregation of usage counters into periods, with injected time."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.usage_windows import aggregate, buckets_needed

H = 490_000  # an hour number divisible by 24: hour H starts a new day
DAY = H // 24


def counters(events: list[tuple[int, int, int]]) -> tuple[dict[int, dict[str, int]],
                                                          dict[int, dict[str, int]]]:
    """Hashes as settle.lua writes them for settlements at (unix second, prompt, completion)."""
    minutes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    hours: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for second, prompt, completion in events:
        minute = second // 60
        hour = minute // 60
        for hashes, bucket, index in ((minutes, hour, minute % 60), (hours, hour // 24,
                                                                     hour % 24)):
            hashes[bucket][f"r{index}"] += 1
            hashes[bucket][f"p{index}"] += prompt
            hashes[bucket][f"c{index}"] += completion
    return minutes, hours


def requests(now: int, events: list[tuple[int, int, int]]) -> dict[str, int]:
    minutes, hours = counters(events)
    return {k: w.requests for k, w in aggregate(now, minutes, hours).items()}


def test_last_hour_is_exact_to_the_minute_across_an_hour_boundary() -> None:
    now = H * 3600 + 30  # 30 s into the first minute of hour H (and of a new day)
    assert requests(now, [(now - 59 * 60, 1, 1)])["last1h"] == 1  # minute -59: previous hour
    assert requests(now, [(now - 60 * 60, 1, 1)])["last1h"] == 0  # minute -60: out
    assert requests(now, [(now, 1, 1)])["last1h"] == 1  # the current minute counts
    assert requests(now - 31, [(now - 31 - 59 * 60, 1, 1)])["last1h"] == 1  # last second of H-1
    minutes, _ = counters([(now - 59 * 60, 1, 1)])
    assert set(minutes) == {H - 1}
    assert buckets_needed(now).hours == (H - 1, H)


def test_longer_periods_are_exact_to_the_hour_across_a_day_boundary() -> None:
    now = H * 3600 + 5
    def at(hours_ago: int) -> dict[str, int]:
        return requests(now, [(now - hours_ago * 3600, 2, 3)])
    assert at(0) == {"last1h": 1, "last24h": 1, "last7d": 1, "last30d": 1}
    assert at(1)["last24h"] == 1 and at(1)["last1h"] == 0  # hour H-1 is yesterday
    assert at(23)["last24h"] == 1 and at(24)["last24h"] == 0
    assert at(167)["last7d"] == 1 and at(168)["last7d"] == 0
    assert at(719)["last30d"] == 1 and at(720)["last30d"] == 0
    needed = buckets_needed(now)
    assert needed.days[0] == (H - 719) // 24 and needed.days[-1] == DAY


def test_tokens_are_prompt_plus_completion() -> None:
    now = H * 3600
    minutes, hours = counters([(now, 7, 5), (now - 10, 1, 2)])
    window = aggregate(now, minutes, hours)["last1h"].document()
    assert window == {"requests": 2, "tokens": 15, "promptTokens": 8, "completionTokens": 7}


@settings(max_examples=200, deadline=None, database=None)
@given(now=st.integers(H * 3600, H * 3600 + 3 * 86400),
       offsets=st.lists(st.tuples(st.integers(0, 31 * 86400), st.integers(0, 1000),
                                  st.integers(0, 1000)), max_size=30))
def test_matches_a_direct_count_of_events(now: int,
                                          offsets: list[tuple[int, int, int]]) -> None:
    events = [(now - ago, p, c) for ago, p, c in offsets]
    minutes, hours = counters(events)
    # Only the hashes buckets_needed names are read (the store fetches exactly those).
    needed = buckets_needed(now)
    minutes = {h: v for h, v in minutes.items() if h in needed.hours}
    hours = {d: v for d, v in hours.items() if d in needed.days}
    got = aggregate(now, minutes, hours)
    minute, hour = now // 60, now // 3600
    spans = {"last1h": lambda s: s // 60 > minute - 60,
             "last24h": lambda s: s // 3600 > hour - 24,
             "last7d": lambda s: s // 3600 > hour - 168,
             "last30d": lambda s: s // 3600 > hour - 720}
    for name, inside in spans.items():
        chosen = [e for e in events if inside(e[0])]
        assert got[name].requests == len(chosen)
        assert got[name].prompt_tokens == sum(e[1] for e in chosen)
        assert got[name].completion_tokens == sum(e[2] for e in chosen)
