"""Filter conditions as the tests send them. Valid conditions are built with the client's
builder (`segments.F`); `flt`, `cond` and `groups_of` spell the JSON by hand, for the tests
about the JSON itself: invalid conditions, limits, and shapes the builder never writes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, TypeAlias

from google.protobuf import json_format

from segments import Expression
from segments_api.v1 import resources_pb2
from segments_service.filters import SegmentDefinition, parse_condition
from segments_service.membership import Dynamic

#: A condition as a test holds it: built, or spelled as JSON.
Condition: TypeAlias = Expression | Mapping[str, Any]


def flt(field: str, operator: str, value: Any = None, unit: str | None = None) -> dict[str, Any]:
    """One filter's JSON; `value` and `unit` are left out when None."""
    out: dict[str, Any] = {"field": field, "operator": operator}
    if value is not None:
        out["value"] = value
    if unit is not None:
        out["unit"] = unit
    return out


def cond(*filters: dict[str, Any], logic: str = "AND") -> dict[str, Any]:
    """A condition of one group holding `filters`."""
    return {"logic": logic, "groups": [{"filters": list(filters)}]}


def groups_of(logic: str, *groups: dict[str, Any]) -> dict[str, Any]:
    """A condition of these groups."""
    return {"logic": logic, "groups": list(groups)}


def as_json(condition: Condition) -> dict[str, Any]:
    """The JSON of a built condition, or a copy of the JSON given."""
    return condition.to_dict() if isinstance(condition, Expression) else dict(condition)


def as_proto(condition: Condition) -> resources_pb2.FilterCondition:
    """The FilterCondition message of a condition, for the generated stubs."""
    return json_format.ParseDict(as_json(condition), resources_pb2.FilterCondition())


def loaded_segment(
    condition: Expression, references: Mapping[uuid.UUID, Expression | None] | None = None
) -> Dynamic:
    """`condition` as a tracked DYNAMIC segment the service loaded, with `references`:
    the segments it names, None for a STATIC one."""
    refs = {
        i: SegmentDefinition(
            i,
            "STATIC" if c is None else "DYNAMIC",
            None if c is None else parse_condition(c.to_dict()),
        )
        for i, c in (references or {}).items()
    }
    return Dynamic(uuid.uuid4(), "s", True, parse_condition(condition.to_dict()), refs)
