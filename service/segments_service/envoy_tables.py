"""What Envoy's Lua filter needs to know, as Lua tables generated into Envoy's config:
the error contract's gateway codes and retry delays (errors.CONTRACT), and from the
descriptor set the JSON spellings of enums, the HTTP rules whose `response_body` the
filter unwraps, and the request fields whose JSON shape it checks."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2

from segments_service.errors import CONTRACT, ERRORS, FALLBACK_CODE, ErrorSpec

# The API's gRPC services: the ones Envoy transcodes.
SERVICES = (
    "segments.v1.SegmentService",
    "segments.v1.ContactService",
    "segments.v1.EventService",
)

# Registers the google.api.http option so descriptor options parse it; imported by name
# because googleapis-common-protos ships no type information.
_annotations = importlib.import_module("google.api.annotations_pb2")


def gateway_codes() -> dict[int, ErrorSpec]:
    """The contract's code for each HTTP status Envoy may answer without the service's
    envelope (its own local replies, a gRPC error the service did not explain)."""
    return {spec.http_status: spec for spec in CONTRACT if spec.gateway_default}


def _enum_values(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, list[str]]:
    """Accepted JSON spellings of every enum, keyed by full name, so that the Lua filter
    can say which values a bad enum field accepts."""
    enums: dict[str, list[str]] = {}

    def walk(
        scope: str,
        enum_types: Iterable[descriptor_pb2.EnumDescriptorProto],
        messages: Iterable[descriptor_pb2.DescriptorProto],
    ) -> None:
        for enum in enum_types:
            enums[f"{scope}.{enum.name}"] = [
                v.name
                for v in enum.value
                if not (v.number == 0 and v.name.endswith("_UNSPECIFIED"))
            ]
        for message in messages:
            walk(f"{scope}.{message.name}", message.enum_type, message.nested_type)

    # Only the API's own package: requests cannot contain google.protobuf enums.
    packages = {service.rpartition(".")[0] for service in SERVICES}
    for file in fds.file:
        if file.package in packages:
            walk(file.package, file.enum_type, file.message_type)
    return enums


def _lua_path_pattern(template: str) -> str:
    """Anchored Lua pattern for a google.api.http path template such as /segments/{id}."""

    def segments(text: str) -> str:
        out = []
        for segment in text.split("/"):
            if segment == "**":
                out.append(".+")
            elif segment == "*":
                out.append("[^/]+")
            else:
                out.append(re.sub(r"([\^$()%.\[\]*+\-?])", r"%\1", segment))
        return "/".join(out)

    pattern = []
    for token in re.split(r"(\{[^}]*\})", template):
        if token.startswith("{"):
            _, _, inner = token[1:-1].partition("=")
            pattern.append(segments(inner) if inner else "[^/]+")
        else:
            pattern.append(segments(token))
    # The transcoder also routes a trailing slash to the method; unwrap that too.
    return "^" + "".join(pattern) + "/?$"


def _http_bindings(
    fds: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[descriptor_pb2.MethodDescriptorProto, Any, str, str]]:
    """(method, google.api.HttpRule, HTTP method, path template) of every HTTP binding,
    additional bindings included."""
    for file in fds.file:
        for service in file.service:
            for method in service.method:
                if not method.options.HasExtension(_annotations.http):
                    continue
                rule = method.options.Extensions[_annotations.http]
                for binding in [rule, *rule.additional_bindings]:
                    verb = binding.WhichOneof("pattern")
                    if verb == "custom":
                        yield method, binding, binding.custom.kind, binding.custom.path
                    elif verb is not None:
                        yield method, binding, verb.upper(), getattr(binding, verb)


def strip_response_bodies(
    fds: descriptor_pb2.FileDescriptorSet,
) -> list[tuple[str, str, str]]:
    """Removes every `response_body` from the HTTP rules (Envoy 1.40 refuses to start on
    one naming a non-HttpBody field) and returns (method, path pattern, JSON field) for
    the Lua filter, which then unwraps that field itself."""
    messages = {
        f".{file.package}.{message.name}": message
        for file in fds.file
        for message in file.message_type
    }
    unwraps: list[tuple[str, str, str]] = []
    for method, binding, http_method, template in _http_bindings(fds):
        if not binding.response_body:
            continue
        output = messages.get(method.output_type)
        json_name = next(
            (
                f.json_name
                for f in (output.field if output else [])
                if f.name == binding.response_body and f.json_name
            ),
            binding.response_body,
        )
        unwraps.append((http_method, _lua_path_pattern(template), json_name))
        binding.response_body = ""
    return unwraps


@dataclass(frozen=True)
class _Checked:
    """A request field whose JSON shape the Lua filter checks: a bool, a repeated field (an
    array, never a lone value or nested arrays), or a message field, whose own fields are
    those of `message` in the table of messages."""

    json_name: str
    repeated: bool = False
    message: str | None = None  # full name, without the leading dot
    boolean: bool = False
    element: str = "must be true or false"  # what the value (or each element) must be


_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_ELEMENT = {
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "must be a string",
    _BOOL: "must be true or false",
    _MESSAGE: "must be an object",
}


def _shapes(
    fds: descriptor_pb2.FileDescriptorSet,
) -> tuple[dict[str, dict[str, _Checked]], list[tuple[str, str, str]]]:
    """The shape checks of request bodies, for the Lua filter: per message, its fields to
    check by JSON key; and (method, path pattern, request message) of each HTTP rule with
    body "*". Envoy's JSON parser takes strings such as "no" or "1" for a bool, a lone
    value for a list and flattens nested arrays into one; the API makes each a 400
    (docs/errors.md).
    Never looks into google.protobuf types: the free-form Struct/Value fields (`data`,
    `value`) may hold anything."""
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}

    def index(scope: str, types: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for message in types:
            messages[f"{scope}.{message.name}"] = message
            index(f"{scope}.{message.name}", message.nested_type)

    for file in fds.file:
        index(f".{file.package}" if file.package else "", file.message_type)

    checked: dict[str, dict[str, _Checked]] = {}

    def visit(name: str) -> None:
        if name in checked:
            return
        found: dict[str, _Checked] = {}
        checked[name] = found  # before the fields: messages may nest themselves
        for field in messages[name].field:
            nested = messages.get(field.type_name)
            repeated = field.label == _REPEATED
            json_name = field.json_name or field.name
            if field.type_name.startswith(".google.protobuf."):
                if field.type_name != ".google.protobuf.BoolValue":
                    continue  # free-form (Struct, Value) or a wrapper of a checked scalar
                node = _Checked(json_name, repeated, boolean=True)
            elif field.type == _MESSAGE and nested is not None and not nested.options.map_entry:
                visit(field.type_name)
                node = _Checked(
                    json_name, repeated, field.type_name[1:], element=_ELEMENT[_MESSAGE]
                )
            elif field.type == _BOOL or repeated:
                # A list of strings, numbers or enums: the transcoder checks each element's
                # type; the filter only that it is an array of them.
                element = _ELEMENT.get(field.type, "must not be an array")
                node = _Checked(json_name, repeated, boolean=field.type == _BOOL, element=element)
            else:
                continue
            # The transcoder accepts the proto name as well as the JSON name.
            found[field.name] = found[json_name] = node

    rules: list[tuple[str, str, str]] = []
    for method, binding, http_method, template in _http_bindings(fds):
        if binding.body == "*" and method.input_type in messages:
            visit(method.input_type)
            rules.append((http_method, _lua_path_pattern(template), method.input_type[1:]))
    return {name[1:]: fields for name, fields in checked.items()}, rules


def _lua_string(text: str) -> str:
    # Decimal byte escapes for anything but printable ASCII keep the literal valid Lua 5.1.
    return (
        '"'
        + "".join(
            chr(b) if 32 <= b < 127 and chr(b) not in '"\\' else f"\\{b:03d}" for b in text.encode()
        )
        + '"'
    )


def _lua_checked(fields: dict[str, _Checked]) -> str:
    items = []
    for key, node in fields.items():
        inner = f"name = {_lua_string(node.json_name)}, element = {_lua_string(node.element)}"
        if node.repeated:
            inner += ", repeated = true"
        if node.boolean:
            inner += ", bool = true"
        if node.message is not None:
            inner += f", message = {_lua_string(node.message)}"
        items.append(f"[{_lua_string(key)}] = {{ {inner} }}")
    return "{ " + ", ".join(items) + " }"


def lua_tables(fds: descriptor_pb2.FileDescriptorSet) -> str:
    """The Lua tables envoy/filter.lua reads, as Lua source: from the error contract, and
    from `fds`, whose `response_body` options are removed on the way (see
    strip_response_bodies)."""
    unwraps = strip_response_bodies(fds)
    enums = _enum_values(fds)
    messages, rules = _shapes(fds)
    gateway = gateway_codes()
    lines = [
        "-- Generated by scripts/generate.py from the error contract (segments_service/errors.py)",
        "-- and protos/; the code that reads these tables is envoy/filter.lua.",
        "GATEWAY_CODES = {",
    ]
    for status, spec in sorted(gateway.items()):
        lines.append(f"  [{status}] = {_lua_string(spec.code)},")
    lines += ["}", f"FALLBACK_CODE = {_lua_string(ERRORS[FALLBACK_CODE].code)}", "RETRY_AFTER = {"]
    for status, spec in sorted(gateway.items()):
        if spec.retry_after is not None:
            lines.append(f"  [{status}] = {_lua_string(str(math.ceil(spec.retry_after)))},")
    lines += ["}", "ENUM_VALUES = {"]
    for name, values in sorted(enums.items()):
        lines.append(f"  [{_lua_string(name)}] = {_lua_string(', '.join(values))},")
    lines += ["}", "UNWRAP = {"]
    for method, pattern, field in unwraps:
        lines.append(
            f"  {{ method = {_lua_string(method)}, pattern = {_lua_string(pattern)},"
            f" field = {_lua_string(field)} }},"
        )
    lines += ["}", "MESSAGES = {"]
    for name, fields in sorted(messages.items()):
        lines.append(f"  [{_lua_string(name)}] = {_lua_checked(fields)},")
    lines += ["}", "SHAPE_RULES = {"]
    for method, pattern, message in rules:
        lines.append(
            f"  {{ method = {_lua_string(method)}, pattern = {_lua_string(pattern)},"
            f" message = {_lua_string(message)} }},"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
