"""Timestamp strings as filters and stored data spell them.

One shape, shared with the SQL function segments_timestamp(): a date, optionally a time
(minutes required), optionally a UTC offset up to 15:59. Filter values may carry
nanoseconds (as protobuf prints them); storage keeps microseconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"(?:[T ]([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d)(?:\.(\d{1,FRAC}))?)?"
    r"(Z|z|[+-](?:0\d|1[0-5])(?::?[0-5]\d)?)?)?$".replace("FRAC", "6"),
    re.ASCII,
)
_VALUE_TIMESTAMP_RE = re.compile(_TIMESTAMP_RE.pattern.replace(r"\d{1,6}", r"\d{1,9}"), re.ASCII)


def _parse_iso(text: str, pattern: re.Pattern[str]) -> datetime | None:
    # fullmatch: `$` alone would also accept a trailing newline, which SQL's regex refuses.
    match = pattern.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    tz: timezone = UTC
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:] or 0)
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tz,
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        # Not a calendar date, or (OverflowError) the offset moves it outside years 1..9999.
        return None


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_stored_timestamp(text: str) -> datetime | None:
    """A data string read as a timestamp exactly as SQL's segments_timestamp() reads it."""
    return _parse_iso(text, _TIMESTAMP_RE)


def is_date_only(text: str) -> bool:
    return len(text) == 10 and _parse_iso(text, _TIMESTAMP_RE) is not None


def parse_value_timestamp(text: str) -> datetime | None:
    """A filter value read as a timestamp (nanoseconds allowed, truncated to microseconds)."""
    return _parse_iso(text, _VALUE_TIMESTAMP_RE)
