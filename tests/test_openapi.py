"""The OpenAPI document: committed, fresh, served by Envoy, and true of the live stack.

Schemathesis generates requests from openapi/openapi.json (valid ones and, per operation,
invalid ones) and sends them through Envoy to the real server: no 5xx, every status,
header and body as documented.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import ROOT, Project, Rest, new_project

DOCUMENT = ROOT / "openapi" / "openapi.json"
EXAMPLES_PER_OPERATION = 25
WORKFLOWS = 30
WORKFLOW_STEPS = 10
# Header names gRPC accepts as metadata keys. Envoy forwards request headers as metadata,
# and grpcio fails the call (INTERNAL, HTTP 500) on any other name, such as `a|b`; see
# test_header_names_grpc_refuses_are_not_a_server_error.
GRPC_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"max-examples": EXAMPLES_PER_OPERATION},
        "checks": {
            # The document cannot express every rule (a valid condition, an existing id),
            # so schema-valid requests may rightly be refused with a 4xx.
            "positive_data_acceptance": {"enabled": False},
            # Invalid requests are still sent (and must not fail the server or break the
            # contract), but Envoy's transcoder parses JSON the lenient proto3 way: null
            # for any field, "true" for true, 1 for an enum, one object for a list of
            # them, so "invalid by the document" does not always mean refused.
            "negative_data_rejection": {"enabled": False},
        },
        "phases": {
            "coverage": {
                # Methods a path does not serve are sent to check the 405 with Allow, but
                # not QUERY: Envoy's HTTP/1 codec refuses a method it does not know with a
                # 400 before any route (or the service) sees the request.
                "unexpected-methods": ["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE"]
            }
        },
    }
)
schema = schemathesis.openapi.from_path(DOCUMENT, config=CONFIG)


@pytest.fixture(scope="module")
def api_project(sessions: sessionmaker[Session]) -> Project:
    return new_project(sessions, "schemathesis")


def test_document_is_fresh() -> None:
    """openapi/openapi.json is what scripts/openapi.py makes of protos/ now."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "openapi.py"), "--output", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == DOCUMENT.read_text(), "stale: run `make generate`"


def test_envoy_serves_the_committed_document(rest: Rest, rest_url: str) -> None:
    """As committed, but for `servers`: the address it was fetched from."""
    committed = json.loads(DOCUMENT.read_text())
    assert committed["servers"] == [{"url": "http://127.0.0.1:8080"}]
    resp = rest.get("/openapi.json")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.raw)
    document: dict[str, Any] = resp.json
    assert document["openapi"].startswith("3.0")
    assert document["servers"] == [{"url": rest_url}]
    assert {**document, "servers": committed["servers"]} == committed


@pytest.mark.parametrize(
    ("headers", "url"),
    [
        ({"Host": "segments.example.com"}, "http://segments.example.com"),
        (
            {"Host": "api.example.org:8443", "X-Forwarded-Proto": "https"},
            "https://api.example.org:8443",
        ),
        ({"Host": "[::1]:9000", "X-Forwarded-Proto": "https, http"}, "https://[::1]:9000"),
        ({"Host": "10.1.2.3:80", "X-Forwarded-Proto": "gopher"}, "http://10.1.2.3:80"),
    ],
)
def test_the_served_document_names_the_server_it_was_fetched_from(
    rest: Rest, headers: dict[str, str], url: str
) -> None:
    resp = rest.get("/openapi.json", headers=headers)
    assert resp.status == 200, resp.raw[:300]
    document = resp.json
    assert document["servers"] == [{"url": url}]
    committed = json.loads(DOCUMENT.read_text())
    assert {**document, "servers": committed["servers"]} == committed


def test_document_is_valid_openapi_3_0() -> None:
    # The OpenAPI 3.0 meta-schema schemathesis ships (an internal module of the pinned version).
    from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

    document = json.loads(DOCUMENT.read_text())
    errors = [
        f"{list(e.instance_path)}: {e.message[:200]}"
        for e in OPENAPI_30_VALIDATOR.iter_errors(document)
    ]
    assert errors == []


def test_document_covers_every_rest_binding() -> None:
    document = json.loads(DOCUMENT.read_text())
    operations = {
        (method.upper(), path): op
        for path, ops in document["paths"].items()
        for method, op in ops.items()
    }
    assert set(operations) == {
        ("GET", "/segments"),
        ("POST", "/segments"),
        ("GET", "/segments/{id}"),
        ("PATCH", "/segments/{id}"),
        ("DELETE", "/segments/{id}"),
        ("GET", "/segments/{id}/contacts"),
        ("POST", "/segments/{id}/members"),
        ("DELETE", "/segments/{id}/members"),
        ("POST", "/segments/preview"),
        ("GET", "/segments/{id}/contacts/{contactId}/explain"),
        ("GET", "/segments/{id}/events"),
        ("GET", "/segments/{id}/history"),
        ("GET", "/segments/{id}/export"),
        ("GET", "/contacts"),
        ("POST", "/contacts"),
        ("POST", "/contacts/batch"),
        ("GET", "/contacts/{id}"),
        ("PATCH", "/contacts/{id}"),
        ("DELETE", "/contacts/{id}"),
        ("GET", "/contacts/{id}/segments"),
        ("POST", "/v1/track"),
        ("POST", "/events/batch"),
        ("POST", "/webhooks"),
        ("GET", "/webhooks"),
        ("GET", "/webhooks/{id}"),
        ("DELETE", "/webhooks/{id}"),
        ("GET", "/webhooks/{id}/deliveries"),
        ("GET", "/openapi.json"),
    }
    assert set(operations["POST", "/segments"]["responses"]) >= {"201", "400", "401", "429"}
    assert {"200", "201"} <= set(operations["POST", "/contacts"]["responses"])
    assert "204" in operations["DELETE", "/segments/{id}"]["responses"]
    assert "409" in operations["DELETE", "/segments/{id}"]["responses"]
    assert "204" in operations["DELETE", "/contacts/{id}"]["responses"]
    assert "201" in operations["POST", "/webhooks"]["responses"]
    assert "204" in operations["DELETE", "/webhooks/{id}"]["responses"]
    assert "409" in operations["PATCH", "/contacts/{id}"]["responses"]
    exported = operations["GET", "/segments/{id}/export"]["responses"]["200"]
    assert set(exported["content"]) == {"text/csv"}
    assert "Content-Disposition" in exported["headers"]
    listed = operations["GET", "/contacts"]["responses"]["200"]["content"]["application/json"]
    listing = document["components"]["schemas"][listed["schema"]["$ref"].rsplit("/", 1)[1]]
    assert listing["properties"]["cursor"] == {
        "type": "string",
        "nullable": True,
        "description": listing["properties"]["cursor"]["description"],
    }
    assert [p["name"] for p in operations["GET", "/contacts"]["parameters"]] == [
        "limit",
        "cursor",
        "search",
        "subscribed",
    ]
    segments_of = operations["GET", "/contacts/{id}/segments"]["responses"]["200"]
    assert segments_of["content"]["application/json"]["schema"]["type"] == "array"
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    segment = document["components"]["schemas"]["Segment"]["properties"]
    assert segment["createdAt"]["format"] == "date-time"
    assert segment["trackMembership"]["type"] == "boolean"
    assert document["components"]["schemas"]["Segment.Type"]["enum"] == ["DYNAMIC", "STATIC"]


SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


def _auth(case: Any, project: Project) -> dict[str, str]:
    key = project.public_key if case.path == "/v1/track" else project.secret_key
    return {"Authorization": f"Bearer {key}"}


def _drop_header_names_grpc_refuses(case: Any) -> None:
    if case.headers:
        case.headers = {
            name: value
            for name, value in case.headers.items()
            if GRPC_METADATA_KEY.match(name.lower())
        }


@schema.parametrize()
@SETTINGS
def test_live_stack_conforms(case: Any, rest_url: str, api_project: Project) -> None:
    """Each operation alone: ids are mostly unknown here, bodies valid or not."""
    _drop_header_names_grpc_refuses(case)
    case.call_and_validate(base_url=rest_url, headers=_auth(case, api_project), timeout=30)


def test_live_stack_conforms_in_workflows(rest_url: str, sessions: sessionmaker[Session]) -> None:
    """Sequences that follow the links schemathesis infers from the document (a created
    segment's id into GET/PATCH/DELETE and the members calls, a contact's id into
    GET/DELETE), so real resources are read, changed and deleted. Each scenario has a
    project of its own, so that replaying one sees the same responses."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        project: Project

        def setup(self) -> None:
            self.project = new_project(sessions, "schemathesis workflow")

        def before_call(self, case: Any) -> None:
            _drop_header_names_grpc_refuses(case)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": rest_url, "headers": _auth(case, self.project), "timeout": 30}

    Workflow.run(
        settings=settings(SETTINGS, max_examples=WORKFLOWS, stateful_step_count=WORKFLOW_STEPS)
    )


@pytest.mark.parametrize("header", ["a|b: c", "x`y: z", "grpc-timeout: zzz"])
def test_header_names_grpc_refuses_are_not_a_server_error(
    rest: Rest, api_project: Project, header: str
) -> None:
    name, _, value = header.partition(": ")
    resp = rest.get("/segments", key=api_project.secret_key, headers={name: value})
    assert resp.status < 500, resp.raw[:300]
