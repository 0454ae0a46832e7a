"""What Envoy's Lua filter needs to know, as Lua tables generated into Envoy's config:
the error contract's gateway codes and retry delays (errors.CONTRACT), where the OpenAPI
document is served and the `servers` URL it is generated with, and from the descriptor set
the HTTP rules whose `response_body` the filter unwraps."""

from __future__ import annotations

import json
import math
import re

from google.protobuf import descriptor_pb2

from segments_service.errors import CONTRACT, ERRORS, FALLBACK_CODE, ErrorSpec
from segments_service.rest_check import (
    OPENAPI_PATH,
    http_bindings,
    literal_segments,
    path_pattern,
)

# The `servers` URL of the OpenAPI document as generated (scripts/openapi.py): Envoy's
# default listener. The Lua filter puts the URL a caller fetched the document from in its
# place.
OPENAPI_SERVER = "http://127.0.0.1:8080"

# The API's gRPC services: the ones Envoy transcodes.
SERVICES = (
    "segments.v1.SegmentService",
    "segments.v1.ContactService",
    "segments.v1.EventService",
    "segments.v1.WebhookService",
)


def gateway_codes() -> dict[int, ErrorSpec]:
    """The contract's code for each HTTP status Envoy may answer without the service's
    envelope (its own local replies, a gRPC error the service did not explain)."""
    return {spec.http_status: spec for spec in CONTRACT if spec.gateway_default}


def _lua_escape(text: str) -> str:
    """`text` as a Lua pattern matching itself (magic characters quoted with %)."""
    return re.sub(r"([\^$()%.\[\]*+\-?])", r"%\1", text)


def _lua_path_pattern(template: str) -> str:
    """Anchored Lua pattern for a google.api.http path template such as /segments/{id}."""
    pattern, _ = path_pattern(template, _lua_escape)
    # The transcoder also routes a trailing slash to the method; unwrap that too.
    return "^" + pattern + "/?$"


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
    for _, method, binding, http_method, template in http_bindings(fds.file):
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


def streamed_bindings(fds: descriptor_pb2.FileDescriptorSet) -> list[tuple[str, str, str]]:
    """(RPC name, HTTP method, anchored RE2 path pattern) of every HTTP binding of a
    server-streaming method (GET /segments/{id}/export): each gets a route of its own,
    without the request timeout of the other REST routes (envoy_config)."""
    found = []
    for _, method, _, http_method, template in http_bindings(fds.file):
        if method.server_streaming:
            pattern, _ = path_pattern(template, re.escape)
            # The transcoder also routes a trailing slash to the method.
            found.append((method.name, http_method, f"{pattern}/?"))
    return found


def get_paths_pattern(fds: descriptor_pb2.FileDescriptorSet) -> str:
    """An RE2 pattern matching the paths of every GET binding (trailing slash included, as
    the transcoder takes it): the paths a GET without a query string may go to the
    transcoder on without the service's check (envoy_config). A GET of any other path is
    checked, so that one whose path serves other methods is a 405."""
    found = dict.fromkeys(
        path_pattern(template, re.escape)[0]
        for _, _, _, http_method, template in http_bindings(fds.file)
        if http_method == "GET"
    )
    return "(?:" + "|".join(found) + ")/?"


def shadowing_paths_pattern(fds: descriptor_pb2.FileDescriptorSet) -> str | None:
    """An RE2 pattern matching the literal paths of bindings (POST /contacts/batch) that a
    less specific template also takes (GET /contacts/{id}), None when there are none. Those
    paths are served by the literal binding's methods alone (rest_check.RestCheck.serving),
    so a GET of them is checked (a 405) even where GET is bound on the other template."""
    templates = {template for _, _, _, _, template in http_bindings(fds.file)}
    patterns = {t: re.compile(path_pattern(t, re.escape)[0]) for t in templates}

    shadowing = []
    for template in sorted(templates):
        literal = not re.search(r"[{*]", template)
        # A path the template takes: itself, or with each variable and wildcard a segment.
        sample = template if literal else re.sub(r"\{[^}]*\}|\*\*|\*", "x", template)
        shadowed = [
            other
            for other in templates
            if literal_segments(other) < literal_segments(template)
            and patterns[other].fullmatch(sample)
        ]
        if shadowed and not literal:
            # Envoy would need a pattern of the paths both take; none of the API needs one.
            raise ValueError(f"{template} overlaps {shadowed}: only literal paths may")
        if shadowed:
            shadowing.append(re.escape(template))
    return "(?:" + "|".join(shadowing) + ")/?" if shadowing else None


def _lua_string(text: str) -> str:
    # Decimal byte escapes for anything but printable ASCII keep the literal valid Lua 5.1.
    return (
        '"'
        + "".join(
            chr(b) if 32 <= b < 127 and chr(b) not in '"\\' else f"\\{b:03d}" for b in text.encode()
        )
        + '"'
    )


def lua_tables(fds: descriptor_pb2.FileDescriptorSet) -> str:
    """The Lua tables envoy/filter.lua reads, as Lua source: from the error contract, and
    from `fds`, whose `response_body` options are removed on the way (see
    strip_response_bodies)."""
    unwraps = strip_response_bodies(fds)
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
    lines += [
        "}",
        f"OPENAPI_PATH = {_lua_string(OPENAPI_PATH)}",
        f"OPENAPI_SERVER = {_lua_string(json.dumps(OPENAPI_SERVER))}",
        "UNWRAP = {",
    ]
    for method, pattern, field in unwraps:
        lines.append(
            f"  {{ method = {_lua_string(method)}, pattern = {_lua_string(pattern)},"
            f" field = {_lua_string(field)} }},"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
