"""The JSON shapes of REST requests (service/segments_service/json_shapes.py), checked
without a server: a body or a query string against a request message of the API, and the
field violations that come out, with their dot paths, messages and codes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor

from segments_api.v1 import contacts_pb2, events_pb2, segments_pb2
from segments_service import json_shapes
from segments_service.json_shapes import MAX_DEPTH, TIMESTAMP_MESSAGE

UPSERT = contacts_pb2.UpsertContactRequest.DESCRIPTOR
BATCH = contacts_pb2.BatchUpsertContactsRequest.DESCRIPTOR
CREATE = segments_pb2.CreateSegmentRequest.DESCRIPTOR
UPDATE = segments_pb2.UpdateSegmentRequest.DESCRIPTOR
MEMBERS = segments_pb2.AddSegmentMembersRequest.DESCRIPTOR
INGEST = events_pb2.IngestEventsRequest.DESCRIPTOR
LISTING = segments_pb2.ListSegmentContactsRequest.DESCRIPTOR

Found = list[tuple[str, str, str]]


def body(message: Descriptor, value: Any, *, bound: tuple[str, ...] = ()) -> Found:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return [
        (v.field, v.message, v.code) for v in json_shapes.body_violations(raw, message, "*", bound)
    ]


def query(
    message: Descriptor, text: str, *, body_field: str = "", bound: tuple[str, ...] = ()
) -> Found:
    return [
        (v.field, v.message, v.code)
        for v in json_shapes.query_violations(text, message, body_field, bound)
    ]


def test_valid_bodies_have_no_violations() -> None:
    condition = {
        "logic": "OR",
        "groups": [
            {
                "filters": [
                    {"field": "data.plan", "operator": "equals", "value": [1, {"a": None}]}
                ],
                "conditions": {"logic": "AND", "groups": [{"filters": []}]},
            }
        ],
    }
    assert body(CREATE, {"name": "S", "type": "STATIC", "trackMembership": True}) == []
    assert body(CREATE, {"name": "S", "condition": condition, "description": None}) == []
    assert body(UPSERT, {"email": "a@x.com", "subscribed": False, "data": {"emails": [[1]]}}) == []
    assert body(BATCH, {"contacts": [{"email": "a@x.com"}, {"email": "b@x.com", "data": {}}]}) == []
    assert body(MEMBERS, {"emails": [], "createMissing": None, "subscribed": True}) == []
    events = [{"email": "a", "event": "e", "occurredAt": "2024-01-02T03:04:05.123456789+02:00"}]
    assert body(INGEST, {"events": events}) == []
    # Proto names as well as JSON names, as the transcoder takes them.
    assert body(MEMBERS, {"emails": ["a"], "create_missing": True}) == []
    assert body(CREATE, {"name": "S", "track_membership": None}) == []


def test_an_empty_body_is_an_empty_request() -> None:
    assert body(CREATE, b"") == []


def test_escaped_surrogate_pairs_are_characters() -> None:
    assert body(UPSERT, b'{"email": "\\ud83d\\ude00@x.com", "data": {"\\ud83d\\ude00": 1}}') == []


@pytest.mark.parametrize("value", ["no", "yes", "1", "t", "true", "", 1, 0, {"a": 1}, [True]])
def test_bools_take_true_false_or_null_only(value: Any) -> None:
    assert body(UPSERT, {"email": "a", "subscribed": value}) == [
        ("subscribed", f"must be true or false; got {json.dumps(value)}", "invalid_type")
    ]


def test_paths_name_list_items_and_nested_messages_by_json_name() -> None:
    bad = {"contacts": [{"email": "a"}, {"email": "b", "subscribed": "t"}]}
    assert body(BATCH, bad) == [
        ("contacts.1.subscribed", 'must be true or false; got "t"', "invalid_type")
    ]
    deep = {
        "condition": {
            "groups": [{"filters": [], "conditions": {"groups": [{"filters": [[{"field": "x"}]]}]}}]
        }
    }
    assert body(UPDATE, deep) == [
        (
            "condition.groups.0.conditions.groups.0.filters.0",
            'must be an object; got [{"field": "x"}]',
            "invalid_type",
        )
    ]
    assert body(CREATE, {"name": "S", "track_membership": "1"}) == [
        ("trackMembership", 'must be true or false; got "1"', "invalid_type")
    ]


def test_lists_take_arrays_of_their_elements_only() -> None:
    assert body(MEMBERS, {"emails": "a@x.com"}) == [
        ("emails", 'must be an array; got "a@x.com"', "invalid_type")
    ]
    assert body(MEMBERS, {"emails": ["a", ["b", "c"], None, 5]}) == [
        ("emails.1", 'must be a string; got ["b", "c"]', "invalid_type"),
        ("emails.2", "must be a string; got null", "invalid_type"),
        ("emails.3", "must be a string; got 5", "invalid_type"),
    ]
    assert body(BATCH, {"contacts": {"email": "a"}}) == [
        ("contacts", 'must be an array; got {"email": "a"}', "invalid_type")
    ]
    assert body(BATCH, {"contacts": None}) == []


def test_messages_take_objects_and_free_form_fields_are_not_looked_into() -> None:
    assert body(CREATE, {"name": "S", "condition": "x"}) == [
        ("condition", 'must be an object; got "x"', "invalid_type")
    ]
    assert body(UPSERT, {"email": "a", "data": [1]}) == [
        ("data", "must be an object; got [1]", "invalid_type")
    ]
    free = {"subscribed": "yes", "groups": "x", "nested": {"emails": "a", "x": [[[]]]}}
    assert body(UPSERT, {"email": "a", "data": free}) == []
    value = {"field": "data.x", "operator": "equals", "value": {"subscribed": "no"}}
    assert body(CREATE, {"name": "S", "condition": {"groups": [{"filters": [value]}]}}) == []


def test_unknown_and_repeated_fields() -> None:
    assert body(UPSERT, {"email": "a", "subscribedd": True}) == [
        ("subscribedd", "unknown field", "unknown_field")
    ]
    assert body(BATCH, {"contacts": [{"email": "a", "tags": []}]}) == [
        ("contacts.0.tags", "unknown field", "unknown_field")
    ]
    assert body(UPSERT, b'{"email": "a", "email": "b"}') == [
        ("email", "is given more than once", "duplicate_field")
    ]
    assert body(CREATE, {"name": "S", "trackMembership": True, "track_membership": False}) == [
        ("trackMembership", "is given more than once", "duplicate_field")
    ]
    # A key spelled with escapes is the field it spells.
    assert body(UPSERT, b'{"email": "a", "subscrib\\u0065d": "no"}') == [
        ("subscribed", 'must be true or false; got "no"', "invalid_type")
    ]


def test_enums_take_their_exact_spellings() -> None:
    for value in ("SOMETIMES", "static", "TYPE_UNSPECIFIED", 2):
        assert body(CREATE, {"name": "S", "type": value}) == [
            ("type", f"must be one of DYNAMIC, STATIC; got {json.dumps(value)}", "invalid_enum")
        ]
    bad = {"groups": [{"filters": [{"field": "email", "operator": "isExactly"}]}]}
    [(field, message, code)] = body(CREATE, {"name": "S", "condition": bad})
    assert (field, code) == ("condition.groups.0.filters.0.operator", "invalid_enum")
    assert message.startswith("must be one of equals, notEquals, contains,")
    assert message.endswith('; got "isExactly"')


def test_strings_and_timestamps() -> None:
    assert body(CREATE, {"name": 5}) == [("name", "must be a string; got 5", "invalid_type")]
    for bad in ("yesterday", "2024-01-02", "2024-01-02T03:04:05", "2024-02-30T00:00:00Z", 5):
        assert body(INGEST, {"events": [{"email": "a", "event": "e", "occurredAt": bad}]}) == [
            ("events.0.occurredAt", TIMESTAMP_MESSAGE, "invalid_value")
        ]


def test_quoted_values_are_clipped() -> None:
    [(_, message, _)] = body(UPSERT, {"email": "a", "subscribed": "x" * 500})
    assert len(message) < 150 and message.endswith("\u2026")


@pytest.mark.parametrize(
    "raw",
    [
        b"{bad",
        b'{"email": "a",}',
        b'{"email": "a"} trailing',
        b'{"email": "\xff"}',
        b'{"email": "a", "data": {"x": NaN}}',
        b'{"email": "a", "data": {"x": -Infinity}}',
        b'{"email": "a", "data": {"x": 1e999}}',
        b'{"email": "a", "data": {"x": "\\ud800"}}',
        b'{"email": "a", "data": {"\\udc00": 1}}',
    ],
)
def test_malformed_json_is_one_violation_without_a_field(raw: bytes) -> None:
    [(field, message, code)] = body(UPSERT, raw)
    assert (field, code) == ("", "malformed_json")
    assert message.startswith("Malformed JSON: ")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"just a string"', b"5", b"null"])
def test_the_body_must_be_an_object(raw: bytes) -> None:
    assert body(CREATE, raw) == [("", "The request body must be a JSON object", "invalid_type")]


def test_nesting_past_the_limit_is_refused_without_exhausting_the_stack() -> None:
    condition: dict[str, Any] = {"groups": [{"filters": []}]}
    for _ in range(300):
        condition = {"groups": [{"conditions": condition}]}
    found = body(CREATE, {"name": "S", "condition": condition})
    assert found and {code for _, _, code in found} == {"too_deep"}
    assert found[0][1] == f"nests deeper than {MAX_DEPTH} levels"
    data = b'{"k":' * 100_000 + b"1" + b"}" * 100_000
    assert body(UPSERT, b'{"email": "a", "data": ' + data + b"}") == [
        ("", "The request body nests too deeply", "too_deep")
    ]


def test_fields_the_path_binds_cannot_be_set_by_the_body() -> None:
    assert body(UPDATE, {"id": "other", "name": "x"}, bound=("id",)) == [
        ("id", "conflicts with the id in the URL path", "conflict")
    ]
    assert body(UPDATE, {"name": "x"}, bound=("id",)) == []
    assert body(UPDATE, {"id": None}, bound=("id",)) == []


def test_query_parameters() -> None:
    assert query(LISTING, "page=2&pageSize=10", bound=("id",)) == []
    assert query(LISTING, "page=1&sort=email&sort_order=up", bound=("id",)) == [
        ("sort", "unknown query parameter", "unknown_field"),
        ("sort_order", "unknown query parameter", "unknown_field"),
    ]
    # Only the JSON names: the proto name the transcoder would also take is unknown here,
    # and named as it was sent.
    assert query(LISTING, "page_size=5", bound=("id",)) == [
        ("page_size", "unknown query parameter", "unknown_field")
    ]
    assert query(LISTING, "pageSize=x&page=1.5&page=99999999999", bound=("id",)) == [
        ("pageSize", 'must be a 32-bit integer; got "x"', "invalid_type"),
        ("page", 'must be a 32-bit integer; got "1.5"', "invalid_type"),
        ("page", 'must be a 32-bit integer; got "99999999999"', "invalid_type"),
    ]
    assert query(LISTING, "id=other", bound=("id",)) == [
        ("id", "conflicts with the id in the URL path", "conflict")
    ]
    # With `body: "*"` every field belongs to the body.
    assert query(UPSERT, "email=a@x.com", body_field="*") == [
        ("email", "unknown query parameter", "unknown_field")
    ]


def _scratch_message() -> Descriptor:
    """A message with the field types the API's requests do not use (yet)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (struct_pb2, wrappers_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
    T = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="scratch.proto",
        package="scratch",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto", "google/protobuf/struct.proto"],
    )
    message = file.message_type.add(name="Scratch")
    entry = message.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, json_name="key")
    entry.field.add(name="value", number=2, type=T.TYPE_INT64, json_name="value")
    for number, (name, kind, extra) in enumerate(
        [
            ("small", T.TYPE_INT32, {}),
            ("count", T.TYPE_UINT64, {}),
            ("ratio", T.TYPE_DOUBLE, {}),
            ("flag", T.TYPE_MESSAGE, {"type_name": ".google.protobuf.BoolValue"}),
            ("items", T.TYPE_MESSAGE, {"type_name": ".google.protobuf.ListValue"}),
            ("counts", T.TYPE_MESSAGE, {"type_name": ".scratch.Scratch.CountsEntry"}),
        ],
        start=1,
    ):
        label = T.LABEL_REPEATED if name == "counts" else T.LABEL_OPTIONAL
        message.field.add(name=name, number=number, type=kind, label=label, json_name=name, **extra)
    pool.AddSerializedFile(file.SerializeToString())
    return pool.FindMessageTypeByName("scratch.Scratch")


def test_numbers_wrappers_lists_and_maps() -> None:
    scratch = _scratch_message()
    good = {
        "small": "-5",
        "count": 18446744073709551615,
        "ratio": "NaN",
        "flag": False,
        "items": [1, "a"],
        "counts": {"a": 1, "b": "2"},
    }
    assert body(scratch, good) == []
    assert body(scratch, {"small": 2**31, "count": -1, "ratio": True}) == [
        ("small", "must be a 32-bit integer; got 2147483648", "invalid_type"),
        ("count", "must be a non-negative integer; got -1", "invalid_type"),
        ("ratio", "must be a number; got true", "invalid_type"),
    ]
    assert body(scratch, {"small": 1.5, "flag": "no", "items": {}, "counts": {"a": 1.5}}) == [
        ("small", "must be a 32-bit integer; got 1.5", "invalid_type"),
        ("flag", 'must be true or false; got "no"', "invalid_type"),
        ("items", "must be an array; got {}", "invalid_type"),
        ("counts.a", "must be an integer; got 1.5", "invalid_type"),
    ]
    assert body(scratch, {"small": 5.0, "counts": []}) == [
        ("counts", "must be an object; got []", "invalid_type")
    ]
