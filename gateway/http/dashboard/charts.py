"""The key page's charts: per-hour (last 24 h) and per-day (last 30 d) series from the
counters settle.lua writes, drawn as inline SVG bars (no script: the browser renders them).

The counters are those /api/usage sums (gateway/core/usage_windows.py): per-hour fields
r<h>/p<h>/c<h> (h = hour % 24) in one hash per UTC day. They count requests and tokens, not
money: a bucket's spend is known only where the hash also holds s<h> (integer micro-USD),
else it is None and shown as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from gateway.core.timefmt import iso_from_us
from gateway.core.usage_windows import HOUR_PERIODS, MINUTES_IN_LAST_HOUR, Counters

HOURS = 24
DAYS = 30


@dataclass(frozen=True, slots=True)
class Bar:
    start_s: int  # the bucket's first second (Unix, UTC)
    requests: int
    tokens: int
    spend_micro: int | None  # None: the counters keep no spend for this bucket


@dataclass(frozen=True, slots=True)
class Series:
    bars: tuple[Bar, ...]

    @property
    def requests(self) -> int:
        return sum(b.requests for b in self.bars)

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.bars)

    @property
    def spend_micro(self) -> int | None:
        known = [b.spend_micro for b in self.bars if b.spend_micro is not None]
        unknown = any(b.spend_micro is None and b.requests for b in self.bars)
        return None if unknown else sum(known)


def _slot(fields: dict[str, int] | None, index: int) -> tuple[int, int, int | None]:
    if not fields:
        return 0, 0, 0
    requests = fields.get(f"r{index}", 0)
    tokens = fields.get(f"p{index}", 0) + fields.get(f"c{index}", 0)
    spend = fields.get(f"s{index}")
    return requests, tokens, (0 if not requests else spend)


def series(now_seconds: int, hour_hashes: Counters) -> tuple[Series, Series]:
    """(the last 24 hours including the current one, the last 30 UTC days including today),
    oldest first, from the per-hour hashes usage_snapshot reads (keyed by day number)."""
    hour = now_seconds // 3600
    hourly = []
    for h in range(hour - HOURS + 1, hour + 1):
        requests, tokens, spend = _slot(dict(hour_hashes.get(h // 24) or {}), h % 24)
        hourly.append(Bar(h * 3600, requests, tokens, spend))
    daily = []
    today = hour // 24
    for d in range(today - DAYS + 1, today + 1):
        fields = dict(hour_hashes.get(d) or {})
        slots = [_slot(fields, h) for h in range(24)]
        spends = [s for r, _, s in slots if r]
        daily.append(Bar(d * 86400, sum(r for r, _, _ in slots), sum(t for _, t, _ in slots),
                         None if None in spends else sum(s or 0 for s in spends)))
    return Series(tuple(hourly)), Series(tuple(daily))


def decimal_usd(micro: int) -> str:
    """Integer micro-USD as exact decimal dollars, '12.345678' (no float on the way)."""
    sign = "-" if micro < 0 else ""
    whole, part = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{part:06d}"


def usd(micro: int | None) -> str:
    """For people: '$0.001234', or '—' when unknown."""
    if micro is None:
        return "—"
    text = decimal_usd(micro)
    return f"-${text[1:]}" if text.startswith("-") else f"${text}"


def usd_attr(micro: int | None) -> str:
    """For data-spend attributes: '0.001234', or '' when unknown."""
    return "" if micro is None else decimal_usd(micro)


WIDTH, HEIGHT, TOP = 720, 160, 8


def svg(chart_id: str, title: str, data: Series, label: str) -> str:
    """One <rect> per bucket, its height the bucket's requests; totals on the <svg>."""
    peak = max((b.requests for b in data.bars), default=0) or 1
    step = WIDTH / len(data.bars)
    rects = []
    for i, bar in enumerate(data.bars):
        height = round((HEIGHT - TOP) * bar.requests / peak, 2)
        tip = (f"{_when(bar.start_s, label)}: {bar.requests} requests, {bar.tokens} tokens, "
               f"{usd(bar.spend_micro)}")
        rects.append(
            f'<rect class="bar" x="{round(i * step + 1, 2)}" y="{round(HEIGHT - height, 2)}" '
            f'width="{round(step - 2, 2)}" height="{height}" data-requests="{bar.requests}" '
            f'data-tokens="{bar.tokens}" data-spend="{usd_attr(bar.spend_micro)}">'
            f"<title>{escape(tip)}</title></rect>")
    return (
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 1}" '
        # stretched to the box the stylesheet gives it, not centred with margins
        f'preserveAspectRatio="none" '
        f'role="img" aria-label="{escape(title)}" data-requests="{data.requests}" '
        f'data-tokens="{data.tokens}" data-spend="{usd_attr(data.spend_micro)}">'
        f"<title>{escape(title)}</title>"
        f'<line class="axis" x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}"/>'
        + "".join(rects) + "</svg>")


def _when(start_s: int, label: str) -> str:
    iso = iso_from_us(start_s * 1_000_000)
    return iso[:13] + ":00Z" if label == "hour" else iso[:10]


def period_spend(now_seconds: int, minute_hashes: Counters,
                 hour_hashes: Counters) -> dict[str, int | None]:
    """The spend of /api/usage's four periods, over the very buckets aggregate() sums; None
    where a bucket with requests keeps no spend."""
    minute = now_seconds // 60
    hour = minute // 60

    def total(hashes: Counters, first: int, last: int, per_hash: int) -> int | None:
        spent = 0
        for slot in range(first, last + 1):
            requests, _, spend = _slot(dict(hashes.get(slot // per_hash) or {}),
                                       slot % per_hash)
            if requests and spend is None:
                return None
            spent += spend or 0
        return spent

    out = {"last1h": total(minute_hashes, minute - MINUTES_IN_LAST_HOUR + 1, minute, 60)}
    for name, hours in HOUR_PERIODS:
        out[name] = total(hour_hashes, hour - hours + 1, hour, 24)
    return out


def refusals_last_hour(now_seconds: int, minute_hashes: Counters) -> int:
    """The key's requests refused in /api/usage's last hour (admit.lua's 'x<minute>' fields
    in the same minute hashes period_spend reads)."""
    minute = now_seconds // 60
    refused = 0
    for slot in range(minute - MINUTES_IN_LAST_HOUR + 1, minute + 1):
        fields = minute_hashes.get(slot // 60)
        if fields:
            refused += fields.get(f"x{slot % 60}", 0)
    return refused


UNRECORDED = "(model not recorded)"  # settled before the counters kept the model
NO_MODEL_NAMED = "(none)"  # keyed requests that named no model and were served none


def model_spend(now_seconds: int, hour_hashes: Counters) -> list[tuple[str, int, int]]:
    """(model, requests, micro-USD) over the daily chart's 30 days, most spend first, from
    settle.lua's 'm:<model>' / 'n:<model>' fields of the per-day hashes; what a day's
    r<h>/s<h> fields hold beyond them (settled before those fields existed) is one row of
    its own, so the rows add up to the chart's requests and spend. Rows are by the name
    shown: a model really named like a row of ours shares that row."""
    spend: dict[str, int] = {}
    requests: dict[str, int] = {}
    today = now_seconds // 86400
    for day in range(today - DAYS + 1, today + 1):
        fields = hour_hashes.get(day)
        if not fields:
            continue
        day_spend = sum(fields.get(f"s{h}", 0) for h in range(24))
        day_requests = sum(fields.get(f"r{h}", 0) for h in range(24))
        for name, value in fields.items():
            if name.startswith("m:"):
                shown = name[2:] or NO_MODEL_NAMED
                spend[shown] = spend.get(shown, 0) + value
                day_spend -= value
            elif name.startswith("n:"):
                shown = name[2:] or NO_MODEL_NAMED
                requests[shown] = requests.get(shown, 0) + value
                day_requests -= value
        if day_spend > 0 or day_requests > 0:
            spend[UNRECORDED] = spend.get(UNRECORDED, 0) + max(0, day_spend)
            requests[UNRECORDED] = requests.get(UNRECORDED, 0) + max(0, day_requests)
    rows = [(model, requests.get(model, 0), micro) for model, micro in spend.items()]
    return sorted(rows, key=lambda row: (-row[2], row[0]))
