"""The stack under test, as separate processes: one `segments serve` gRPC server, Envoy in front
of it, a sampler of their memory, and small gRPC/REST clients."""

from __future__ import annotations

import functools
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine

from segments_api.v1 import contacts_pb2_grpc, events_pb2_grpc, segments_pb2_grpc
from segments_service import envoy_proxy
from segments_service.database import make_engine

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "envoy" / "segments.pb"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


# Run as `python -c _WITH_PARENT <bench pid> <program> <args...>`: it asks Linux to SIGTERM
# it when the bench dies, however it dies (no orphaned servers), then becomes the program,
# whose pid it keeps. A fresh interpreter does it, not a `preexec_fn` of the bench: the
# bench has gRPC threads running, and Python code between fork and exec in such a process
# can deadlock or abort the child (Envoy died of SIGABRT that way under load).
_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except OSError:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("the benchmark exited before its child started")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it ends with the bench (see _WITH_PARENT)."""
    return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *argv]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now (replicas of `segments
    run` listen on GRPC_PORT, GRPC_PORT+1, ...)."""
    import socket

    while True:
        base = free_port()
        if base + count > 65536:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()


class Server:
    """`python -m segments_service.cli serve` on the benchmark database."""

    def __init__(self, database_url: str, sweep_seconds: float, log_path: Path) -> None:
        self.port = free_port()
        self.database_url = database_url
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SEGMENTS_SWEEP_SECONDS": str(sweep_seconds),
            # The bench measures capacity, not the REST rate limit (its own tests cover it).
            "SEGMENTS_RATE_LIMIT_PER_MINUTE": "0",
            "LOG_LEVEL": "WARNING",
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            with_parent(
                [sys.executable, "-m", "segments_service.cli", "serve", "--port", str(self.port)]
            ),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        health: Any = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log_path}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {log_path}") from None
                time.sleep(0.1)
        self.segments = segments_pb2_grpc.SegmentServiceStub(self.channel)
        self.contacts = contacts_pb2_grpc.ContactServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)

    def new_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Envoy:
    """Envoy exactly as `make run` configures it in front of `grpc_port`."""

    def __init__(self, grpc_port: int) -> None:
        self.http_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="bench-envoy-")
        workdir = Path(self._dir.name)
        config = envoy_proxy.render_config(
            http_port=self.http_port,
            upstreams=[("127.0.0.1", grpc_port)],
            descriptor_path=DESCRIPTOR,
        )
        # As envoy_proxy.start_envoy does, plus: Envoy goes when the bench goes.
        config_path = workdir / envoy_proxy.CONFIG_FILE
        config_path.write_text(config)
        self._log = (workdir / "envoy.log").open("ab")
        self.proc = subprocess.Popen(
            with_parent(
                [
                    envoy_proxy.find_envoy(),
                    "--config-path",
                    str(config_path),
                    "--disable-hot-restart",
                    "--log-level",
                    "warn",
                ]
            ),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            envoy_proxy.wait_ready(self.http_port, timeout=30, process=self.proc)
        except RuntimeError as err:
            # The log lives in the temporary directory, which goes with this object.
            self.stop()
            raise RuntimeError(f"{err}; its log ended with:\n{self.log_tail}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.log_tail = self._read_tail()
        self._dir.cleanup()

    def _read_tail(self, lines: int = 30) -> str:
        try:
            text = (Path(self._dir.name) / "envoy.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class Rest:
    """HTTP/1.1 with keep-alive, as a REST caller with a connection pool would talk to Envoy."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self.conn

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self.conn = None
                if attempt == 2:
                    raise
                continue
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {raw[:300]!r}")
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class MemoryPeak:
    max_bytes: int = 0
    samples: int = 0


class Sampler:
    """Samples the RSS of named processes every `interval` s and keeps the peak per phase.

    Also accounts the CPU time of every *other* process on the machine (anything but the
    bench, the server, Envoy and PostgreSQL's work for `database`), so that a result taken
    on a busy machine says so; and, apart, that of PostgreSQL's own background work
    (autovacuum, checkpointer, WAL writer, ...), which runs beside the timed statements."""

    def __init__(self, pids: dict[str, int], database: str, interval: float = 0.05) -> None:
        self.interval = interval
        self.database = database
        self.phase_name = "startup"
        self.peaks: dict[str, dict[str, MemoryPeak]] = {}
        self.foreign_cpu: dict[str, float] = {}
        self.background_cpu: dict[str, dict[str, float]] = {}
        self.wall: dict[str, float] = {}
        self.stopping = threading.Event()
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._ours = {os.getpid(), *pids.values()}
        self._cpu_seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.run, name="rss-sampler", daemon=True)
        self._phase_started = time.perf_counter()

    def start(self) -> None:
        self._foreign_cpu()  # baseline
        self._thread.start()

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stopping.is_set():
            self.sample()
            if time.perf_counter() - last >= 1.0:
                last = time.perf_counter()
                self._account_foreign()
            self.stopping.wait(self.interval)

    def _is_ours(self, proc: psutil.Process, cmdline: list[str]) -> bool:
        if proc.pid in self._ours:
            return True
        title = " ".join(cmdline)
        if not title.startswith("postgres"):
            return False
        if self.database in title:
            return True
        # PostgreSQL's shared processes (checkpointer, WAL writer, I/O workers, ...) serve
        # every database; they are counted as ours unless they name another database.
        return " segments_" not in title and " [local]" not in title and "@" not in title

    @staticmethod
    def _background_kind(cmdline: list[str]) -> str | None:
        """The kind, autovacuum or other, of PostgreSQL's background processes, else None
        (client backends, which serve the bench and the server, carry `[local]` or an
        address)."""
        title = " ".join(cmdline)
        if not title.startswith("postgres:") or " [local]" in title or "@" in title:
            return None
        if "autovacuum worker" in title:
            return "autovacuum"
        parts = title.split()
        # A client backend over TCP: "postgres: user database 127.0.0.1(port) state".
        if len(parts) > 3 and "(" in parts[3]:
            return None
        return "other"

    def _foreign_cpu(self) -> tuple[float, dict[str, float]]:
        added = 0.0
        background: dict[str, float] = {}
        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
            try:
                times = proc.info["cpu_times"]
                if times is None:
                    continue
                total = times.user + times.system
                cmdline = proc.info["cmdline"] or []
            except psutil.Error:
                continue
            previous = self._cpu_seen.get(proc.pid)
            self._cpu_seen[proc.pid] = total
            if previous is None:
                continue
            used = max(0.0, total - previous)
            if not self._is_ours(proc, cmdline):
                added += used
            elif (kind := self._background_kind(cmdline)) is not None:
                background[kind] = background.get(kind, 0.0) + used
        return added, background

    def _account_foreign(self) -> None:
        added, background = self._foreign_cpu()
        with self._lock:
            self.foreign_cpu[self.phase_name] = self.foreign_cpu.get(self.phase_name, 0.0) + added
            phase = self.background_cpu.setdefault(self.phase_name, {})
            for kind, used in background.items():
                phase[kind] = phase.get(kind, 0.0) + used

    def sample(self) -> None:
        for name, proc in self._procs.items():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            with self._lock:
                peak = self.peaks.setdefault(self.phase_name, {}).setdefault(name, MemoryPeak())
                peak.max_bytes = max(peak.max_bytes, rss)
                peak.samples += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._account_foreign()
        with self._lock:
            previous, self.phase_name = self.phase_name, name
        started = time.perf_counter()
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self._account_foreign()
            with self._lock:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started
                self.phase_name = previous

    def foreign_load(self) -> dict[str, Any]:
        """Per phase: CPU seconds used by other processes, and as a share of all cores."""
        cores = os.cpu_count() or 1
        with self._lock:
            return {
                name: {
                    "cpu_seconds": round(cpu, 1),
                    "share_of_machine": round(cpu / (self.wall[name] * cores), 3)
                    if self.wall.get(name)
                    else None,
                }
                for name, cpu in self.foreign_cpu.items()
            }

    def background_load(self) -> dict[str, dict[str, float]]:
        """Per phase: CPU seconds of PostgreSQL's background processes, by kind."""
        with self._lock:
            return {
                name: {kind: round(cpu, 1) for kind, cpu in sorted(kinds.items())}
                for name, kinds in self.background_cpu.items()
            }

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(5)

    def peak_mb(self, process: str, phase: str | None = None) -> float:
        with self._lock:
            values = [
                peaks[process].max_bytes
                for name, peaks in self.peaks.items()
                if process in peaks and (phase is None or name == phase)
            ]
        return round(max(values, default=0) / 2**20, 1)

    def by_phase(self, process: str) -> dict[str, float]:
        with self._lock:
            return {
                name: round(peaks[process].max_bytes / 2**20, 1)
                for name, peaks in self.peaks.items()
                if process in peaks
            }


@functools.cache
def status_engine(database_url: str) -> Engine:
    """A connection for reading a segment's build status without asking the server (whose
    GetSegment of a BUILDING segment counts it live)."""
    return make_engine(database_url, pool_size=1, application_name="bench:status")
