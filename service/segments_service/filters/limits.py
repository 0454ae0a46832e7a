"""The bounds a condition must keep: as written (validation) and with references expanded."""

from __future__ import annotations

from datetime import timedelta

MAX_DEPTH = 10
MAX_FILTERS = 200
MAX_STRING_VALUE = 1000
# A filter's `field`: every part of a data path costs the compiled statement a step.
MAX_FIELD_LENGTH = 255
MAX_FIELD_PARTS = 10
# Expanding segment references inlines their conditions (transitively); these bound the
# result: its filters in total, and how deep its conditions nest (a referenced condition
# sits one level below the condition holding the reference). SQLAlchemy compiles nested
# statements recursively: the costliest level (a notMemberOfSegment reference to an OR
# of sets) takes about 35 Python frames, so 16 levels stay within 600 of the 1,000
# Python allows (the server's own calls take under 100).
MAX_EXPANDED_FILTERS = 1000
MAX_EXPANDED_DEPTH = 16
# Window operators accept at most this span (about 100 years), so intervals never overflow;
# in calendar months, at most MAX_WINDOW_MONTHS.
MAX_WINDOW = timedelta(days=36525)
MAX_WINDOW_MONTHS = 1200
# Values of an `in` / `notIn` list.
MAX_IN_VALUES = 100
# The largest `count` an event filter may ask for.
MAX_COUNT = 1_000_000_000
