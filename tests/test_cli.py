"""The admin commands, run as a user would: `segments create-project`, `rotate-key`,
`revoke-key`, `projects` and `keys` against the test database; and the data directory every
command of one installation shares, wherever it is run from."""

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
ROOT = Path(__file__).resolve().parent.parent


def cli(
    database_url: str | None, *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`segments ARGS`; with `database_url` None, on the embedded PostgreSQL of the default
    data directory."""
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    for name in ("DATABASE_URL", "SEGMENTS_DATA_DIR"):
        env.pop(name, None)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return subprocess.run(
        [str(SEGMENTS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        cwd=cwd,
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


# --- projects and keys --------------------------------------------------------------------


def test_projects_lists_every_project(database_url: str, created: dict[str, str]) -> None:
    listed = ok(cli(database_url, "projects", "--json"))
    mine = [p for p in listed if p["id"] == created["id"]]
    assert mine == [{"id": created["id"], "name": "Acme CLI", "createdAt": mine[0]["createdAt"]}]
    assert mine[0]["createdAt"].endswith("Z")
    table = cli(database_url, "projects")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "CREATED"]
    assert any(row.startswith(created["id"]) and "Acme CLI" in row for row in rows)


def test_keys_list_create_and_revoke(database_url: str, stubs: Stubs) -> None:
    keys = ok(cli(database_url, "create-project", "--name", "Keys"))
    listed = ok(cli(database_url, "keys", "list", keys["id"], "--json"))
    assert [(k["type"], k["revokedAt"]) for k in listed] == [("secret", None), ("public", None)]
    for shown, key in zip(listed, (keys["secretKey"], keys["publicKey"]), strict=True):
        # Only the first characters, which the stored prefix holds.
        assert shown["prefix"] == key[:7] + "…"
        assert key not in json.dumps(listed)

    # A public key revoked can be replaced by a new one, and so can a secret key, any time.
    ok(cli(database_url, "keys", "revoke", keys["publicKey"]))
    assert track_status(stubs, keys["publicKey"]) == grpc.StatusCode.UNAUTHENTICATED
    public = ok(cli(database_url, "keys", "create", keys["id"], "--type", "public"))
    assert set(public) == {"key", "type"} and public["type"] == "public"
    assert public["key"].startswith("pk_")
    assert track_status(stubs, public["key"]) == grpc.StatusCode.OK
    # By name as well as by id; a second live secret key beside the first.
    secret = ok(cli(database_url, "keys", "create", "Keys", "--type", "secret"))
    assert secret["key"].startswith("sk_")
    assert status(stubs, secret["key"]) == grpc.StatusCode.OK
    assert status(stubs, keys["secretKey"]) == grpc.StatusCode.OK

    listed = ok(cli(database_url, "keys", "list", "Keys", "--json"))
    assert [(k["type"], k["revokedAt"] is not None) for k in listed] == [
        ("secret", False),
        ("public", True),
        ("public", False),
        ("secret", False),
    ]
    # A key that was lost is revoked by the id `keys list` shows.
    revoked = ok(cli(database_url, "keys", "revoke", listed[0]["id"]))
    assert revoked == {"revoked": True, "projectId": keys["id"]}
    assert status(stubs, keys["secretKey"]) == grpc.StatusCode.UNAUTHENTICATED
    again = cli(database_url, "keys", "revoke", listed[0]["id"])
    assert again.returncode == 1 and "no live key matches" in again.stderr
    table = cli(database_url, "keys", "list", keys["id"])
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "TYPE", "KEY", "CREATED", "REVOKED"]
    assert len(rows) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "list", "no-such-project"], "no project has the id or name 'no-such-project'"),
        (
            ["keys", "create", "00000000-0000-4000-8000-000000000000", "--type", "secret"],
            "no project has the id or name",
        ),
        (["keys", "create", "Keys", "--type", "private"], "invalid choice: 'private'"),
    ],
)
def test_key_commands_explain_mistakes(database_url: str, args: list[str], message: str) -> None:
    done = cli(database_url, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_name_shared_by_projects_asks_for_an_id(database_url: str) -> None:
    first = ok(cli(database_url, "create-project", "--name", "Twin"))
    second = ok(cli(database_url, "create-project", "--name", "Twin"))
    done = cli(database_url, "keys", "list", "Twin")
    assert done.returncode == 1
    assert "2 projects are named 'Twin'; use an id" in done.stderr
    assert first["id"] in done.stderr and second["id"] in done.stderr


# --- the data directory -------------------------------------------------------------------


def data_dir_seen(cwd: Path, **env: str) -> str:
    """The data directory `segments` resolves, run from `cwd`."""
    environ = {k: v for k, v in os.environ.items() if k != "SEGMENTS_DATA_DIR"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from segments_service.config import Settings; print(Settings.from_env().data_dir)",
        ],
        env={**environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_data_directory_does_not_depend_on_the_current_one(tmp_path: Path) -> None:
    assert data_dir_seen(tmp_path) == str(ROOT / ".data")
    assert data_dir_seen(ROOT / "service") == str(ROOT / ".data")
    assert data_dir_seen(tmp_path, SEGMENTS_DATA_DIR="") == str(ROOT / ".data")
    # An explicit directory wins; a relative one is relative to where it is given.
    assert data_dir_seen(tmp_path, SEGMENTS_DATA_DIR="/srv/segments") == "/srv/segments"
    assert data_dir_seen(tmp_path, SEGMENTS_DATA_DIR="here") == str(tmp_path / "here")


def test_an_installed_package_keeps_its_data_per_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same module outside a checkout (as in site-packages): the user's data directory,
    /var/lib/segments for root."""
    import importlib.util

    installed = tmp_path / "lib" / "python3" / "site-packages" / "segments_service"
    installed.mkdir(parents=True)
    (installed / "config.py").write_text((ROOT / "service/segments_service/config.py").read_text())
    spec = importlib.util.spec_from_file_location("installed_config", installed / "config.py")
    assert spec is not None and spec.loader is not None
    config = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "installed_config", config)  # its dataclass needs it
    spec.loader.exec_module(config)
    monkeypatch.delenv("SEGMENTS_DATA_DIR", raising=False)
    assert config.checkout_root() is None
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert config.data_dir() == tmp_path / "xdg" / "segments"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert config.data_dir() == Path("/var/lib/segments")


def test_commands_run_anywhere_share_the_embedded_database(tmp_path: Path) -> None:
    """The issue: `create-project` run from another directory made a second database in
    that directory's .data/, and its keys were refused by the server `make run` served."""
    made = ok(cli(None, "create-project", "--name", "Elsewhere", cwd=tmp_path))
    assert not (tmp_path / ".data").exists()
    listed = ok(cli(None, "projects", "--json", cwd=ROOT))
    assert made["id"] in {p["id"] for p in listed}
    keys = ok(cli(None, "keys", "list", made["id"], "--json", cwd=ROOT / "client"))
    assert [k["prefix"] for k in keys] == [made["secretKey"][:7] + "…", made["publicKey"][:7] + "…"]
