"""Embedded PostgreSQL setup: the guard against loosening private directories as root, and
the server settings sized to the machine; the service's connection settings."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text

from segments_service.database import (
    DatabaseSetupError,
    _untraversable_parents,
    embedded_settings,
    start_embedded,
)


def test_missing_directories_are_not_a_problem(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "there"
    blocked = _untraversable_parents(target)
    assert tmp_path / "not" not in blocked
    assert tmp_path / "not" / "yet" not in blocked
    assert all(p.exists() for p in blocked)


def test_private_parent_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert private in _untraversable_parents(private / "data" / "postgres")


@pytest.mark.skipif(os.geteuid() != 0, reason="the guard applies when running as root")
def test_root_refuses_private_data_dir_without_touching_it(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DatabaseSetupError, match="cannot enter"):
        start_embedded(private / "data")
    assert private.stat().st_mode & 0o777 == 0o700
    assert not (private / "data").exists()


def test_settings_are_sized_to_the_machine() -> None:
    gib = 2**30
    assert embedded_settings(1 * gib)["shared_buffers"] == "256MB"
    assert embedded_settings(4 * gib)["shared_buffers"] == "1024MB"
    assert embedded_settings(24 * gib)["shared_buffers"] == "6144MB"
    assert embedded_settings(64 * gib)["shared_buffers"] == "8192MB"  # capped
    assert embedded_settings(256 * 2**20)["shared_buffers"] == "128MB"  # never below default
    assert embedded_settings(8 * gib)["jit"] == "off"
    # Checkpoints spaced out for bulk writes (each one makes the next page writes log
    # whole pages).
    assert embedded_settings(8 * gib)["max_wal_size"] == "16GB"
    assert embedded_settings(8 * gib)["checkpoint_timeout"] == "15min"


def test_a_new_embedded_server_runs_with_its_settings() -> None:
    # Under /tmp with traversable parents: as root the server runs as another user.
    base = Path(tempfile.mkdtemp(prefix="segments-embedded-"))
    base.chmod(0o755)
    try:
        server = start_embedded(base / "data")
        try:
            wanted = embedded_settings()
            with psycopg.connect(server.get_uri()) as conn:
                shown = {
                    name: conn.execute(f"SHOW {name}").fetchone()
                    for name in ("shared_buffers", "jit", "random_page_cost", "checkpoint_timeout")
                }
            # shared_buffers only takes effect at a start: the server was restarted.
            assert shown["shared_buffers"] == (_shown_size(wanted["shared_buffers"]),)
            assert shown["jit"] == ("off",)
            assert shown["random_page_cost"] == (wanted["random_page_cost"],)
            assert shown["checkpoint_timeout"] == ("15min",)
            # A second start finds everything in place and restarts nothing.
            pid = server.get_pid()
            again = start_embedded(base / "data")
            assert again.get_pid() == pid
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _shown_size(megabytes: str) -> str:
    """PostgreSQL shows 2048MB as 2GB."""
    mb = int(megabytes.removesuffix("MB"))
    return f"{mb // 1024}GB" if mb % 1024 == 0 else f"{mb}MB"


def test_statements_run_often_are_planned_for_their_own_values(engine: Engine) -> None:
    # psycopg prepares a statement from its fifth run; PostgreSQL may then switch it to a
    # generic plan, one for every tenant and window. The service's connections plan each
    # run for its own values instead.
    statement = text("SELECT count(*) FROM contacts WHERE project_id = :p AND created_at > :t")
    with engine.connect() as conn:
        for _ in range(12):
            conn.execute(statement, {"p": uuid.uuid4(), "t": datetime.now(UTC)}).scalar_one()
        plans = conn.execute(
            text(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE 'SELECT count(*) FROM contacts WHERE project_id%'"
            )
        ).one()
    assert plans.generic_plans == 0
    assert plans.custom_plans >= 6
