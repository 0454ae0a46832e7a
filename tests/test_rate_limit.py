"""Envoy's per-key rate limit: over it, 429 RATE_LIMITED in the error envelope with a
Retry-After; other keys and the OpenAPI document are unaffected."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import ROOT, Rest, free_port, new_project
from tests.rest_helpers import check_error

LIMIT = 5


@pytest.fixture(scope="module")
def limited(grpc_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rest]:
    """Envoy as `make run` configures it, with a limit of LIMIT requests per minute."""
    from segments_service import envoy_proxy

    workdir = tmp_path_factory.mktemp("envoy-limited")
    http_port = free_port()
    config = envoy_proxy.render_config(
        http_port=http_port,
        upstreams=[("127.0.0.1", grpc_port)],
        descriptor_path=ROOT / "envoy" / "segments.pb",
    )
    proc = envoy_proxy.start_envoy(config, workdir=workdir, log_path=workdir / "envoy.log")
    try:
        envoy_proxy.wait_ready(http_port, timeout=30, process=proc)
        yield Rest(f"http://127.0.0.1:{http_port}")
    finally:
        proc.terminate()
        proc.wait(10)


def test_over_the_limit_is_429_in_the_envelope(
    limited: Rest, sessions: sessionmaker[Session], engine: Engine
) -> None:
    busy = new_project(sessions, "busy")
    calm = new_project(sessions, "calm")
    statuses = [limited.get("/segments", key=busy.secret_key).status for _ in range(LIMIT)]
    assert statuses == [200] * LIMIT
    resp = limited.get("/segments", key=busy.secret_key)
    error = check_error(resp, 429, "RATE_LIMITED")
    assert "rate" in error["message"].lower() or "too many" in error["message"].lower()
    assert int(resp.headers["retry-after"]) >= 1
    # Writes are limited alike, and nothing is written.
    resp = limited.post("/contacts", {"email": "late@example.com"}, key=busy.secret_key)
    check_error(resp, 429, "RATE_LIMITED")
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM contacts WHERE project_id = :p"), {"p": busy.id}
        ).scalar_one()
    assert stored == 0
    # Other keys have buckets of their own: another project's, and this project's public key.
    assert limited.get("/segments", key=calm.secret_key).status == 200
    track = {"event": "signup", "email": "calm@example.com"}
    assert limited.post("/v1/track", track, key=busy.public_key).status == 200


def test_openapi_document_is_not_rate_limited(limited: Rest) -> None:
    for _ in range(LIMIT + 3):
        resp = limited.get("/openapi.json")
        assert resp.status == 200
        assert resp.raw == (ROOT / "openapi" / "openapi.json").read_bytes()
