"""The check Envoy asks for before its gRPC-JSON transcoder reads a REST request: Envoy's
ext_authz filter calls `envoy.service.auth.v3.Authorization/Check` with the method, the
path and query, the request id and the raw body; the HTTP rule the request maps to is
found (from the google.api.http annotations of the services) and its query string and
JSON body are held against the request message (json_shapes.py). A request the transcoder
would read leniently, or not at all, is denied with HTTP 400 and the error envelope
(status.envelope) in the body; a method its path does not serve (PUT /segments/{id}) with
HTTP 405, the path's methods in `Allow`; any other is allowed, and the transcoder and the
RPC take it from there (a path no rule takes is the transcoder's 404).

It authorizes nothing: the call carries the REST caller's request, not a caller of its
own, and needs no key; the RPC that follows authenticates as every RPC does.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor
from google.rpc import status_pb2

from segments_service import json_shapes
from segments_service.errors import FieldViolation, MethodNotAllowed, ServiceError, ValidationError
from segments_service.status import envelope, grpc_code

# The RPC Envoy calls; no key, no fair share, no budget of the Runner (rpc.py).
CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
# On a denial: the body already is the error envelope, for Envoy's response filter to pass
# on as it is (it never reaches HTTP clients).
ENVELOPE_BODY_HEADER = "x-envelope-body"
# Bodies from this size on are parsed on a worker thread rather than the event loop.
THREAD_BODY_BYTES = 64 << 10
# Paths Envoy answers itself (envoy_config), with the methods it serves them with: they are
# never transcoded, but another method on them is a 405 as on every other path.
OPENAPI_PATH = "/openapi.json"
ENVOY_PATHS: dict[str, tuple[str, ...]] = {OPENAPI_PATH: ("GET",)}

# Registers the google.api.http option so that method options parse it; imported by name
# because googleapis-common-protos ships no type information for it.
_annotations = importlib.import_module("google.api.annotations_pb2")


def http_bindings(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> Iterator[tuple[str, descriptor_pb2.MethodDescriptorProto, Any, str, str]]:
    """(service full name, method, google.api.HttpRule, HTTP method, path template) of
    every HTTP binding of the services in `files`, additional bindings included."""
    for file in files:
        for service in file.service:
            for method in service.method:
                if not method.options.HasExtension(_annotations.http):
                    continue
                rule = method.options.Extensions[_annotations.http]
                for binding in [rule, *rule.additional_bindings]:
                    verb = binding.WhichOneof("pattern")
                    name = f"{file.package}.{service.name}"
                    if verb == "custom":
                        yield name, method, binding, binding.custom.kind, binding.custom.path
                    elif verb is not None:
                        yield name, method, binding, verb.upper(), getattr(binding, verb)


@dataclass(frozen=True)
class Route:
    """One HTTP binding: which requests it takes and what their JSON must be."""

    method: str
    pattern: re.Pattern[str]
    literals: int  # literal path segments: the more, the more specific
    message: Descriptor  # the request message
    body: str  # the rule's `body`: "" none, "*" the whole message, else one field
    bound: tuple[str, ...]  # fields the path sets (proto names, dotted)


def path_pattern(template: str, escape: Callable[[str], str]) -> tuple[str, tuple[str, ...]]:
    """The pattern of a google.api.http path template such as /segments/{id}/members,
    unanchored, with `escape` quoting its literal text (re.escape, or Lua's); and the
    fields its variables bind. Wildcards are `.+` and `[^/]+`, the same in both."""

    def segments(text: str) -> str:
        parts = []
        for segment in text.split("/"):
            if segment == "**":
                parts.append(".+")
            elif segment == "*":
                parts.append("[^/]+")
            else:
                parts.append(escape(segment))
        return "/".join(parts)

    pattern, bound = [], []
    for token in re.split(r"(\{[^}]*\})", template):
        if token.startswith("{"):
            field, _, inner = token[1:-1].partition("=")
            bound.append(field)
            pattern.append(segments(inner) if inner else "[^/]+")
        else:
            pattern.append(segments(token))
    return "".join(pattern), tuple(bound)


def literal_segments(template: str) -> int:
    """How many segments of a path template are literal text: the more, the more specific."""
    bare = re.sub(r"\{[^}]*\}", "", template)
    return sum(1 for segment in bare.split("/") if segment not in ("", "*", "**"))


def route_of(method: str, template: str, message: Descriptor, body: str) -> Route:
    """The Route of a google.api.http path template such as /segments/{id}/members."""
    pattern, bound = path_pattern(template, re.escape)
    literals = literal_segments(template)
    # The transcoder also takes the path with a trailing slash.
    return Route(method, re.compile(pattern + "/?"), literals, message, body, bound)


def routes(service_names: Iterable[str]) -> list[Route]:
    """The Routes of these services (full names, in the default descriptor pool), the most
    specific first."""
    pool = descriptor_pool.Default()
    wanted = tuple(service_names)
    files = []
    for file in dict.fromkeys(pool.FindServiceByName(name).file for name in wanted):
        files.append(descriptor_pb2.FileDescriptorProto())
        file.CopyToProto(files[-1])
    found = [
        route_of(verb, template, pool.FindMessageTypeByName(method.input_type[1:]), rule.body)
        for service, method, rule, verb, template in http_bindings(files)
        if service in wanted
    ]
    return sorted(found, key=lambda r: -r.literals)


class RestCheck:
    """The Authorization servicer: Check answers OK, or a denial with the envelope."""

    def __init__(self, service_names: Iterable[str], executor: Executor | None = None) -> None:
        self.routes = routes(service_names)
        # Large bodies are parsed here: a pool of their own, so a burst of them waits on
        # itself and never on (or in front of) the loop's default executor.
        self.executor = executor

    def serving(self, path: str) -> list[Route]:
        """The routes that serve `path`: of those whose template takes it, the most specific
        only, as routers match paths before methods. /contacts/batch is POST's alone, not
        also a contact id for GET /contacts/{id} (which the transcoder would take it for)."""
        found = [r for r in self.routes if r.pattern.fullmatch(path)]
        most = max((r.literals for r in found), default=0)
        return [r for r in found if r.literals == most]

    def find(self, method: str, path: str) -> Route | None:
        return next((r for r in self.serving(path) if r.method == method), None)

    def allowed(self, path: str) -> list[str]:
        """The methods `path` is served with, sorted; none when no rule takes it."""
        methods = {r.method for r in self.serving(path)}
        return sorted(methods.union(ENVOY_PATHS.get(path, ())))

    def violations(self, method: str, target: str, body: bytes) -> list[FieldViolation]:
        """What is wrong with the request `method target` (path and query) and `body`;
        nothing for a request no rule takes (see refusal)."""
        path, _, query = target.partition("?")
        route = self.find(method, path)
        if route is None:
            return []
        found = json_shapes.query_violations(query, route.message, route.body, route.bound)
        if route.body:
            found += json_shapes.body_violations(body, route.message, route.body, route.bound)
        return found

    def refusal(self, method: str, target: str, body: bytes) -> ServiceError | None:
        """Why the request is refused before transcoding, None when it is not: a method
        its path does not serve, or the violations of its query string and body."""
        path = target.partition("?")[0]
        if self.find(method, path) is None:
            allowed = self.allowed(path)
            if not allowed:
                return None  # no such path: the transcoder's 404
            return MethodNotAllowed(
                f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}", allowed
            )
        found = self.violations(method, target, body)
        return ValidationError(found) if found else None

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        method, target = str(http.method), str(http.path)
        body = bytes(http.raw_body) or str(http.body).encode()
        if len(body) < THREAD_BODY_BYTES:
            refused = self.refusal(method, target, body)
        else:
            refused = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.refusal, method, target, body
            )
        if refused is None:
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=grpc.StatusCode.OK.value[0]),
                ok_response=external_auth_pb2.OkHttpResponse(),
            )
        return denial(refused, str(http.headers.get("x-request-id", "")))


def denial(err: ServiceError, request_id: str) -> external_auth_pb2.CheckResponse:
    """A CheckResponse refusing the request: its HTTP status, the envelope as the body (and
    `Allow` on a 405)."""
    request_id = request_id[:128] or str(uuid.uuid4())
    body = json.dumps(envelope(err, request_id), ensure_ascii=True, separators=(",", ":"))
    headers = [("content-type", "application/json"), (ENVELOPE_BODY_HEADER, "1")]
    code = grpc_code(err)
    if isinstance(err, MethodNotAllowed):
        headers.append(("allow", ", ".join(err.allowed)))
        code = grpc.StatusCode.UNIMPLEMENTED  # (the Check's own status: never shown)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code.value[0]),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=err.http_status),
            headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                for k, v in headers
            ],
            body=body,
        ),
    )


def add_to_server(
    server: grpc.aio.Server, service_names: Iterable[str], executor: Executor
) -> None:
    """Serves the check of REST requests for these services (full names) on `server`,
    parsing large bodies on `executor`."""
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        RestCheck(service_names, executor), server
    )
