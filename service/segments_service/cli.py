"""The `segments` command: run the whole stack, serve one replica, migrate, list projects and
manage keys; commands other packages register (the client's `import` and `export`)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from segments_service.config import Settings, connect_host, envoy_root, host_port

log = logging.getLogger("segments")
DESCRIPTOR = envoy_root() / "envoy" / "segments.pb"


def configure_logging() -> None:
    """JSON lines on standard error (logs.py); our own messages at LOG_LEVEL (default INFO),
    libraries only when something is wrong."""
    from segments_service import logs

    logs.configure()


# The database module (SQLAlchemy, psycopg, the embedded server) is imported where it is
# used: it takes most of a start's import time, and `segments run` must take Ctrl-C from
# its first moments (its handlers are installed first thing).


def _database(settings: Settings) -> tuple[str, Any]:
    from segments_service.database import DatabaseSetupError, resolve_database_url

    try:
        return resolve_database_url(settings.database_url, settings.data_dir)
    except DatabaseSetupError as err:
        raise SystemExit(f"segments: {err}") from None


def _wait_healthy(
    port: int,
    proc: subprocess.Popen[bytes],
    timeout: float = 30.0,
    stopping: Callable[[], bool] = lambda: False,
    host: str = "127.0.0.1",
) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(host_port(host, port)) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its type stub lists no methods
        while time.monotonic() < deadline:
            if stopping():
                return
            if proc.poll() is not None:
                raise SystemExit(f"segments: gRPC server on port {port} exited ({proc.returncode})")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"segments: gRPC server on port {port} did not become healthy")


class Supervisor:
    """Starts the replicas and Envoy, restarts a replica that dies, stops all on a signal."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        replicas: int,
        run_dir: Path,
        standby_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        # The standby `--replica` started, passed on as DATABASE_REPLICA_URL.
        self.standby_url = standby_url
        self.ports = [settings.grpc_port + i for i in range(replicas)]
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}
        self.envoy: subprocess.Popen[bytes] | None = None
        self.stopping = False
        # This run's own files, removed when it ends: the replicas' metric values
        # (prometheus_client's multiprocess files) and Envoy's admin socket.
        self.metrics_dir = run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.admin_socket = run_dir / "envoy-admin.sock"
        self.metrics: Any = None

    def start_metrics(self) -> None:
        """/metrics on SEGMENTS_METRICS_HOST:SEGMENTS_METRICS_PORT (0: none): the replicas'
        series summed, then Envoy's."""
        from segments_service.metrics_endpoint import MetricsEndpoint, multiprocess_registry

        host, port = self.settings.metrics_host, self.settings.metrics_port
        if port == 0:
            return
        try:
            self.metrics = MetricsEndpoint(
                host, port, multiprocess_registry(self.metrics_dir), self.admin_socket
            ).start()
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise SystemExit(f"segments: cannot listen on {host}:{port}: {err}") from None
            check_ports_free([("SEGMENTS_METRICS_PORT", host, port)])
            raise

    def replica_gone(self, proc: subprocess.Popen[bytes]) -> None:
        """Its gauges leave the sums (its counters stay: totals never go back)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def start_replica(self, port: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            # The replicas write their metrics for this supervisor to serve.
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        env.pop("SEGMENTS_METRICS_PORT", None)
        if self.standby_url is not None:
            env["DATABASE_REPLICA_URL"] = self.standby_url
        proc = subprocess.Popen(
            [sys.executable, "-m", "segments_service.cli", "serve", "--port", str(port)],
            env=env,
            # Out of the terminal's process group: Ctrl-C reaches this supervisor alone, which
            # stops Envoy first and then lets the replicas drain, in that order; a replica
            # still starting is not interrupted halfway.
            start_new_session=True,
        )
        self.replicas[port] = proc
        return proc

    def start(self) -> None:
        from segments_service import envoy_proxy

        self.start_metrics()
        for port in self.ports:
            self.start_replica(port)
        grpc_host = connect_host(self.settings.host)
        for port in self.ports:
            _wait_healthy(port, self.replicas[port], stopping=lambda: self.stopping, host=grpc_host)
        if self.stopping:
            return
        workdir = self.settings.data_dir / "envoy"
        workdir.mkdir(parents=True, exist_ok=True)
        config = envoy_proxy.render_config(
            http_port=self.settings.http_port,
            upstreams=[(grpc_host, p) for p in self.ports],
            descriptor_path=DESCRIPTOR,
            request_timeout=self.settings.request_timeout,
            admin_socket=self.admin_socket,
            listen_host=self.settings.http_host.strip("[]"),
        )
        # Like the replicas, out of the terminal's process group: Ctrl-C reaches this
        # supervisor alone, which stops Envoy itself, even while Envoy is still starting.
        self.envoy = envoy_proxy.start_envoy(
            config, workdir=workdir, log_path=workdir / "envoy.log", new_session=True
        )
        try:
            envoy_proxy.wait_ready(
                self.settings.http_port,
                timeout=30,
                host=connect_host(self.settings.http_host),
                process=self.envoy,
            )
        except (RuntimeError, TimeoutError) as err:
            if self.stopping:  # interrupted while Envoy was starting
                return
            raise SystemExit(f"segments: {err} ({workdir / 'envoy.log'})") from None

    def watch(self) -> int:
        """Until a signal: restart dead replicas; if Envoy dies, stop everything."""
        while not self.stopping:
            if self.envoy is not None and self.envoy.poll() is not None:
                log.error("envoy exited with %s; stopping", self.envoy.returncode)
                return 1
            for port, proc in list(self.replicas.items()):
                if proc.poll() is not None and not self.stopping:
                    log.warning("replica on port %d exited (%s); restarting", port, proc.returncode)
                    self.replica_gone(proc)
                    self.start_replica(port)
            time.sleep(0.5)
        return 0

    def stop(self) -> None:
        """Envoy first (no new requests), then replicas drain their in-flight RPCs."""
        self.stopping = True
        procs = [p for p in [self.envoy, *self.replicas.values()] if p is not None]
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
        for proc in self.replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_seconds + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.metrics is not None:
            self.metrics.stop()


def _holder(port: int) -> str:
    """Which process listens on `port`, when the system tells (best effort)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return ""
                proc = psutil.Process(conn.pid)
                return f" by process {conn.pid} ({' '.join(proc.cmdline()[:3])[:120]})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_ports_free(listeners: Sequence[tuple[str, str, int]]) -> None:
    """Refuse to start when a (variable, host, port) we are to listen on is taken. Envoy binds
    with SO_REUSEPORT, so a second `segments run` would otherwise share the port with the
    first and the kernel would split requests between two installations."""
    taken = []
    for variable, host, port in listeners:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # Without SO_REUSEPORT a bind fails while anything listens there; SO_REUSEADDR
            # lets it past connections of a previous run still in TIME_WAIT.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise SystemExit(f"segments: cannot listen on {host}:{port}: {err}") from None
                taken.append(f"{host}:{port} ({variable}) is already in use{_holder(port)}")
    if taken:
        raise SystemExit(
            "segments: "
            + "; ".join(taken)
            + ". Is another `segments run` (make run) going? Stop it, or choose free ports, "
            "e.g. SEGMENTS_METRICS_PORT=9465 GRPC_PORT=50061 HTTP_PORT=8090 make run"
        )


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    # Until the supervisor runs, Ctrl-C or SIGTERM ends the start at once (the embedded
    # PostgreSQL is stopped at exit), even when SIGINT was inherited ignored (`make run &`).
    # A closed terminal (SIGHUP) too: the replicas are not in its process group.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    grpc_ports = [settings.grpc_port + i for i in range(args.replicas)]
    check_ports_free(
        [
            ("HTTP_PORT", settings.http_host.strip("[]"), settings.http_port),
            *(
                ("GRPC_PORT" if i == 0 else f"GRPC_PORT+{i}", settings.host, port)
                for i, port in enumerate(grpc_ports)
            ),
            *(
                [("SEGMENTS_METRICS_PORT", settings.metrics_host, settings.metrics_port)]
                if settings.metrics_port
                else []
            ),
        ]
    )
    if args.replica and settings.database_url is not None:
        raise SystemExit(
            "segments: --replica starts a standby of the embedded PostgreSQL; with "
            "DATABASE_URL, point DATABASE_REPLICA_URL at a standby of that server instead"
        )
    if settings.database_url is None:
        log.info("data directory: %s", settings.data_dir)
    url, server = _database(settings)
    _migrate(url)
    run_dir = Path(tempfile.mkdtemp(prefix="segments-run-"))
    standby = None
    try:
        if args.replica:
            standby = _standby(settings, server)
        standby_url = None if standby is None else standby.url(_database_name(url))
        return _supervise(settings, url, args.replicas, run_dir, standby_url)
    finally:
        if standby is not None:
            standby.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _standby(settings: Settings, server: Any) -> Any:
    """The embedded server's streaming standby in the data directory's `replica/`."""
    from segments_service.database import DatabaseSetupError
    from segments_service.standby import start_standby, stop_standby

    pgdata = settings.data_dir / "replica"
    try:
        return start_standby(server, pgdata)
    except DatabaseSetupError as err:
        stop_standby(server, pgdata)
        raise SystemExit(f"segments: {err}") from None
    except BaseException:  # interrupted while it started
        stop_standby(server, pgdata)
        raise


def _database_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    return str(make_url(url).database)


def _migrate(url: str) -> None:
    from segments_service.database import migrate

    migrate(url)


def _supervise(
    settings: Settings, url: str, replicas: int, run_dir: Path, standby_url: str | None
) -> int:
    supervisor = Supervisor(settings, url, replicas, run_dir, standby_url)

    def on_signal(signum: int, _frame: Any) -> None:
        supervisor.stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        supervisor.start()
        if supervisor.stopping:  # stopped while starting
            code = 130
        else:
            where = (
                f"embedded PostgreSQL in {settings.data_dir}"
                if settings.database_url is None
                else "DATABASE_URL"
            )
            listening = ",".join(str(p) for p in supervisor.ports)
            metrics = (
                f"metrics http://{_url_host(settings.metrics_host)}:{settings.metrics_port}"
                "/metrics  "
                if settings.metrics_port
                else ""
            )
            rest = host_port(settings.http_host, settings.http_port)
            grpc_at = host_port(settings.host, supervisor.ports[0]).rsplit(":", 1)[0]
            replica = (
                f"  replica: {standby_url.replace('postgresql+psycopg://', 'postgresql://')}"
                if standby_url is not None
                else ""
            )
            print(
                f"segments ready: REST http://{rest}  "
                f"gRPC {grpc_at}:{listening}  {metrics}database: {where}{replica}  "
                "(Ctrl-C to stop)",
                flush=True,
            )
            code = supervisor.watch()
    finally:
        supervisor.stop()
    print("segments stopped", flush=True)
    return code


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _serve_metrics(settings: Settings) -> None:
    """`segments serve` alone: its own /metrics when SEGMENTS_METRICS_PORT is set (under
    `segments run` the supervisor serves them all, and sets no port for its replicas)."""
    if not settings.metrics_port_set or settings.metrics_port == 0:
        return
    from prometheus_client import REGISTRY

    from segments_service.metrics_endpoint import MetricsEndpoint, multiprocess_registry

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry = multiprocess_registry(Path(directory)) if directory else REGISTRY
    host, port = settings.metrics_host, settings.metrics_port
    try:
        MetricsEndpoint(host, port, registry).start()
    except OSError as err:
        raise SystemExit(
            f"segments: cannot serve metrics on {host}:{port} (SEGMENTS_METRICS_PORT): {err}"
        ) from None
    log.info("metrics on http://%s:%d/metrics", _url_host(host), port)


def _bounded_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena; with a pool of RPC
    threads that multiplies idle memory. Two arenas keep RSS flat at no measurable cost.
    Applied by re-executing before anything starts, unless the operator chose a value."""
    if "MALLOC_ARENA_MAX" not in os.environ and sys.platform.startswith("linux"):
        os.environ["MALLOC_ARENA_MAX"] = "2"
        os.execv(sys.executable, [sys.executable, "-m", "segments_service.cli", *sys.argv[1:]])


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.server import serve

    _bounded_malloc_arenas()

    url, _server = _database(settings)
    if args.migrate:
        _migrate(url)
    _serve_metrics(settings)
    serve(url, settings, args.port if args.port is not None else settings.grpc_port)
    return 0


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    url, _server = _database(settings)
    _migrate(url)
    print("schema is up to date")
    return 0


def _with_session(settings: Settings, work: Any) -> Any:
    url, _server = _database(settings)
    from segments_service.database import make_engine, make_sessionmaker

    _migrate(url)
    engine = make_engine(url, pool_size=1)
    try:
        with make_sessionmaker(engine).begin() as session:
            return work(session)
    finally:
        engine.dispose()


def cmd_create_project(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import create_project

    name = args.name.strip()
    if not name:
        raise SystemExit("segments: --name must not be empty")
    keys = _with_session(settings, lambda s: create_project(s, name))
    print(json.dumps(keys))
    return 0


def _key_argument(raw: str) -> str:
    """The key itself, or `-`: read it from standard input (keeps it out of `ps`)."""
    key = sys.stdin.readline() if raw == "-" else raw
    return key.strip()


def cmd_rotate_key(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import rotate_key
    from segments_service.errors import NotFound

    try:
        key = _key_argument(args.key)
        new = _with_session(settings, lambda s: rotate_key(s, key))
    except NotFound:
        raise SystemExit("segments: no live key matches") from None
    kind = "secretKey" if new.startswith("sk_") else "publicKey"
    print(json.dumps({kind: new}))
    return 0


def cmd_revoke_key(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import revoke_key
    from segments_service.errors import NotFound

    try:
        key = _key_argument(args.key)
        project_id = _with_session(settings, lambda s: revoke_key(s, key))
    except NotFound:
        raise SystemExit("segments: no live key matches") from None
    print(json.dumps({"revoked": True, "projectId": str(project_id)}))
    return 0


def _time(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _project(session: Any, ref: str) -> Any:
    from segments_service.auth import find_project
    from segments_service.errors import FailedPrecondition, NotFound

    try:
        return find_project(session, ref)
    except NotFound as err:
        raise SystemExit(f"segments: {err}; `segments projects` lists them") from None
    except FailedPrecondition as err:
        raise SystemExit(f"segments: {err}") from None


def cmd_projects(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import list_projects

    projects = _with_session(settings, list_projects)
    if args.json:
        print(
            json.dumps(
                [
                    {"id": str(p.id), "name": p.name, "createdAt": _time(p.created_at)}
                    for p in projects
                ]
            )
        )
    else:
        _print_table(
            ("ID", "NAME", "CREATED"),
            [(str(p.id), p.name, _time(p.created_at)) for p in projects],
        )
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import list_keys

    keys = _with_session(settings, lambda s: list_keys(s, _project(s, args.project).id))
    shown = [
        {
            "id": str(k.id),
            "type": k.kind,
            # Keys are stored hashed: only their first characters can be shown.
            "prefix": k.prefix + "…",
            "createdAt": _time(k.created_at),
            "revokedAt": _time(k.revoked_at) or None,
        }
        for k in keys
    ]
    if args.json:
        print(json.dumps(shown))
    else:
        _print_table(
            ("ID", "TYPE", "KEY", "CREATED", "REVOKED"),
            [
                (k["id"], k["type"], k["prefix"], k["createdAt"], k["revokedAt"] or "-")
                for k in shown
            ],
        )
    return 0


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import issue_key

    key = _with_session(settings, lambda s: issue_key(s, _project(s, args.project).id, args.type))
    print(json.dumps({"key": key, "type": args.type}))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from segments_service.auth import revoke_key, revoke_key_by_id
    from segments_service.errors import NotFound

    key = _key_argument(args.key)
    try:
        key_id = uuid.UUID(key)
    except ValueError:
        key_id = None
    try:
        project_id = _with_session(
            settings,
            lambda s: revoke_key(s, key) if key_id is None else revoke_key_by_id(s, key_id),
        )
    except NotFound:
        raise SystemExit("segments: no live key matches") from None
    print(json.dumps({"revoked": True, "projectId": str(project_id)}))
    return 0


def _registered_commands(sub: Any) -> None:
    """Commands of other installed packages (the client's `import` and `export`), found
    through the `segments.commands` entry point group: each is a function that adds its
    sub-parsers and sets `handler` (args -> exit status) on them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="segments.commands"):
        entry.load()(sub)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="PostgreSQL (embedded unless DATABASE_URL), gRPC, Envoy")
    run.add_argument("--replicas", type=int, default=1, help="gRPC server processes")
    run.add_argument(
        "--replica",
        action="store_true",
        help="also a streaming standby of the embedded PostgreSQL, serving the reads that "
        "may lag (DATABASE_REPLICA_URL of the servers)",
    )
    serve = sub.add_parser("serve", help="one gRPC server process")
    serve.add_argument("--port", type=int, default=None, help="default: GRPC_PORT")
    serve.add_argument("--migrate", action="store_true", help="migrate before serving")
    sub.add_parser("migrate", help="apply database migrations")
    create = sub.add_parser("create-project", help="create a project; prints its keys as JSON")
    create.add_argument("--name", required=True)
    rotate = sub.add_parser("rotate-key", help="revoke a key and print its replacement")
    rotate.add_argument("key", help="the key, or - to read it from standard input")
    revoke = sub.add_parser("revoke-key", help="revoke a key (as `keys revoke`)")
    revoke.add_argument("key", help="the key, or - to read it from standard input")
    projects = sub.add_parser("projects", help="list the projects: id, name, created")
    projects.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    keys = sub.add_parser("keys", help="list, create and revoke a project's API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_list = keys_sub.add_parser(
        "list", help="a project's keys (hashed: their first characters)"
    )
    keys_list.add_argument("project", metavar="PROJECT", help="the project's id or name")
    keys_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    keys_create = keys_sub.add_parser("create", help='a new key; prints {"key", "type"} as JSON')
    keys_create.add_argument("project", metavar="PROJECT", help="the project's id or name")
    keys_create.add_argument("--type", required=True, choices=("secret", "public"))
    keys_revoke = keys_sub.add_parser("revoke", help="revoke a key")
    keys_revoke.add_argument(
        "key",
        metavar="KEY",
        help="the key, its id (`keys list`), or - to read it from standard input",
    )
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] not in sub.choices:
        # Loaded only when asked for (or for the help): they import gRPC and the client.
        _registered_commands(sub)
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "run" and args.replicas < 1:
        parser.error("--replicas must be at least 1")
    handler = getattr(args, "handler", None)
    if handler is not None:
        return int(handler(args))
    settings = Settings.from_env()
    if args.command == "keys":
        keys_commands = {
            "list": cmd_keys_list,
            "create": cmd_keys_create,
            "revoke": cmd_keys_revoke,
        }
        return int(keys_commands[args.keys_command](args, settings))
    commands = {
        "run": cmd_run,
        "serve": cmd_serve,
        "migrate": cmd_migrate,
        "create-project": cmd_create_project,
        "rotate-key": cmd_rotate_key,
        "revoke-key": cmd_revoke_key,
        "projects": cmd_projects,
    }
    return int(commands[args.command](args, settings))


if __name__ == "__main__":
    sys.exit(main())
