"""JSON encoding shared by storage and the API: integral floats are written as integers."""

from __future__ import annotations

import json
import math
from typing import Any

_NESTED = (float, dict, list)


def normalize(value: Any) -> Any:
    """Protobuf carries every number as a double; store 5.0 as 5 so data reads back as sent."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value
    # Strings, integers, booleans and nulls are returned as they are without a call each:
    # every stored batch of events passes through here.
    if isinstance(value, dict):
        return {k: normalize(v) if isinstance(v, _NESTED) else v for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) if isinstance(v, _NESTED) else v for v in value]
    return value


def encode(value: Any) -> str:
    """JSON text of an already normalized value."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    return encode(normalize(value))
