"""Envoy's configuration as committed in envoy/envoy.json (scripts/generate.py writes it):
one listener for REST (checked by the service, transcoded to gRPC, errors in the envelope
of docs/errors.md) and native gRPC (passed through untouched), in front of a cluster of
gRPC replicas.

The committed file is a working default (listener 127.0.0.1:8080, one replica on
127.0.0.1:50051, a 30 s request budget, 1 MiB bodies; paths relative to the repository
root: `envoy -c envoy/envoy.json --disable-hot-restart` run there serves `make run`'s
first replica). envoy_proxy.render_config fills in the ports, replicas, limits and
absolute paths of a real start; nothing else is decided at run time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from segments_service.envoy_tables import (
    SERVICES,
    gateway_codes,
    get_paths_pattern,
    lua_tables,
    shadowing_paths_pattern,
    streamed_bindings,
)
from segments_service.errors import FALLBACK_CODE, ErrorSpec
from segments_service.rest_check import ENVELOPE_BODY_HEADER, OPENAPI_PATH
from segments_service.rpc import REST_HEADER

CLUSTER = "segments_grpc"
# Files of the repository the configuration refers to, relative to its root.
CONFIG_FILE = Path("envoy") / "envoy.json"
DESCRIPTOR_FILE = Path("envoy") / "segments.pb"
LUA_FILE = Path("envoy") / "filter.lua"
OPENAPI_FILE = Path("openapi") / "openapi.json"
LUA_FILTER = "envoy.filters.http.lua"
BUFFER_FILTER = "envoy.filters.http.buffer"
CHECK_FILTER = "envoy.filters.http.ext_authz"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
STREAM_END_FILTER = "envoy.filters.http.ext_proc"
# Routes by name: native gRPC, GET /openapi.json, REST GETs without a query string (nothing
# for the service to check before transcoding), and everything else (REST). Streamed REST
# responses (server-streaming RPCs with an HTTP binding) have one route each, named
# STREAM_ROUTE_PREFIX + the RPC's name, before those.
GRPC_ROUTE, OPENAPI_ROUTE, REST_GET_ROUTE, REST_ROUTE = "grpc", "openapi", "rest_get", "rest"
# Literal paths a less specific binding also takes (/contacts/batch, also a
# /contacts/{id}): every request of them is checked, a GET without a query string too.
REST_SHADOWING_ROUTE = "rest_literal"
REST_ROUTES = (REST_SHADOWING_ROUTE, REST_GET_ROUTE, REST_ROUTE)
STREAM_ROUTE_PREFIX = "rest_stream:"
# How long Envoy waits for the service's answer to a streamed response's trailers
# (rest_stream_end.py) before resetting the stream as if it had ended in an error.
STREAM_END_TIMEOUT = "5s"
# A streamed REST response with nothing moving either way for this long is reset. The
# service closes an export whose reader took nothing for 60 s (streams.EXPORT_IDLE_SECONDS)
# itself, but its status can only follow the rows the reader has not taken: this ends a
# stream whose reader never reads again (and its call, and the call's stream share).
STREAM_IDLE_TIMEOUT = "90s"
# What the service is sent of a streamed response: its trailers, nothing else.
STREAM_END_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SEND",
}
# How long Envoy waits for the service's check of a REST request (rest_check.py) before
# answering 503: parsing a 1 MiB body takes milliseconds.
CHECK_TIMEOUT = "5s"
# The transcoder buffers each response whole and answers 500 beyond this; GET /segments of
# a big project, or a page of contacts with large `data`, can exceed its 1 MiB default.
MAX_RESPONSE_BYTES = 64 << 20
# The HTTP/2 window of each upstream stream (see the cluster below): as much as Envoy buffers
# of a response for its caller (per_connection_buffer_limit_bytes' default).
UPSTREAM_STREAM_WINDOW = 1 << 20
# The service answers 504 DEADLINE_EXCEEDED itself when its budget (SEGMENTS_REQUEST_TIMEOUT)
# runs out; Envoy's own timeout of REST requests waits this much longer, so that the
# service's answer, with its request id, is the one the caller gets.
REST_TIMEOUT_MARGIN = 2.0

# Instructions an RE2 pattern of a route may compile to (Envoy's default: 100).
RE2_MAX_PROGRAM_SIZE = 1000

# The defaults written into the committed file (those of `make run`).
DEFAULT_LISTENER = {"address": "127.0.0.1", "port_value": 8080}
DEFAULT_UPSTREAM = {"address": "127.0.0.1", "port_value": 50051}
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


def rest_timeout(request_timeout: float) -> str:
    """Envoy's route timeout of REST requests for the service's budget per request."""
    return f"{request_timeout + REST_TIMEOUT_MARGIN:.3f}s"


def too_large_message(max_request_bytes: int) -> str:
    return gateway_codes()[413].message.format(limit=max_request_bytes)


def connection_buffer_limit(max_request_bytes: int) -> int:
    return max(1 << 20, max_request_bytes)


def direct_response_limit(document_size: int) -> int:
    # Envoy's default (4 KiB) is too small for the OpenAPI document.
    return max(4096, document_size)


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


def _status_filter(status: int, op: str = "EQ") -> dict[str, Any]:
    value = {"default_value": status, "runtime_key": f"local_reply.{status}"}
    return {"status_code_filter": {"comparison": {"op": op, "value": value}}}


def _checked(*statuses: dict[str, Any]) -> dict[str, Any]:
    """Local replies from the ext_authz filter (response flag UAEX) whose status passes
    every one of the `statuses` filters."""
    flagged = {"response_flag_filter": {"flags": ["UAEX"]}}
    return {"and_filter": {"filters": [*statuses, flagged]}}


def mapper_status(mapper: dict[str, Any]) -> int | None:
    """The HTTP status a local reply mapper of build_config is for, None for those that
    are not for one status (the service's denials, every other error)."""
    comparison = mapper["filter"].get("status_code_filter", {}).get("comparison", {})
    return int(comparison["value"]["default_value"]) if comparison.get("op") == "EQ" else None


def _status_mapper(spec: ErrorSpec, message: str | None = None) -> dict[str, Any]:
    mapper: dict[str, Any] = {
        "filter": _status_filter(spec.http_status),
        "body_format_override": (
            _envelope(spec.code) if message is None else _envelope(spec.code, message)
        ),
        "headers_to_add": [_header(ENVELOPE_BODY_HEADER, "1")],
    }
    if spec.retry_after is not None:
        mapper["headers_to_add"].append(_header("retry-after", str(math.ceil(spec.retry_after))))
    return mapper


def _header(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _openapi_route(path: str) -> dict[str, Any]:
    """GET /openapi.json answered by Envoy itself: no key needed, and the transcoder
    (which would call it an unknown method) does not see it."""
    disabled = _any("envoy.config.route.v3.FilterConfig", disabled=True)
    return {
        "name": OPENAPI_ROUTE,
        "match": {
            "path": OPENAPI_PATH,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "direct_response": {"status": 200, "body": {"filename": path}},
        "response_headers_to_add": [_header("content-type", "application/json")],
        "typed_per_filter_config": {
            name: disabled for name in (BUFFER_FILTER, CHECK_FILTER, TRANSCODER_FILTER)
        },
    }


def build_config(
    lua_source: str,
    openapi_size: int,
    streamed: list[tuple[str, str, str]] | None = None,
    get_paths: str = ".*",
    shadowing_paths: str | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap with the defaults above; `lua_source` is the Lua filter's whole
    source (generated tables, then envoy/filter.lua), `openapi_size` the size in bytes
    of the OpenAPI document served at GET /openapi.json, `streamed` the HTTP bindings of
    server-streaming RPCs (envoy_tables.streamed_bindings), `get_paths` an RE2 pattern of
    the paths GET is bound on (envoy_tables.get_paths_pattern), `shadowing_paths` an RE2
    pattern of the literal paths less specific bindings also take, if any
    (envoy_tables.shadowing_paths_pattern).

    REST requests time out in Envoy a little after the service's budget per request
    (REST_TIMEOUT_MARGIN), native gRPC calls and streamed REST responses only by their own
    deadline (the service closes an export whose reader stalls)."""
    upstream: dict[str, Any] = {
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

    def rest_route(name: str, match: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "match": match,
            "route": {**upstream, "timeout": rest_timeout(DEFAULT_REQUEST_TIMEOUT)},
            # Tells the service the request came over REST (its per-minute rate applies).
            "request_headers_to_add": [_header(REST_HEADER, "1")],
            **extra,
        }

    def stream_route(rpc: str, http_method: str, pattern: str) -> dict[str, Any]:
        return {
            "name": STREAM_ROUTE_PREFIX + rpc,
            "match": {
                "safe_regex": {"regex": pattern},
                "headers": [{"name": ":method", "string_match": {"exact": http_method}}],
            },
            "route": {**upstream, "timeout": "0s", "idle_timeout": STREAM_IDLE_TIMEOUT},
            "request_headers_to_add": [_header(REST_HEADER, "1")],
            "typed_per_filter_config": {
                # Enabled here (disabled by default); Envoy wants a per-route config to
                # enable it with, which restates the filter's processing mode.
                STREAM_END_FILTER: _any(
                    "envoy.config.route.v3.FilterConfig",
                    disabled=False,
                    config=_any(
                        "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                        overrides={"processing_mode": STREAM_END_MODE},
                    ),
                )
            },
        }

    routes: list[dict[str, Any]] = [
        {
            # Native gRPC callers (content-type application/grpc*), whatever the service:
            # passed through untouched, with no route timeout (server streams stay open;
            # the caller's deadline travels in grpc-timeout, which Envoy enforces too) and
            # no idle timeout (a Watch stream may be quiet for long).
            "name": GRPC_ROUTE,
            "match": {"prefix": "/", "grpc": {}},
            "route": {
                **upstream,
                "timeout": "0s",
                "idle_timeout": "0s",
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            },
            "typed_per_filter_config": {
                name: disabled
                for name in (LUA_FILTER, BUFFER_FILTER, CHECK_FILTER, TRANSCODER_FILTER)
            },
            "request_headers_to_remove": [REST_HEADER],
        },
        _openapi_route(str(OPENAPI_FILE)),
        # Streamed REST responses (CSV exports): no route timeout, which would cut a long
        # export; the transcoder passes each message on as it comes (an HttpBody stream is
        # never buffered whole), and Envoy's buffers hold about a connection buffer's worth
        # (flow control holds the server back beyond it). How the stream ends is decided by
        # the service (ext_proc, rest_stream_end.py): a stream that ended in an error is
        # reset, so that a cut-short body never looks whole. The request is checked as
        # every REST request is.
        *(stream_route(*binding) for binding in streamed or ()),
        # Literal paths that a less specific template also takes: the literal binding's
        # alone (POST /contacts/batch; GET /contacts/batch is a 405, not a contact id).
        *(
            [rest_route(REST_SHADOWING_ROUTE, {"safe_regex": {"regex": shadowing_paths}})]
            if shadowing_paths
            else []
        ),
        # A GET without a query string, of a path GET is bound on, has no body and no
        # parameter to check: it goes to the transcoder without the service's check, and
        # without its round trip. A GET of another path is checked (a 405 when the path
        # serves other methods).
        rest_route(
            REST_GET_ROUTE,
            {
                "safe_regex": {"regex": get_paths},
                "headers": [
                    {"name": ":method", "string_match": {"exact": "GET"}},
                    {"name": ":path", "string_match": {"contains": "?"}, "invert_match": True},
                ],
            },
            typed_per_filter_config={CHECK_FILTER: disabled},
        ),
        # REST: chosen on the request as it came in (the transcoder keeps that route),
        # unknown paths being answered 404 by the transcoder itself, methods a path does
        # not serve 405 by the service's check.
        rest_route(REST_ROUTE, {"prefix": "/"}),
    ]

    http_filters: list[dict[str, Any]] = [
        {
            # First, so that on the way back it sees transcoded responses and Envoy's own
            # local replies (413, 400, 404, 503, 504), and can reshape the former.
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
                max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
            ),
        },
        {
            # The service checks the query string and the JSON body against the request
            # message before the transcoder reads them leniently (rest_check.py); a
            # request it refuses is answered 400 with its envelope as the body. It sees
            # the body whole (the buffer filter has held it), and only the request id of
            # the headers.
            "name": CHECK_FILTER,
            "typed_config": _any(
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                grpc_service={"envoy_grpc": {"cluster_name": CLUSTER}, "timeout": CHECK_TIMEOUT},
                transport_api_version="V3",
                failure_mode_allow=False,
                # A check that fails or times out: the service is unavailable (503).
                status_on_error={"code": "ServiceUnavailable"},
                with_request_body={
                    "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
                    "allow_partial_message": False,
                    "pack_as_bytes": True,
                },
                allowed_headers={"patterns": [{"exact": "x-request-id"}]},
            ),
        },
        {
            # After the transcoder on the way back: it sees the gRPC trailers of a streamed
            # REST response (the transcoder passes them on once the body has started), and
            # the service says whether the stream ended well (rest_stream_end.py). Enabled
            # only on the routes of streamed responses; the service is asked at the end of
            # the stream only, never about the headers or the body.
            "name": STREAM_END_FILTER,
            "disabled": True,
            "typed_config": _any(
                "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                grpc_service={"envoy_grpc": {"cluster_name": CLUSTER}},
                failure_mode_allow=False,
                message_timeout=STREAM_END_TIMEOUT,
                processing_mode=STREAM_END_MODE,
            ),
        },
        {
            "name": TRANSCODER_FILTER,
            "typed_config": _any(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                # The descriptor set as generated: `response_body` removed (envoy_tables).
                proto_descriptor=str(DESCRIPTOR_FILE),
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
                max_request_body_size=DEFAULT_MAX_REQUEST_BYTES,
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
    enveloped = [_header(ENVELOPE_BODY_HEADER, "1")]
    local_reply_config = {
        "mappers": [
            # The only 200 Envoy answers itself is GET /openapi.json: its body as it is.
            {
                "filter": _status_filter(200),
                "body_format_override": {
                    "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                    "content_type": "application/json",
                },
            },
            # The service's denial of a request it checked (rest_check.py: 400, 405): its
            # envelope, as it is.
            {
                "filter": _checked(_status_filter(400, "GE"), _status_filter(499, "LE")),
                "body_format_override": {
                    "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                    "content_type": "application/json",
                },
                "headers_to_add": enveloped,
            },
            # A check that failed or timed out (same flag, 503 and no text): the
            # contract's message.
            {
                **_status_mapper(gateway[503], gateway[503].message),
                "filter": _checked(_status_filter(503)),
            },
            # Envoy's own errors: bad JSON (400), unknown path (404), body too large
            # (413), no healthy upstream (503), route timeout (504). Their message is
            # Envoy's text, or the contract's where Envoy's says nothing useful.
            _status_mapper(gateway[400]),
            _status_mapper(gateway[404]),
            _status_mapper(gateway[405]),
            _status_mapper(gateway[413], too_large_message(DEFAULT_MAX_REQUEST_BYTES)),
            _status_mapper(gateway[503]),
            _status_mapper(gateway[504], gateway[504].message),
            # Any other error Envoy answers itself.
            {
                "filter": _status_filter(400, "GE"),
                "body_format_override": _envelope(FALLBACK_CODE),
                "headers_to_add": enveloped,
            },
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
            "max_direct_response_body_size_bytes": direct_response_limit(openapi_size),
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
                explicit_http_config={
                    "http2_protocol_options": {
                        # How much of one response a server may send ahead of what Envoy
                        # has passed on. Envoy's default (256 MiB) would let a streamed
                        # export run that far ahead of a slow reader, in Envoy's memory,
                        # and keep the server from noticing the reader stalled. The
                        # connection's window keeps its default, so that a stalled stream
                        # holds up none of the others on the connection.
                        "initial_stream_window_size": UPSTREAM_STREAM_WINDOW
                    }
                },
            )
        },
        "load_assignment": {
            "cluster_name": CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": DEFAULT_UPSTREAM}}}]}
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
                    "address": {"socket_address": DEFAULT_LISTENER},
                    # Request bodies up to the limit are read whole before the buffer
                    # filter raises the stream's own limit.
                    "per_connection_buffer_limit_bytes": connection_buffer_limit(
                        DEFAULT_MAX_REQUEST_BYTES
                    ),
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
        # The pattern of the paths GET is bound on (the rest_get route) compiles to an RE2
        # program larger than Envoy's default limit of 100 instructions.
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE},
                }
            ]
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
    return config


def generate(descriptor: Path, filter_lua: Path, openapi: Path, out_dir: Path) -> None:
    """Writes envoy/segments.pb (the descriptor set at `descriptor`, as Envoy takes it)
    and envoy/envoy.json under `out_dir`."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
    # Edits `fds`: Envoy 1.40 refuses to start on a `response_body` naming a non-HttpBody
    # field, so those are removed and the Lua filter unwraps the field itself.
    lua_source = lua_tables(fds) + filter_lua.read_text()
    (out_dir / DESCRIPTOR_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / DESCRIPTOR_FILE).write_bytes(fds.SerializeToString(deterministic=True))
    config = build_config(
        lua_source,
        openapi.stat().st_size,
        streamed_bindings(fds),
        get_paths_pattern(fds),
        shadowing_paths_pattern(fds),
    )
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
