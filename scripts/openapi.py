"""Generate the OpenAPI 3.0 document of the REST surface (openapi/openapi.json) from the protos.

The protos are compiled with protoc (with their comments), and the document is derived from
the descriptors: every `google.api.http` binding is an operation, request and response
messages become JSON schemas with the transcoder's camelCase names, enums their JSON
spellings, and the well-known types their JSON mappings. What the descriptors cannot say
is in the small tables below: success statuses other than 200, the shape the service puts
into a few `google.protobuf.Value` fields, and the error contract
(segments_service/errors.py, docs/errors.md).

    python scripts/openapi.py                  # writes openapi/openapi.json
    python scripts/openapi.py --output FILE    # writes FILE instead ("-" for stdout)
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import google.api
import grpc_tools
from google.protobuf import descriptor_pb2

from segments_service.envoy_tables import OPENAPI_SERVER
from segments_service.errors import CONTRACT, ErrorSpec

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUTPUT = ROOT / "openapi" / "openapi.json"
PACKAGE = "segments.v1"
SERVICES = ("SegmentService", "ContactService", "EventService", "WebhookService")
# Envoy's default listener; Envoy serves the document with the URL it was fetched from.
ENVOY_ADDRESS = OPENAPI_SERVER

# Registers the google.api.http extension so that method options parse it.
_annotations = importlib.import_module("google.api.annotations_pb2")

FDP = descriptor_pb2.FieldDescriptorProto
Schema = dict[str, Any]

# Success statuses other than 200 (servicers.py sends them as x-http-status; the Envoy Lua
# filter applies them). Methods returning google.protobuf.Empty answer 204 without a body.
SUCCESS_STATUSES: dict[str, tuple[str, ...]] = {
    "CreateSegment": ("201",),
    "UpsertContact": ("201", "200"),
    "CreateWebhook": ("201",),
}
# Methods that can answer 409 (SEGMENT_IN_USE; ALREADY_EXISTS for an email taken).
CONFLICT_METHODS = {"DeleteSegment", "UpdateContact"}
SUCCESS_DESCRIPTIONS = {
    "201": "Created",
    "200": "OK",
}

# Methods answering google.api.HttpBody: the HTTP body is the message's `data` as it is, of
# this media type (the message's `content_type`), with these response headers (the
# server's initial metadata, passed on by the transcoder).
HTTP_BODIES: dict[str, tuple[str, Schema, dict[str, Schema]]] = {
    "ExportSegmentCsv": (
        "text/csv",
        {
            "type": "string",
            "description": "RFC 4180 CSV in UTF-8 (`text/csv; charset=utf-8`), CRLF line ends: "
            "the header row `id,email,subscribed,createdAt,updatedAt,data`, then one row per "
            "member in contact id order; `subscribed` is `true` or `false`, timestamps are "
            "RFC 3339 UTC as in the JSON, `data` is the contact's data as compact JSON. "
            "Streamed; a response that ends early (a stream reset, a connection closed "
            "before the last chunk) is incomplete and must be discarded.",
        },
        {
            "Content-Disposition": {
                "description": '`attachment; filename="segment-<id>.csv"`',
                "required": True,
                "schema": {"type": "string"},
            }
        },
    ),
}

# What the service puts into fields typed google.protobuf.Value (otherwise: any JSON).
VALUE_SCHEMAS: dict[str, Schema] = {
    f"{PACKAGE}.Segment.description": {"type": "string", "nullable": True},
    f"{PACKAGE}.Segment.status_reason": {"type": "string", "nullable": True},
    f"{PACKAGE}.Segment.condition": {
        "allOf": [{"$ref": "#/components/schemas/FilterCondition"}],
        "nullable": True,
    },
    f"{PACKAGE}.WebhookDelivery.last_error": {"type": "string", "nullable": True},
    f"{PACKAGE}.WebhookDelivery.next_attempt_at": {
        "type": "string",
        "format": "date-time",
        "nullable": True,
    },
    f"{PACKAGE}.ListContactsResponse.cursor": {"type": "string", "nullable": True},
    f"{PACKAGE}.Filter.value": {
        "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
        "description": "A JSON scalar; for window operators the number of units.",
    },
}

# String fields of requests that hold email addresses.
EMAIL_FIELDS = {"email", "emails"}

# One example request body per method: documentation, and what schemathesis sends first.
REQUEST_EXAMPLES: dict[str, Any] = {
    "CreateSegment": {
        "name": "Premium users",
        "description": "Paying customers on the premium plan",
        "type": "DYNAMIC",
        "condition": {
            "logic": "AND",
            "groups": [
                {
                    "filters": [
                        {"field": "data.plan", "operator": "equals", "value": "premium"},
                        {"field": "subscribed", "operator": "equals", "value": True},
                    ],
                    "conditions": {
                        "logic": "OR",
                        "groups": [
                            {
                                "filters": [
                                    {
                                        "field": "purchase",
                                        "operator": "triggeredWithin",
                                        "value": 30,
                                        "unit": "days",
                                    }
                                ]
                            },
                            {"filters": [{"field": "email.opened", "operator": "triggered"}]},
                        ],
                    },
                }
            ],
        },
        "trackMembership": True,
    },
    "UpdateSegment": {"name": "Premium users (EU)", "trackMembership": False},
    "AddSegmentMembers": {
        "emails": ["ada@example.com", "grace@example.com"],
        "createMissing": True,
        "subscribed": True,
    },
    "RemoveSegmentMembers": {"emails": ["ada@example.com"]},
    "PreviewSegment": {
        "condition": {
            "logic": "AND",
            "groups": [
                {"filters": [{"field": "data.plan", "operator": "equals", "value": "premium"}]}
            ],
        }
    },
    "UpdateContact": {"email": "ada.lovelace@example.com", "data": {"plan": "pro", "seats": None}},
    "UpsertContact": {
        "email": "ada@example.com",
        "subscribed": True,
        "data": {"plan": "premium", "seats": 5, "company": {"name": "Analytical Engines"}},
    },
    "BatchUpsertContacts": {
        "contacts": [
            {"email": "ada@example.com", "data": {"plan": "premium"}},
            {"email": "grace@example.com", "subscribed": False},
        ]
    },
    "Track": {
        "event": "purchase",
        "email": "grace@example.com",
        "data": {"amount": 99, "plan": "premium"},
    },
    "IngestEvents": {
        "events": [
            {
                "email": "ada@example.com",
                "event": "email.opened",
                "occurredAt": "2024-01-31T12:00:00Z",
                "data": {"campaign": "january"},
            },
            {"email": "grace@example.com", "event": "purchase", "data": {"amount": 20}},
        ]
    },
    "CreateWebhook": {"url": "https://hooks.example.com/segments"},
}


def _error_statuses() -> dict[str, str]:
    """Description of each error status: the situations of its codes in the contract."""
    statuses: dict[int, list[ErrorSpec]] = {}
    for spec in CONTRACT:
        statuses.setdefault(spec.http_status, []).append(spec)
    described = {}
    for status, specs in sorted(statuses.items()):
        text = "; ".join(
            f"{spec.situation[0].lower()}{spec.situation[1:]} ({spec.code})" for spec in specs
        )
        text = text[0].upper() + text[1:]
        if any(spec.retry_after is not None for spec in specs):
            text += "; retry after Retry-After seconds"
        described[str(status)] = text
    return described


# The error contract (segments_service/errors.py): every public code and HTTP status.
ERROR_STATUSES = _error_statuses()
ERROR_CODES = [spec.code for spec in CONTRACT]
RETRY_STATUSES = {str(spec.http_status) for spec in CONTRACT if spec.retry_after is not None}
# The answer to a method a path does not serve (no operation to list it under): described
# in the document's description and by the component response Error405, with `Allow`.
METHOD_NOT_ALLOWED = "405"

_SCALARS: dict[int, Schema] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1},
    # proto3 JSON prints 64-bit integers as strings.
    FDP.TYPE_INT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SINT64: {"type": "string", "format": "int64"},
    FDP.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FDP.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte"},
}

# The proto3 JSON mapping of the well-known types.
_WELL_KNOWN: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, UTC.",
    },
    ".google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    ".google.protobuf.Struct": {"type": "object", "additionalProperties": {}},
    ".google.protobuf.Value": {"description": "Any JSON value."},
    ".google.protobuf.ListValue": {"type": "array", "items": {}},
    ".google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    ".google.protobuf.StringValue": {"type": "string", "nullable": True},
    ".google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    ".google.protobuf.DoubleValue": {"type": "number", "nullable": True},
    ".google.protobuf.FloatValue": {"type": "number", "nullable": True},
    ".google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    ".google.protobuf.UInt32Value": {"type": "integer", "minimum": 0, "nullable": True},
    ".google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    ".google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    ".google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}


def compile_protos() -> descriptor_pb2.FileDescriptorSet:
    """protos/ compiled by protoc, with imports and comments (source info)."""
    common_protos = Path(google.api.__path__[0]).parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptor.pb"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{common_protos}",
                f"-I{well_known}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *protos,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"protoc failed ({done.returncode})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(text: str) -> str:
    lines = [line.removeprefix(" ").rstrip() for line in text.strip("\n").split("\n")]
    return "\n".join(lines).strip()


class Document:
    """Builds the OpenAPI document from one FileDescriptorSet."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}  # full name (fields: message.field) -> comment
        self.files = [f for f in fds.file if f.package == PACKAGE]
        for file in fds.file:
            self._index(file)
        self.schemas: dict[str, Schema] = {}
        # Messages only ever seen in responses: every field is printed (the transcoder
        # prints primitive fields always, the service sets every message field).
        self.response_only: set[str] = set()

    # -- descriptor index ------------------------------------------------------------

    def _index(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        comments = {
            tuple(loc.path): _comment(loc.leading_comments)
            for loc in file.source_code_info.location
            if loc.leading_comments.strip()
        }

        def walk(
            scope: str,
            path: tuple[int, ...],
            messages: Iterable[descriptor_pb2.DescriptorProto],
            enums: Iterable[descriptor_pb2.EnumDescriptorProto],
            message_tag: int,
            enum_tag: int,
        ) -> None:
            for i, enum in enumerate(enums):
                name = f"{scope}.{enum.name}"
                self.enums[name] = enum
                enum_path = (*path, enum_tag, i)
                self.comments[name] = comments.get(enum_path, "")
                for j, value in enumerate(enum.value):
                    self.comments[f"{name}.{value.name}"] = comments.get((*enum_path, 2, j), "")
            for i, message in enumerate(messages):
                name = f"{scope}.{message.name}"
                self.messages[name] = message
                message_path = (*path, message_tag, i)
                self.comments[name] = comments.get(message_path, "")
                for j, field in enumerate(message.field):
                    self.comments[f"{name}.{field.name}"] = comments.get((*message_path, 2, j), "")
                walk(name, message_path, message.nested_type, message.enum_type, 3, 4)

        walk(f".{file.package}", (), file.message_type, file.enum_type, 4, 5)
        for i, service in enumerate(file.service):
            name = f".{file.package}.{service.name}"
            self.comments[name] = comments.get((6, i), "")
            for j, method in enumerate(service.method):
                self.comments[f"{name}.{method.name}"] = comments.get((6, i, 2, j), "")

    @staticmethod
    def component_name(full_name: str) -> str:
        """`.segments.v1.Filter.Operator` -> `Filter.Operator`."""
        return full_name.removeprefix(f".{PACKAGE}.")

    def _reachable(self, roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in seen or name not in self.messages or name in _WELL_KNOWN:
                continue
            seen.add(name)
            for field in self.messages[name].field:
                if field.type == FDP.TYPE_MESSAGE:
                    todo.append(field.type_name)
                key = f"{name}.{field.name}".removeprefix(".")
                if key in VALUE_SCHEMAS:
                    todo.extend(_refs(VALUE_SCHEMAS[key]))
        return seen

    # -- schemas -----------------------------------------------------------------------

    def field_schema(self, message_name: str, field: descriptor_pb2.FieldDescriptorProto) -> Schema:
        key = f"{message_name}.{field.name}".removeprefix(".")
        if key in VALUE_SCHEMAS:
            schema = json.loads(json.dumps(VALUE_SCHEMAS[key]))
            for ref in _refs(schema):
                self.message_ref(ref)
        elif field.type == FDP.TYPE_MESSAGE:
            entry = self.messages.get(field.type_name)
            if entry is not None and entry.options.map_entry:
                value = next(f for f in entry.field if f.name == "value")
                return {
                    "type": "object",
                    "additionalProperties": self.field_schema(field.type_name, value),
                    **self._description(key),
                }
            schema = self.message_ref(field.type_name)
        elif field.type == FDP.TYPE_ENUM:
            schema = self.enum_ref(field.type_name)
        else:
            schema = dict(_SCALARS[field.type])
            if field.name in EMAIL_FIELDS and message_name not in self.response_only:
                # What callers send; responses carry the stored (normalized) form.
                schema["format"] = "email"
        if field.label == FDP.LABEL_REPEATED:
            schema = {"type": "array", "items": schema}
        description = self._description(key)
        if description and "$ref" in schema:
            # Siblings of $ref are ignored in OpenAPI 3.0; allOf keeps the description.
            schema = {"allOf": [schema]}
        return {**schema, **description}

    def _description(self, key: str) -> dict[str, str]:
        text = self.comments.get(f".{key}", "")
        return {"description": text} if text else {}

    def message_ref(self, full_name: str) -> Schema:
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        name = self.component_name(full_name)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder: recursion (FilterGroup.conditions)
            self.schemas[name] = self.message_schema(full_name)
        return {"$ref": f"#/components/schemas/{name}"}

    def message_schema(self, full_name: str, *, skip: Iterable[str] = ()) -> Schema:
        message = self.messages[full_name]
        skipped = set(skip)
        fields = [f for f in message.field if f.name not in skipped]
        schema: Schema = {"type": "object"}
        description = self.comments.get(full_name, "")
        if description:
            schema["description"] = description
        schema["properties"] = {f.json_name: self.field_schema(full_name, f) for f in fields}
        if full_name in self.response_only and fields:
            schema["required"] = [f.json_name for f in fields]
        # Responses have no other fields, and requests may have none (the service refuses
        # them before the transcoder, which would ignore them, reads the body).
        schema["additionalProperties"] = False
        return schema

    def enum_ref(self, full_name: str) -> Schema:
        name = self.component_name(full_name)
        if name not in self.schemas:
            enum = self.enums[full_name]
            values = [
                v for v in enum.value if not (v.number == 0 and v.name.endswith("_UNSPECIFIED"))
            ]
            lines = [
                f"- `{v.name}`: {self.comments.get(f'{full_name}.{v.name}', '')}" for v in values
            ]
            description = self.comments.get(full_name, "")
            self.schemas[name] = {
                "type": "string",
                "enum": [v.name for v in values],
                "description": "\n".join(filter(None, [description, *lines])),
            }
        return {"$ref": f"#/components/schemas/{name}"}

    # -- operations --------------------------------------------------------------------

    def bindings(self) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto, Any]]:
        for file in self.files:
            for service in file.service:
                if service.name not in SERVICES:
                    continue
                for method in service.method:
                    if not method.options.HasExtension(_annotations.http):
                        continue
                    rule = method.options.Extensions[_annotations.http]
                    for binding in [rule, *rule.additional_bindings]:
                        yield f".{file.package}.{service.name}", method, binding

    def operation(
        self, service: str, method: descriptor_pb2.MethodDescriptorProto, binding: Any
    ) -> tuple[str, str, Schema]:
        verb = binding.WhichOneof("pattern")
        if verb == "custom":
            http_method, template = binding.custom.kind.lower(), binding.custom.path
        else:
            http_method, template = verb, getattr(binding, verb)
        request = self.messages[method.input_type]
        by_name = {f.name: f for f in request.field}
        path_fields = re.findall(r"\{([^}=]+)(?:=[^}]*)?\}", template)
        path = re.sub(
            r"\{([^}=]+)(?:=[^}]*)?\}",
            lambda m: "{" + _json_path(m.group(1), by_name) + "}",
            template,
        )
        comment = self.comments.get(f"{service}.{method.name}", "")
        op: Schema = {
            "operationId": method.name,
            "tags": [self.component_name(service)],
            "summary": _first_sentence(comment) if comment else method.name,
        }
        if comment:
            op["description"] = comment
        parameters: list[Schema] = []
        for name in path_fields:
            field = by_name[name.split(".")[0]]
            parameters.append(
                {
                    "name": _json_path(name, by_name),
                    "in": "path",
                    "required": True,
                    "schema": self.field_schema(method.input_type, field),
                }
            )
        bound = {name.split(".")[0] for name in path_fields}
        if binding.body == "*":
            body_schema = self.message_schema(method.input_type, skip=bound)
            name = self.component_name(method.input_type)
            if bound:
                name += "Body"
            self.schemas[name] = body_schema
            # Optional: the transcoder reads a missing body as an empty message (an empty
            # batch, say); what is missing then is reported like any other field.
            media: Schema = {"schema": {"$ref": f"#/components/schemas/{name}"}}
            if method.name in REQUEST_EXAMPLES:
                media["example"] = REQUEST_EXAMPLES[method.name]
            op["requestBody"] = {"content": {"application/json": media}}
            bound = {f.name for f in request.field}
        elif binding.body:
            field = by_name[binding.body]
            op["requestBody"] = {
                "content": {
                    "application/json": {"schema": self.field_schema(method.input_type, field)}
                },
            }
            bound.add(binding.body)
        for field in request.field:
            if field.name in bound or field.type == FDP.TYPE_MESSAGE:
                continue
            schema = self.field_schema(method.input_type, field)
            description = schema.pop("description", None)
            parameter: Schema = {"name": field.json_name, "in": "query", "schema": schema}
            if description:
                parameter["description"] = description
            if field.label == FDP.LABEL_REPEATED:
                parameter.update(style="form", explode=True)
            parameters.append(parameter)
        if parameters:
            op["parameters"] = parameters
        op["responses"] = self.responses(method, binding, bool(path_fields), http_method)
        return path, http_method, op

    def responses(
        self,
        method: descriptor_pb2.MethodDescriptorProto,
        binding: Any,
        has_path_params: bool,
        http_method: str,
    ) -> Schema:
        request_id = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
        responses: Schema = {}
        if method.output_type == ".google.protobuf.Empty":
            responses["204"] = {"description": "No Content", "headers": request_id}
        elif method.output_type == ".google.api.HttpBody":
            media_type, body, headers = HTTP_BODIES[method.name]
            responses["200"] = {
                "description": SUCCESS_DESCRIPTIONS["200"],
                "headers": {**request_id, **headers},
                "content": {media_type: {"schema": body}},
            }
        else:
            output = self.messages[method.output_type]
            if binding.response_body:
                field = next(f for f in output.field if f.name == binding.response_body)
                schema = self.field_schema(method.output_type, field)
            else:
                schema = self.message_ref(method.output_type)
            for status in SUCCESS_STATUSES.get(method.name, ("200",)):
                responses[status] = {
                    "description": SUCCESS_DESCRIPTIONS[status],
                    "headers": request_id,
                    "content": {"application/json": {"schema": schema}},
                }
        statuses = ["400", "401"]
        if has_path_params:
            statuses.append("404")
        if method.name in CONFLICT_METHODS:
            statuses.append("409")
        if binding.body:
            statuses.append("413")
        statuses += ["429", "500", "503", "504"]
        for status in statuses:
            responses[status] = {"$ref": f"#/components/responses/Error{status}"}
        return responses

    # -- document ----------------------------------------------------------------------

    def build(self) -> Schema:
        inputs = {m.input_type for _, m, _ in self.bindings()}
        outputs = {m.output_type for _, m, _ in self.bindings()}
        self.response_only = self._reachable(outputs) - self._reachable(inputs)
        paths: dict[str, Schema] = {}
        for service, method, binding in self.bindings():
            path, http_method, op = self.operation(service, method, binding)
            paths.setdefault(path, {})[http_method] = op
        paths["/openapi.json"] = {
            "get": {
                "operationId": "GetOpenApiDocument",
                "tags": ["Meta"],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document of the REST surface",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        }
        self.schemas.update(_error_schemas())
        tags = [
            {"name": self.component_name(f".{PACKAGE}.{s}"), "description": c}
            for s in SERVICES
            if (c := self.comments.get(f".{PACKAGE}.{s}", ""))
        ]
        return {
            "openapi": "3.0.3",
            "info": {
                "title": "Segments API",
                "version": PACKAGE.rsplit(".", 1)[1],
                "description": (
                    "REST surface of the segments service (through Envoy's gRPC-JSON "
                    "transcoder), generated from protos/ by scripts/openapi.py. Secret keys "
                    "(`sk_...`) authorize every operation except `POST /v1/track`, which "
                    "takes a public key (`pk_...`). Every error has the one envelope "
                    "`ErrorEnvelope`. A method a path does not serve (`PUT /segments/{id}`) "
                    "is answered 405 `METHOD_NOT_ALLOWED` with the path's methods in the "
                    "`Allow` header (the response `Error405`); an unknown path 404. Query "
                    "parameters are spelled as documented (`pageSize`, not `page_size`). "
                    "`servers` names the address the document was fetched from."
                ),
            },
            "servers": [{"url": ENVOY_ADDRESS}],
            "security": [{"bearerAuth": []}],
            "tags": [*tags, {"name": "Meta", "description": "About the API itself."}],
            "paths": dict(sorted(paths.items())),
            "components": {
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`Authorization: Bearer <key>`: a secret key `sk_...`, "
                        "or a public key `pk_...` for `POST /v1/track`.",
                    }
                },
                "headers": {
                    "X-Request-Id": {
                        "description": "Id of this request (also `error.requestId`).",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    "Retry-After": {
                        "description": "Seconds to wait before retrying.",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    "Allow": {
                        "description": "The methods the path serves, e.g. `DELETE, GET, PATCH`.",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                },
                "responses": _error_responses(),
                "schemas": dict(sorted(self.schemas.items())),
            },
        }


def _first_sentence(comment: str) -> str:
    text = " ".join(comment.split())
    return re.split(r"(?<=[.;:])\s", text, maxsplit=1)[0].rstrip(".;:")


def _json_path(proto_path: str, fields: dict[str, descriptor_pb2.FieldDescriptorProto]) -> str:
    head, _, rest = proto_path.partition(".")
    name = fields[head].json_name if head in fields else head
    return f"{name}.{rest}" if rest else name


def _refs(schema: Any) -> Iterator[str]:
    """Full message names of the components a schema refers to."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str):
                yield f".{PACKAGE}." + value.rsplit("/", 1)[1]
            else:
                yield from _refs(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _refs(item)


def _error_schemas() -> dict[str, Schema]:
    return {
        "ErrorEnvelope": {
            "type": "object",
            "description": "The one shape of every error (docs/errors.md).",
            "required": ["success", "error", "timestamp"],
            "additionalProperties": False,
            "properties": {
                "success": {"type": "boolean", "enum": [False]},
                "error": {"$ref": "#/components/schemas/Error"},
                "timestamp": {"type": "string", "format": "date-time"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["code", "message", "statusCode", "requestId"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": ERROR_CODES},
                "message": {"type": "string", "minLength": 1},
                "statusCode": {"type": "integer", "minimum": 400, "maximum": 599},
                "requestId": {"type": "string", "minLength": 1},
                "errors": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/components/schemas/FieldError"},
                },
            },
        },
        "FieldError": {
            "type": "object",
            "required": ["field", "message", "code"],
            "additionalProperties": False,
            "properties": {
                "field": {
                    "type": "string",
                    "description": "Dot path into the request, e.g. "
                    "`condition.groups.1.filters.0.operator`.",
                },
                "message": {"type": "string"},
                "code": {"type": "string"},
            },
        },
    }


def _error_responses() -> dict[str, Schema]:
    responses: dict[str, Schema] = {}
    for status, description in ERROR_STATUSES.items():
        headers: Schema = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
        if status in RETRY_STATUSES:
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if status == METHOD_NOT_ALLOWED:
            headers["Allow"] = {"$ref": "#/components/headers/Allow"}
        responses[f"Error{status}"] = {
            "description": description,
            "headers": headers,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
            },
        }
    return responses


def build_document(fds: descriptor_pb2.FileDescriptorSet | None = None) -> Schema:
    return Document(fds if fds is not None else compile_protos()).build()


def render(document: Schema) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(OUTPUT), help="file to write, - for stdout")
    args = parser.parse_args()
    text = render(build_document())
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
