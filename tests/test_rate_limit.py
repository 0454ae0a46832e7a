"""The per-project rate limit of REST requests: over it, 429 RATE_LIMITED in the error
envelope with a Retry-After, whichever of the project's keys and however the header is
spelled; other projects, native gRPC callers and the OpenAPI document are unaffected."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from segments_api.v1 import segments_pb2, segments_pb2_grpc
from segments_service.fairness import Limits
from segments_service.server import Options, ServerThread
from tests.conftest import ROOT, Rest, envoy_in_front, new_project
from tests.rest_helpers import check_error

LIMIT = 5


@pytest.fixture(scope="module")
def limited_server(sessions: sessionmaker[Session]) -> Iterator[ServerThread]:
    """A server allowing each project LIMIT REST requests a minute."""
    server = ServerThread("127.0.0.1:0", sessions, Options(limits=Limits(per_minute=LIMIT)))
    yield server
    server.stop(1)


@pytest.fixture(scope="module")
def limited(
    limited_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rest]:
    """Envoy as `make run` configures it, in front of the limited server."""
    with envoy_in_front(limited_server.port, tmp_path_factory.mktemp("envoy-limited")) as url:
        yield Rest(url)


def test_over_the_limit_is_429_in_the_envelope(
    limited: Rest, limited_server: ServerThread, sessions: sessionmaker[Session], engine: Engine
) -> None:
    busy = new_project(sessions, "busy")
    calm = new_project(sessions, "calm")
    # The project's keys, however the header is spelled, all draw on one budget.
    spellings = [
        {"Authorization": f"Bearer {busy.secret_key}"},
        {"Authorization": f"bearer {busy.secret_key}"},
        {"Authorization": f"BEARER  {busy.secret_key} "},
    ]
    statuses = [
        limited.get("/segments", headers=spellings[i % len(spellings)]).status
        for i in range(LIMIT - 1)
    ]
    track = {"event": "signup", "email": "busy@example.com"}
    statuses.append(limited.post("/v1/track", track, key=busy.public_key).status)
    assert statuses == [200] * LIMIT
    resp = limited.get("/segments", headers=spellings[2])
    error = check_error(resp, 429, "RATE_LIMITED")
    assert f"limit of {LIMIT} requests a minute" in error["message"]
    assert int(resp.headers["retry-after"]) >= 1
    # Writes are limited alike, and nothing is written.
    resp = limited.post("/contacts", {"email": "late@example.com"}, key=busy.secret_key)
    check_error(resp, 429, "RATE_LIMITED")
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM contacts WHERE project_id = :p AND email = :e"),
            {"p": busy.id, "e": "late@example.com"},
        ).scalar_one()
    assert stored == 0
    assert check_error(limited.post("/v1/track", track, key=busy.public_key), 429, "RATE_LIMITED")
    # Another project has a budget of its own; internal gRPC callers are not rate limited.
    assert limited.get("/segments", key=calm.secret_key).status == 200
    with grpc.insecure_channel(f"127.0.0.1:{limited_server.port}") as channel:
        segments_pb2_grpc.SegmentServiceStub(channel).ListSegments(
            segments_pb2.ListSegmentsRequest(), metadata=busy.auth, timeout=5
        )


def test_openapi_document_is_not_rate_limited(limited: Rest) -> None:
    committed = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    for _ in range(LIMIT + 3):
        resp = limited.get("/openapi.json")
        assert resp.status == 200
        # As committed, but for the server it names: the one it was fetched from.
        assert resp.json == {**committed, "servers": [{"url": limited.base}]}
