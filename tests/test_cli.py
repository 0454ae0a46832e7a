"""The key management commands, run as a user would: `segments create-project`,
`rotate-key` and `revoke-key` against the test database."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from segments_api.v1 import segments_pb2
from tests.conftest import Stubs

SEGMENTS = Path(sys.executable).parent / "segments"


def cli(
    database_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [str(SEGMENTS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def status(stubs: Stubs, key: str) -> grpc.StatusCode:
    """What a secret-key call (ListSegments) answers for `key`."""
    try:
        stubs.segments.ListSegments(
            segments_pb2.ListSegmentsRequest(),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=10,
        )
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def track_status(stubs: Stubs, key: str) -> grpc.StatusCode:
    from segments_api.v1 import events_pb2

    try:
        stubs.events.Track(
            events_pb2.TrackRequest(event="signup", email="cli@example.com"),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=10,
        )
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def created(database_url: str) -> dict[str, str]:
    keys: dict[str, str] = ok(cli(database_url, "create-project", "--name", "  Acme CLI  "))
    return keys


def test_create_project_prints_working_keys(
    created: dict[str, str], stubs: Stubs, engine: Engine
) -> None:
    assert set(created) == {"id", "secretKey", "publicKey"}
    assert created["secretKey"].startswith("sk_") and created["publicKey"].startswith("pk_")
    assert status(stubs, created["secretKey"]) == grpc.StatusCode.OK
    assert track_status(stubs, created["publicKey"]) == grpc.StatusCode.OK
    with engine.connect() as conn:
        name = conn.execute(
            text("SELECT name FROM projects WHERE id = :p"), {"p": created["id"]}
        ).scalar_one()
    assert name == "Acme CLI"


def test_keys_are_stored_hashed(created: dict[str, str], engine: Engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT kind, key_hash, key_prefix, t::text AS row FROM api_keys t WHERE project_id = :p"
            ),
            {"p": created["id"]},
        ).all()
    by_kind = {row.kind: row for row in rows}
    for kind, key in (("secret", created["secretKey"]), ("public", created["publicKey"])):
        row = by_kind[kind]
        assert bytes(row.key_hash) == hashlib.sha256(key.encode()).digest()
        assert len(row.key_prefix) < len(key) // 4
        # No column holds the key, nor its hex or its body after the prefix.
        for secret in (key, key[3:], key[7:], key.encode().hex()):
            assert secret not in row.row


def test_rotate_key_replaces_the_key(database_url: str, stubs: Stubs) -> None:
    keys = ok(cli(database_url, "create-project", "--name", "Rotate"))
    rotated = ok(cli(database_url, "rotate-key", keys["secretKey"]))
    assert set(rotated) == {"secretKey"}
    new = rotated["secretKey"]
    assert new.startswith("sk_") and new != keys["secretKey"]
    assert status(stubs, keys["secretKey"]) == grpc.StatusCode.UNAUTHENTICATED
    assert status(stubs, new) == grpc.StatusCode.OK
    rotated_public = ok(cli(database_url, "rotate-key", keys["publicKey"]))
    assert set(rotated_public) == {"publicKey"}
    assert track_status(stubs, keys["publicKey"]) == grpc.StatusCode.UNAUTHENTICATED
    assert track_status(stubs, rotated_public["publicKey"]) == grpc.StatusCode.OK
    # A rotated-away key cannot be rotated again.
    again = cli(database_url, "rotate-key", keys["secretKey"])
    assert again.returncode != 0
    assert "no live key matches" in again.stderr


def test_keys_can_come_from_standard_input(database_url: str, stubs: Stubs) -> None:
    keys = ok(cli(database_url, "create-project", "--name", "Stdin"))
    rotated = ok(cli(database_url, "rotate-key", "-", stdin=keys["secretKey"] + "\n"))
    assert status(stubs, keys["secretKey"]) == grpc.StatusCode.UNAUTHENTICATED
    assert status(stubs, rotated["secretKey"]) == grpc.StatusCode.OK
    revoked = ok(cli(database_url, "revoke-key", "-", stdin=rotated["secretKey"]))
    assert revoked == {"revoked": True, "projectId": keys["id"]}
    assert status(stubs, rotated["secretKey"]) == grpc.StatusCode.UNAUTHENTICATED


def test_revoke_key_disables_it(database_url: str, stubs: Stubs) -> None:
    keys = ok(cli(database_url, "create-project", "--name", "Revoke"))
    revoked = ok(cli(database_url, "revoke-key", keys["secretKey"]))
    assert revoked == {"revoked": True, "projectId": keys["id"]}
    assert status(stubs, keys["secretKey"]) == grpc.StatusCode.UNAUTHENTICATED
    # The public key of the project still works.
    assert track_status(stubs, keys["publicKey"]) == grpc.StatusCode.OK


@pytest.mark.parametrize("key", ["sk_not-a-key", "pk_not-a-key", "", "x'; DROP TABLE api_keys;--"])
def test_revoking_an_unknown_key_fails_clearly(database_url: str, key: str, engine: Engine) -> None:
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one()
    done = cli(database_url, "revoke-key", key)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "segments: no live key matches" in done.stderr
    assert "Traceback" not in done.stderr
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == before


def test_revoking_twice_fails(database_url: str) -> None:
    keys = ok(cli(database_url, "create-project", "--name", "Twice"))
    ok(cli(database_url, "revoke-key", keys["publicKey"]))
    done = cli(database_url, "revoke-key", keys["publicKey"])
    assert done.returncode != 0
    assert "no live key matches" in done.stderr


def test_create_project_needs_a_name(database_url: str) -> None:
    done = cli(database_url, "create-project", "--name", "   ")
    assert done.returncode != 0
    assert "--name must not be empty" in done.stderr
