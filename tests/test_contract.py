"""The error contract is declared once (errors.CONTRACT): the service's gRPC mapping,
Envoy's local replies and Lua tables, the OpenAPI document and docs/errors.md all say
what it says. No database, no Envoy process: the artifacts themselves are read."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from segments_service import envoy_config, envoy_proxy, errors
from segments_service.errors import (
    CONTRACT,
    ERRORS,
    FALLBACK_CODE,
    FieldViolation,
    RateLimited,
    SegmentInUse,
    ServiceError,
    ValidationError,
)
from segments_service.rest_check import ENVELOPE_BODY_HEADER
from segments_service.status import (
    ENVELOPE_HEADER,
    HTTP_STATUS_HEADER,
    RETRY_AFTER_HEADER,
    grpc_code,
    to_status,
)
from tests.conftest import ROOT

DOCUMENT = ROOT / "openapi" / "openapi.json"
CITING_DIRECTORIES = (
    "service",
    "client",
    "scripts",
    "envoy",
    "openapi",
    "protos",
    "tests",
    "docs",
    "bench",
    "README.md",
    "BENCHMARKS.md",
)


def _error_classes() -> list[type[ServiceError]]:
    found: list[type[ServiceError]] = [ServiceError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


def _instance(cls: type[ServiceError]) -> ServiceError:
    if issubclass(cls, ValidationError):
        return cls([FieldViolation("name", "is required", "required")])
    if issubclass(cls, SegmentInUse):
        return cls("in use", ["a", "b"])
    if issubclass(cls, RateLimited):
        return cls("busy")
    return cls("something went wrong")


def _rendered_config(tmp_path: Path) -> dict[str, Any]:
    text = envoy_proxy.render_config(
        http_port=1, upstreams=[("127.0.0.1", 2)], descriptor_path=ROOT / "envoy" / "segments.pb"
    )
    config: dict[str, Any] = json.loads(text)
    return config


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _lua_table(source: str, name: str) -> dict[int, str]:
    body = re.search(rf"^{name} = \{{\n(.*?)^\}}", source, re.M | re.S)
    assert body is not None, f"{name} is not defined in the Lua filter's source"
    return {int(k): v for k, v in re.findall(r'^\s*\[(\d+)\] = "([^"]*)",$', body[1], re.M)}


def test_the_contract_names_each_code_once_with_valid_statuses() -> None:
    codes = [spec.code for spec in CONTRACT]
    assert len(codes) == len(set(codes))
    for spec in CONTRACT:
        assert re.fullmatch(r"[A-Z][A-Z_]*[A-Z]", spec.code)
        assert 400 <= spec.http_status <= 599
        assert spec.grpc_status is None or spec.grpc_status in grpc.StatusCode.__members__
        assert spec.situation and spec.message
    gateway = [spec.http_status for spec in CONTRACT if spec.gateway_default]
    assert len(gateway) == len(set(gateway)), "one gateway default code per HTTP status"
    assert FALLBACK_CODE in ERRORS
    assert {
        "VALIDATION_ERROR",
        "MISSING_AUTH",
        "INVALID_API_KEY",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "SEGMENT_IN_USE",
        "ALREADY_EXISTS",
        "SERVICE_UNAVAILABLE",
        "SEGMENT_BUILDING",
        "RATE_LIMITED",
        "DEADLINE_EXCEEDED",
        "INTERNAL_ERROR",
        "PAYLOAD_TOO_LARGE",
    } <= set(ERRORS)


def test_segment_building_is_a_retryable_unavailable() -> None:
    spec = ERRORS["SEGMENT_BUILDING"]
    assert (spec.http_status, spec.grpc_status, spec.retry_after) == (503, "UNAVAILABLE", 1.0)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_each_error_class_travels_as_the_contract_says(cls: type[ServiceError]) -> None:
    err = _instance(cls)
    spec = ERRORS[err.code]
    assert err.http_status == spec.http_status
    assert grpc_code(err).name == (spec.grpc_status or "INTERNAL")
    status = to_status(err, "req-1")
    assert status.code.name == (spec.grpc_status or "INTERNAL")
    trailing = dict(status.trailing_metadata)
    assert trailing[HTTP_STATUS_HEADER] == str(spec.http_status)
    body = json.loads(trailing[ENVELOPE_HEADER])
    assert (body["error"]["code"], body["error"]["statusCode"]) == (spec.code, spec.http_status)
    raw = trailing["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    details = status_pb2.Status.FromString(raw)
    kinds = {d.type_url.rsplit("/", 1)[1] for d in details.details}
    assert ("google.rpc.RetryInfo" in kinds) == (err.retry_after is not None)
    for detail in details.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert (info.reason, info.metadata["httpStatus"]) == (spec.code, str(spec.http_status))


def test_every_code_of_the_contract_has_retry_only_where_declared() -> None:
    for cls in _error_classes():
        assert cls.retry_after == ERRORS[cls.code].retry_after, cls.__name__


def test_envoy_local_replies_use_the_contract(tmp_path: Path) -> None:
    config = _rendered_config(tmp_path)
    local = _hcm(config)["local_reply_config"]
    gateway = {spec.http_status: spec for spec in CONTRACT if spec.gateway_default}
    seen = set()
    for mapper in local["mappers"]:
        status = envoy_config.mapper_status(mapper)
        if status is None or status < 400:
            continue
        seen.add(status)
        spec = gateway[status]
        error = mapper["body_format_override"]["json_format"]["error"]
        assert error["code"] == spec.code
        retry = {h["header"]["key"]: h["header"]["value"] for h in mapper.get("headers_to_add", [])}
        expected = None if spec.retry_after is None else str(int(spec.retry_after))
        assert retry.get("retry-after") == expected
    assert {400, 404, 413, 503, 504} <= seen
    assert local["body_format"]["json_format"]["error"]["code"] == FALLBACK_CODE
    # Every error Envoy answers itself is marked as already enveloped for the Lua filter,
    # the service's denials of requests it checked passed on as they are.
    errors = [m for m in local["mappers"] if envoy_config.mapper_status(m) != 200]
    for mapper in errors:
        marked = {h["header"]["key"] for h in mapper["headers_to_add"]}
        assert ENVELOPE_BODY_HEADER in marked, mapper
    denial, failed_check = errors[:2]
    # The service's denials (400, 405: any 4xx it answers), and a check that failed (503).
    for mapper, statuses in (
        (denial, [("GE", 400), ("LE", 499)]),
        (failed_check, [("EQ", 503)]),
    ):
        *status_filters, flag = mapper["filter"]["and_filter"]["filters"]
        assert [
            (
                f["status_code_filter"]["comparison"]["op"],
                f["status_code_filter"]["comparison"]["value"]["default_value"],
            )
            for f in status_filters
        ] == statuses
        assert flag == {"response_flag_filter": {"flags": ["UAEX"]}}
    assert denial["body_format_override"]["text_format_source"] == {
        "inline_string": "%LOCAL_REPLY_BODY%"
    }
    unavailable = gateway[503]
    error = failed_check["body_format_override"]["json_format"]["error"]
    assert (error["code"], error["message"]) == (unavailable.code, unavailable.message)
    retry = {h["header"]["key"]: h["header"]["value"] for h in failed_check["headers_to_add"]}
    assert retry["retry-after"] == str(int(unavailable.retry_after or 0))
    catch_all = errors[-1]["filter"]["status_code_filter"]["comparison"]
    assert (catch_all["op"], catch_all["value"]["default_value"]) == ("GE", 400)
    assert errors[-1]["body_format_override"]["json_format"]["error"]["code"] == FALLBACK_CODE


def test_the_lua_filter_reads_its_codes_from_the_contract(tmp_path: Path) -> None:
    config = _rendered_config(tmp_path)
    lua = next(f for f in _hcm(config)["http_filters"] if f["name"] == envoy_config.LUA_FILTER)
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    gateway = {spec.http_status: spec for spec in CONTRACT if spec.gateway_default}
    assert _lua_table(source, "GATEWAY_CODES") == {s: spec.code for s, spec in gateway.items()}
    assert _lua_table(source, "RETRY_AFTER") == {
        s: str(int(spec.retry_after)) for s, spec in gateway.items() if spec.retry_after
    }
    assert f'FALLBACK_CODE = "{FALLBACK_CODE}"' in source
    # The hand-written part names no public code of its own, and knows the service's
    # side channel by the names the service uses.
    handwritten = (ROOT / "envoy" / "filter.lua").read_text()
    assert [code for code in ERRORS if f'"{code}"' in handwritten] == []
    for header in (HTTP_STATUS_HEADER, ENVELOPE_HEADER, RETRY_AFTER_HEADER, ENVELOPE_BODY_HEADER):
        assert f'"{header}"' in handwritten, header


def test_the_openapi_document_lists_the_contract() -> None:
    document = json.loads(DOCUMENT.read_text())
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["properties"]["code"]["enum"] == [spec.code for spec in CONTRACT]
    responses = document["components"]["responses"]
    statuses = {spec.http_status for spec in CONTRACT}
    assert set(responses) >= {f"Error{status}" for status in statuses}
    for status in statuses:
        response = responses[f"Error{status}"]
        codes = [spec for spec in CONTRACT if spec.http_status == status]
        for spec in codes:
            assert f"({spec.code})" in response["description"]
        retry = any(spec.retry_after is not None for spec in codes)
        assert ("Retry-After" in response["headers"]) == retry, status


def test_the_errors_document_lists_the_contract() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| ([A-Z_]+) \| (\d{3}) \| ([A-Z_]+|—) \| ([^|]+) \|", text, re.M)
    documented = {
        code: (int(http), None if grpc_name == "—" else grpc_name, retry.strip())
        for code, http, grpc_name, retry in rows
    }
    assert set(documented) == set(ERRORS)
    for spec in CONTRACT:
        http, grpc_name, retry = documented[spec.code]
        assert (http, grpc_name) == (spec.http_status, spec.grpc_status), spec.code
        assert (retry == "—") == (spec.retry_after is None), spec.code


def test_nothing_cites_a_document_outside_the_repository() -> None:
    done = subprocess.run(
        ["git", "grep", "-n", "-I", "-w", "SPEC", "--", *CITING_DIRECTORIES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    cited = [
        line for line in done.stdout.splitlines() if not line.startswith("tests/test_contract")
    ]
    assert cited == []


def test_errors_module_is_free_of_transport_imports() -> None:
    # The contract is data: the transports read it, it imports none of them.
    source = Path(errors.__file__).read_text()
    assert not re.search(r"^(import|from) (grpc|google)", source, re.M)


# -- Envoy's configuration, generated and committed ----------------------------------------


def test_the_committed_envoy_config_is_a_working_default() -> None:
    """envoy/envoy.json as committed, run from the repository root, is a valid Envoy
    configuration (its paths are relative to the root)."""
    done = subprocess.run(
        [
            envoy_proxy.find_envoy(),
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-c",
            str(envoy_config.CONFIG_FILE),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((ROOT / envoy_config.CONFIG_FILE).read_text())
    transcoder = next(
        f for f in _hcm(config)["http_filters"] if f["name"] == envoy_config.TRANSCODER_FILTER
    )
    assert transcoder["typed_config"]["proto_descriptor"] == str(envoy_config.DESCRIPTOR_FILE)


def test_starting_reads_the_descriptor_as_committed(tmp_path: Path) -> None:
    """The descriptor set is generated the way Envoy takes it: no `response_body` left,
    and render_config points Envoy at the committed file instead of rewriting it."""
    from google.protobuf import descriptor_pb2

    descriptor = ROOT / envoy_config.DESCRIPTOR_FILE
    before = descriptor.read_bytes()
    config = _rendered_config(tmp_path)
    assert descriptor.read_bytes() == before
    transcoder = next(
        f for f in _hcm(config)["http_filters"] if f["name"] == envoy_config.TRANSCODER_FILTER
    )
    assert transcoder["typed_config"]["proto_descriptor"] == str(descriptor)
    fds = descriptor_pb2.FileDescriptorSet.FromString(before)
    annotations = importlib.import_module("google.api.annotations_pb2")
    for file in fds.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations.http]
                assert not rule.response_body, method.name


def test_rest_requests_are_checked_by_the_service_before_transcoding(tmp_path: Path) -> None:
    """Envoy asks the service (ext_authz, on the replicas' cluster) about every REST request
    with a body or a query string, with the whole body, before the transcoder reads it;
    and answers none it could not ask about."""
    text = envoy_proxy.render_config(
        http_port=1,
        upstreams=[("127.0.0.1", 2)],
        descriptor_path=ROOT / "envoy" / "segments.pb",
        max_request_bytes=3 << 20,
    )
    hcm = _hcm(json.loads(text))
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index(envoy_config.BUFFER_FILTER) < names.index(envoy_config.CHECK_FILTER)
    assert names.index(envoy_config.CHECK_FILTER) < names.index(envoy_config.TRANSCODER_FILTER)
    check = hcm["http_filters"][names.index(envoy_config.CHECK_FILTER)]["typed_config"]
    assert check["grpc_service"]["envoy_grpc"] == {"cluster_name": envoy_config.CLUSTER}
    assert check["grpc_service"]["timeout"] == envoy_config.CHECK_TIMEOUT
    assert (check["failure_mode_allow"], check["transport_api_version"]) == (False, "V3")
    assert check["with_request_body"] == {
        "max_request_bytes": 3 << 20,
        "allow_partial_message": False,
        "pack_as_bytes": True,
    }
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    skipped = {
        name
        for name, route in routes.items()
        if envoy_config.CHECK_FILTER in route.get("typed_per_filter_config", {})
    }
    assert skipped == {
        envoy_config.GRPC_ROUTE,
        envoy_config.OPENAPI_ROUTE,
        envoy_config.REST_GET_ROUTE,
    }
    plain_get = routes[envoy_config.REST_GET_ROUTE]["match"]["headers"]
    assert {"name": ":path", "string_match": {"contains": "?"}, "invert_match": True} in plain_get
    # Unchecked: only paths GET is bound on, and not the literal paths another template
    # also takes (their own route, before it, is checked): any other GET may be a 405.
    get_paths = re.compile(routes[envoy_config.REST_GET_ROUTE]["match"]["safe_regex"]["regex"])
    literal = re.compile(routes[envoy_config.REST_SHADOWING_ROUTE]["match"]["safe_regex"]["regex"])
    names = [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"]]
    assert names.index(envoy_config.REST_SHADOWING_ROUTE) < names.index(envoy_config.REST_GET_ROUTE)
    for path in ("/segments", "/segments/abc/", "/contacts/abc/segments", "/webhooks/a/deliveries"):
        assert get_paths.fullmatch(path) and not literal.fullmatch(path), path
    for path in ("/v1/track", "/events/batch", "/segments/abc/members", "/nowhere"):
        assert not get_paths.fullmatch(path), path
    for path in ("/contacts/batch", "/segments/preview/"):
        assert literal.fullmatch(path), path
    assert routes[envoy_config.REST_GET_ROUTE]["route"] == routes[envoy_config.REST_ROUTE]["route"]


def test_a_config_older_than_the_lua_filter_is_refused(tmp_path: Path) -> None:
    for name in (envoy_config.CONFIG_FILE, envoy_config.DESCRIPTOR_FILE, envoy_config.LUA_FILE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    lua = tmp_path / envoy_config.LUA_FILE
    lua.write_text(lua.read_text() + "-- edited since generation\n")
    with pytest.raises(envoy_proxy.StaleConfig, match="make generate"):
        envoy_proxy.render_config(
            http_port=1,
            upstreams=[("127.0.0.1", 2)],
            descriptor_path=tmp_path / envoy_config.DESCRIPTOR_FILE,
        )
