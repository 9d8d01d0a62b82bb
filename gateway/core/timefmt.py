from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_LATEST_US = 253_402_300_799_999_000  # 9999-12-31T23:59:59.999Z, the last date ISO shows


def iso_from_us(micros: int) -> str:
    """Redis-time microseconds -> '2026-02-15T10:00:00.000Z' (clamped to years 1970-9999,
    so a record written by hand or an old version can always be shown)."""
    moment = _EPOCH + timedelta(microseconds=min(max(micros, 0), _LATEST_US))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso_to_us(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)
