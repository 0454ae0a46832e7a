"""The JSON a REST request may carry, checked against its request message before Envoy's
gRPC-JSON transcoder reads it (rest_check.py asks). The transcoder parses the lenient
proto3 way: "yes" or "1" for a bool, a lone value for a list, nested arrays flattened into
one, unknown fields dropped; here each of those is a field violation with the field's dot
path (`contacts.3.subscribed`), so that the caller gets a 400 naming it.

Pure: bytes or a query string and a message descriptor in, violations out. Python's own
JSON parser reads the body; free-form fields (google.protobuf.Struct and Value, such as
`data` and a filter's `value`) are never looked inside."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Collection
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from segments_service.errors import FieldViolation

# JSON objects and arrays may enclose one another this deep where the check walks (request
# messages; the service's limit on condition depth is far below it).
MAX_DEPTH = 64
# Characters of an offending value quoted in its violation's message.
MAX_QUOTED = 100
TIMESTAMP_MESSAGE = "must be an RFC 3339 timestamp such as 2024-01-31T12:00:00Z"

_T = FieldDescriptor
_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
# Integer type -> (its range, what a JSON client must send).
_INTEGERS: dict[int, tuple[tuple[int, int], str]] = {
    _T.TYPE_INT32: (_INT32, "must be a 32-bit integer"),
    _T.TYPE_SINT32: (_INT32, "must be a 32-bit integer"),
    _T.TYPE_SFIXED32: (_INT32, "must be a 32-bit integer"),
    _T.TYPE_UINT32: (_UINT32, "must be a non-negative 32-bit integer"),
    _T.TYPE_FIXED32: (_UINT32, "must be a non-negative 32-bit integer"),
    _T.TYPE_INT64: (_INT64, "must be an integer"),
    _T.TYPE_SINT64: (_INT64, "must be an integer"),
    _T.TYPE_SFIXED64: (_INT64, "must be an integer"),
    _T.TYPE_UINT64: (_UINT64, "must be a non-negative integer"),
    _T.TYPE_FIXED64: (_UINT64, "must be a non-negative integer"),
}
# Proto3 JSON also takes numbers as strings ("5", "1e3"), and these for floating point.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SPECIAL_FLOATS = frozenset({"NaN", "Infinity", "-Infinity"})
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
# Free-form JSON: whatever the value, the transcoder makes it a Struct, a Value or a list.
_STRUCT, _VALUE, _LIST = (
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
)
_TIMESTAMP = "google.protobuf.Timestamp"
_WRAPPERS = frozenset(
    f"google.protobuf.{kind}Value"
    for kind in ("Bool", "String", "Bytes", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double")
)


class _Object(dict[str, Any]):
    """A JSON object as parsed, with the keys it held more than once (JSON allows that;
    the transcoder would merge or append each occurrence)."""

    repeated: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    if len(found) < len(pairs):
        found.repeated = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return found


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(body: bytes) -> tuple[Any, FieldViolation | None]:
    """The JSON value of `body`, or why it is none: malformed, not UTF-8, a non-finite
    number, or nested past what Python's parser takes."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, _malformed("the body is not UTF-8")
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_float=_finite, parse_constant=_no_constant
        )
    except RecursionError:
        return None, FieldViolation("", "The request body nests too deeply", "too_deep")
    except ValueError as exc:  # json.JSONDecodeError, and the two refusals above
        return None, _malformed(str(exc))
    # Python takes a \uD800 escape without its pair, the transcoder does not; only a body
    # with such escapes is printed again to find one (UTF-8 cannot encode it).
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return None, _malformed("a \\u escape is half of a surrogate pair")
    return value, None


def _malformed(reason: str) -> FieldViolation:
    return FieldViolation("", f"Malformed JSON: {reason}", "malformed_json")


def quoted(value: Any) -> str:
    """`value` as JSON, cut to MAX_QUOTED characters: what a message says was sent."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "\u2026"


def body_violations(
    body: bytes, message: Descriptor, body_field: str = "*", bound: Collection[str] = ()
) -> list[FieldViolation]:
    """What is wrong with `body` as the JSON of `message` (body_field "*", the HTTP rule's
    `body: "*"`) or of its field `body_field`; `bound` names the fields (proto names,
    dotted) the URL path sets, which the body must not set too. An empty body is an empty
    request."""
    if not body:
        return []
    value, problem = parse(body)
    if problem is not None:
        return [problem]
    walk = _Walk()
    if body_field != "*":
        walk.field(message.fields_by_name[body_field], value, "", 1)
        return walk.violations
    if not isinstance(value, dict):
        return [FieldViolation("", "The request body must be a JSON object", "invalid_type")]
    walk.message(value, message, "", 1)
    for name in bound:
        path = _given(value, message, name.split("."))
        if path is not None:
            walk.add(path, f"conflicts with the {path} in the URL path", "conflict")
    return walk.violations


def query_violations(
    query: str, message: Descriptor, body_field: str = "", bound: Collection[str] = ()
) -> list[FieldViolation]:
    """What is wrong with the query string `query` (without its `?`) of a request for
    `message`: parameters that name no field by its JSON name (`pageSize`; the transcoder
    would also take the proto name `page_size`, the REST surface does not), or name a field
    the body sets, set a field the URL path sets, or hold a value of the wrong type. An
    unknown parameter is named as it was sent."""
    walk = _Walk()
    bound_names: set[str] = set()
    for name in bound:
        bound_names.add(message.fields_by_name[name.split(".")[0]].json_name)
    for name, value in parse_qsl(query, keep_blank_values=True):
        field, path = _query_field(message, name, body_field)
        if field is None:
            walk.add(name, "unknown query parameter", "unknown_field")
        elif name.split(".")[0] in bound_names:
            walk.add(path, f"conflicts with the {path} in the URL path", "conflict")
        else:
            walk.scalar(field, _from_query(field, value), path)
    return walk.violations


def _query_field(
    message: Descriptor, name: str, body_field: str
) -> tuple[FieldDescriptor | None, str]:
    """The field a query parameter sets (a dotted path of JSON names through singular
    messages ending at a scalar, an enum or a wrapper), with its JSON dot path; None when
    there is none."""
    if body_field == "*":
        return None, ""
    field: FieldDescriptor | None = None
    parts: list[str] = []
    for part in name.split("."):
        if field is not None:
            if field.message_type is None or field.is_repeated:
                return None, ""
            message = field.message_type
        field = _json_fields(message).get(part)
        if field is None or (not parts and field.name == body_field):
            return None, ""
        parts.append(field.json_name)
    if field is None or (
        field.message_type is not None and field.message_type.full_name not in _WRAPPERS
    ):
        return None, ""
    return field, ".".join(parts)


def _from_query(field: FieldDescriptor, value: str) -> Any:
    """A query parameter's text as the JSON value it stands for."""
    kind = _unwrapped(field).type
    if kind == _T.TYPE_BOOL:
        return {"true": True, "false": False}.get(value, value)
    return value


def _given(value: dict[str, Any], message: Descriptor, parts: list[str]) -> str | None:
    """The JSON path of the field at `parts` (proto names) when the object `value` of
    `message` sets it, else None."""
    path: list[str] = []
    for i, part in enumerate(parts):
        field = message.fields_by_name[part]
        key = next((k for k in (field.json_name, field.name) if k in value), None)
        if key is None or value[key] is None:
            return None
        path.append(field.json_name)
        if i + 1 < len(parts):
            value = value[key]
            if not isinstance(value, dict) or field.message_type is None:
                return None
            message = field.message_type
    return ".".join(path)


@cache
def _fields(message: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by JSON name and by proto name: the transcoder takes either."""
    found: dict[str, FieldDescriptor] = {}
    for field in message.fields:
        found[field.name] = found[field.json_name] = field
    return found


@cache
def _json_fields(message: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by JSON name alone: the names a query string may use."""
    return {field.json_name: field for field in message.fields}


@cache
def _enum_names(enum: EnumDescriptor) -> tuple[str, ...]:
    """The JSON spellings an enum field takes: its values' names, the zero *_UNSPECIFIED
    that stands for "not set" excepted."""
    return tuple(
        v.name for v in enum.values if not (v.number == 0 and v.name.endswith("_UNSPECIFIED"))
    )


def _unwrapped(field: FieldDescriptor) -> FieldDescriptor:
    """The `value` field of a wrapper type (BoolValue, ...), else the field itself."""
    message = field.message_type
    if message is not None and message.full_name in _WRAPPERS:
        return message.fields_by_name["value"]
    return field


class _Walk:
    """Collects the violations of one request, in document order."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, message: str, code: str) -> None:
        self.violations.append(FieldViolation(field, message, code))

    def wrong(self, path: str, expected: str, value: Any) -> None:
        self.add(path, f"{expected}; got {quoted(value)}", "invalid_type")

    def message(self, value: dict[str, Any], message: Descriptor, prefix: str, depth: int) -> None:
        """The object `value` (at nesting `depth`, the body being 1) as a `message`."""
        if depth > MAX_DEPTH:
            self.add(prefix.rstrip("."), f"nests deeper than {MAX_DEPTH} levels", "too_deep")
            return
        fields = _fields(message)
        repeated = value.repeated if isinstance(value, _Object) else frozenset()
        seen: set[int] = set()
        for key, item in value.items():
            field = fields.get(key)
            if field is None:
                self.add(prefix + key, "unknown field", "unknown_field")
                continue
            path = prefix + field.json_name
            if key in repeated or field.number in seen:
                self.add(path, "is given more than once", "duplicate_field")
            else:
                self.field(field, item, path, depth + 1)
            seen.add(field.number)

    def field(self, field: FieldDescriptor, value: Any, path: str, depth: int) -> None:
        """The value of one field; null is the field's default, whatever its type."""
        if value is None:
            return
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            if not isinstance(value, dict):
                self.wrong(path, "must be an object", value)
                return
            for key, item in value.items():
                self.single(message.fields_by_name["value"], item, f"{path}.{key}", depth + 1)
        elif field.is_repeated:
            if not isinstance(value, list):
                self.wrong(path, "must be an array", value)
                return
            for index, item in enumerate(value):
                self.single(field, item, f"{path}.{index}", depth + 1)
        else:
            self.single(field, value, path, depth)

    def single(self, field: FieldDescriptor, value: Any, path: str, depth: int) -> None:
        """One value of `field`'s type (an element, when the field is a list)."""
        message = field.message_type
        name = "" if message is None else message.full_name
        if message is None or name in _WRAPPERS:
            self.scalar(field, value, path)
        elif name == _VALUE:
            return
        elif name == _LIST:
            if not isinstance(value, list):
                self.wrong(path, "must be an array", value)
        elif name == _TIMESTAMP:
            if not (isinstance(value, str) and _is_timestamp(value)):
                self.add(path, TIMESTAMP_MESSAGE, "invalid_value")
        elif name.startswith("google.protobuf.") and name != _STRUCT:
            return  # Any, Duration, FieldMask, Empty: left to the transcoder
        elif not isinstance(value, dict):
            self.wrong(path, "must be an object", value)
        elif name != _STRUCT:
            self.message(value, message, path + ".", depth)

    def scalar(self, field: FieldDescriptor, value: Any, path: str) -> None:
        """A string, number, bool or enum value (or one of a wrapper type's)."""
        field = _unwrapped(field)
        if field.type == _T.TYPE_ENUM:
            names = _enum_names(field.enum_type)
            if not (isinstance(value, str) and value in names):
                self.add(
                    path, f"must be one of {', '.join(names)}; got {quoted(value)}", "invalid_enum"
                )
            return
        ok, expected = _SCALARS.get(field.type, _any)(field.type, value)
        if not ok:
            self.wrong(path, expected, value)


def _is_timestamp(text: str) -> bool:
    """RFC 3339 with a time zone, as proto3 JSON writes google.protobuf.Timestamp."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return False
    try:
        datetime.fromisoformat(match[1] + ("+00:00" if match[3] == "Z" else match[3]))
    except ValueError:
        return False
    return True


def _any(_kind: int, _value: Any) -> tuple[bool, str]:
    return True, ""


def _string(_kind: int, value: Any) -> tuple[bool, str]:
    return isinstance(value, str), "must be a string"


def _boolean(_kind: int, value: Any) -> tuple[bool, str]:
    return isinstance(value, bool), "must be true or false"


def _integer(kind: int, value: Any) -> tuple[bool, str]:
    (low, high), expected = _INTEGERS[kind]
    if isinstance(value, str) and len(value) <= 64 and _NUMBER.fullmatch(value):
        value = int(value) if value.lstrip("-").isdigit() else float(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    return ok, expected


def _floating(_kind: int, value: Any) -> tuple[bool, str]:
    if isinstance(value, str):
        return bool(_NUMBER.fullmatch(value)) or value in _SPECIAL_FLOATS, "must be a number"
    return isinstance(value, (int, float)) and not isinstance(value, bool), "must be a number"


_SCALARS: dict[int, Callable[[int, Any], tuple[bool, str]]] = {
    _T.TYPE_STRING: _string,
    _T.TYPE_BYTES: _string,
    _T.TYPE_BOOL: _boolean,
    _T.TYPE_DOUBLE: _floating,
    _T.TYPE_FLOAT: _floating,
    **dict.fromkeys(_INTEGERS, _integer),
}
