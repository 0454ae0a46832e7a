"""Conversions between protobuf messages and the plain Python values the domain uses."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from segments_api.v1 import resources_pb2
from segments_service.errors import NotFound, ValidationError
from segments_service.jsonutil import normalize
from segments_service.kept import Kept
from segments_service.segments import SegmentView


def value_to_py(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as Python; NaN and infinities are kept for validation to see."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    return [value_to_py(v) for v in value.list_value.values]


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_py(v) for key, v in struct.fields.items()}


def py_to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, (int, float)):
        value.number_value = float(data)
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, dict):
        value.struct_value.CopyFrom(dict_to_struct(data))
    elif isinstance(data, list):
        value.list_value.values.extend(py_to_value(v) for v in data)
    else:
        value.number_value = float(data)  # Decimal from jsonb numbers
    return value


def dict_to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        # Protobuf's own conversion, twice as fast: it takes JSON's types (a page of
        # contacts converts each one's data).
        struct.update(data)
    except ValueError:  # a type it does not take, e.g. a Decimal from SQL arithmetic
        struct.Clear()
        for key, item in data.items():
            struct.fields[key].CopyFrom(py_to_value(item))
    return struct


def timestamp(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.astimezone(UTC))
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def parse_id(raw: str, what: str) -> uuid.UUID:
    """Ids are UUIDs; anything else names nothing in this project, so it is a 404."""
    try:
        return uuid.UUID(raw.strip())
    except ValueError:
        raise NotFound(f"{what} {raw!r} not found") from None


_LOGIC = {1: "AND", 2: "OR"}


def condition_to_json(msg: resources_pb2.FilterCondition) -> dict[str, Any]:
    """The JSON form of a FilterCondition, with unset fields absent and unknown enum numbers
    kept as numbers so that validation reports them."""
    out: dict[str, Any] = {"groups": [_group_to_json(g) for g in msg.groups]}
    if msg.logic:
        out["logic"] = _LOGIC.get(msg.logic, msg.logic)
    return out


def _group_to_json(group: resources_pb2.FilterGroup) -> dict[str, Any]:
    out: dict[str, Any] = {"filters": [_filter_to_json(f) for f in group.filters]}
    if group.HasField("conditions"):
        out["conditions"] = condition_to_json(group.conditions)
    return out


def _enum_name(enum: Any, number: int) -> str | int:
    try:
        return str(enum.Name(number))
    except ValueError:
        return number


def _filter_to_json(f: resources_pb2.Filter) -> dict[str, Any]:
    out: dict[str, Any] = {"field": f.field}
    if f.operator:
        out["operator"] = _enum_name(resources_pb2.Filter.Operator, f.operator)
    if f.HasField("value"):
        out["value"] = value_to_py(f.value)
    if f.unit:
        out["unit"] = _enum_name(resources_pb2.Filter.Unit, f.unit)
    if f.HasField("count"):
        count: dict[str, Any] = {}
        if f.count.operator:
            count["operator"] = _enum_name(resources_pb2.Filter.Operator, f.count.operator)
        if f.count.HasField("value"):
            count["value"] = value_to_py(f.count.value)
        out["count"] = count
    if f.where:
        out["where"] = [_filter_to_json(w) for w in f.where]
    if f.HasField("aggregate"):
        a = f.aggregate
        aggregate: dict[str, Any] = {}
        if a.function:
            aggregate["function"] = _enum_name(resources_pb2.Filter.Aggregate.Function, a.function)
        if a.field:
            aggregate["field"] = a.field
        if a.operator:
            aggregate["operator"] = _enum_name(resources_pb2.Filter.Operator, a.operator)
        if a.HasField("value"):
            aggregate["value"] = value_to_py(a.value)
        out["aggregate"] = aggregate
    return out


_KEY_ORDER = {
    k: i
    for i, k in enumerate(
        [
            "logic",
            "groups",
            "filters",
            "conditions",
            "field",
            "function",
            "operator",
            "value",
            "unit",
            "count",
            "where",
            "aggregate",
        ]
    )
}


def ordered_condition(node: Any) -> Any:
    """A stored condition with keys in their documented order (jsonb keeps its own order)."""
    if isinstance(node, dict):
        keys = sorted(node, key=lambda k: (_KEY_ORDER.get(k, len(_KEY_ORDER)), k))
        return {k: ordered_condition(node[k]) for k in keys}
    if isinstance(node, list):
        return [ordered_condition(v) for v in node]
    return node


def contact_to_proto(row: Any) -> resources_pb2.Contact:
    return resources_pb2.Contact(
        id=str(row.id),
        email=row.email,
        subscribed=row.subscribed,
        data=dict_to_struct(normalize(row.data)),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


# Conditions as messages, by their JSON text: a segment read again and again (a UI polling
# its count) is not converted again (the text costs a twentieth of the conversion). Not by
# updated_at: a failed build puts the previous condition back without changing it.
_CONDITIONS: Kept[tuple[Any, str], struct_pb2.Value] = Kept(1024)


def _condition_value(row: Any) -> struct_pb2.Value:
    return _CONDITIONS.get(
        (row.id, json.dumps(row.condition)),
        lambda: py_to_value(ordered_condition(row.condition)),
    )


def segment_to_proto(view: SegmentView) -> resources_pb2.Segment:
    row = view.row
    return resources_pb2.Segment(
        id=str(row.id),
        name=row.name,
        description=py_to_value(row.description),
        type=resources_pb2.Segment.Type.Value(row.type),
        condition=_condition_value(row),
        track_membership=row.track_membership,
        member_count=view.member_count,
        project_id=str(row.project_id),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        status=resources_pb2.Segment.Status.Value(row.status),
        status_reason=py_to_value(row.status_reason),
    )


def require_type(value: int, field: str) -> str | None:
    """DYNAMIC, STATIC, or None when unset."""
    if value == 0:
        return None
    name = _enum_name(resources_pb2.Segment.Type, value)
    if not isinstance(name, str):
        raise ValidationError.single(field, "must be DYNAMIC or STATIC", "invalid_enum")
    return name
