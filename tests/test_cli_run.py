"""`segments run` (what `make run` runs) as a terminal runs it: it refuses a port already in
use before starting anything, and Ctrl-C leaves no process behind, even after its embedded
PostgreSQL was restarted underneath it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

SEGMENTS = Path(sys.executable).parent / "segments"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root the embedded server runs as another system user,
    # which must traverse every parent directory (/tmp/pytest-of-root is private).
    path = Path(tempfile.mkdtemp(prefix="segments-run-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def environment(data_dir: Path, http_port: int, grpc_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        SEGMENTS_DATA_DIR=str(data_dir),
        HTTP_PORT=str(http_port),
        GRPC_PORT=str(grpc_port),
        SEGMENTS_DRAIN_SECONDS="2",
        # Not the default 9464: other stacks may run on this machine meanwhile.
        SEGMENTS_METRICS_PORT=str(free_port()),
        LOG_LEVEL="WARNING",
    )
    return env


def start_stack(env: dict[str, str], log: Path, *options: str) -> subprocess.Popen[bytes]:
    """`segments run` in a session of its own (Ctrl-C signals a terminal's whole foreground
    process group), its output in `log`, once it says it is ready."""
    with log.open("w") as out:
        run = subprocess.Popen(
            [str(SEGMENTS), "run", *options],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "segments ready" not in log.read_text():
        if run.poll() is not None or time.monotonic() > deadline:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError(log.read_text())
        time.sleep(0.3)
    return run


def processes_of(data_dir: Path) -> list[str]:
    """Processes still running that belong to the stack started on `data_dir`: PostgreSQL
    (its -D), Envoy (its config), the replicas (SEGMENTS_DATA_DIR in their environment)."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            mine = str(data_dir) in cmdline
            if not mine and "segments" in cmdline:
                mine = proc.environ().get("SEGMENTS_DATA_DIR") == str(data_dir)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if mine and proc.pid != os.getpid():
            left.append(f"{proc.pid}: {cmdline}")
    return left


def assert_nothing_left(data_dir: Path, within: float = 15.0) -> None:
    """No process of the stack on `data_dir` is left, at the latest `within` seconds from
    now (PostgreSQL may still be finishing its shutdown)."""
    deadline = time.monotonic() + within
    while (left := processes_of(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert left == []


def test_a_port_in_use_is_refused_before_anything_starts(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [str(SEGMENTS), "run"],
            env=environment(data_dir, http_port=port, grpc_port=free_port()),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"127.0.0.1:{port} (HTTP_PORT) is already in use" in done.stderr
    assert f"by process {os.getpid()}" in done.stderr
    assert "HTTP_PORT=8090 make run" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30
    # Nothing was started: no database was made.
    assert not (data_dir / "postgres").exists()


def test_the_grpc_port_too(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(SEGMENTS), "run", "--replicas", "2"],
            env=environment(data_dir, http_port=free_port(), grpc_port=port - 1),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"127.0.0.1:{port} (GRPC_PORT+1) is already in use" in done.stderr


def test_the_metrics_port_too(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = environment(data_dir, http_port=free_port(), grpc_port=free_port())
        done = subprocess.run(
            [str(SEGMENTS), "run"],
            env={**env, "SEGMENTS_METRICS_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"127.0.0.1:{port} (SEGMENTS_METRICS_PORT) is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (data_dir / "postgres").exists()


def test_the_rest_listener_is_checked_where_it_listens(data_dir: Path) -> None:
    """SEGMENTS_HTTP_HOST moves Envoy's REST listener (here to another loopback address),
    and the port is checked there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(SEGMENTS), "run"],
            env={
                **environment(data_dir, http_port=port, grpc_port=free_port()),
                "SEGMENTS_HTTP_HOST": "127.0.0.2",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"127.0.0.2:{port} (HTTP_PORT) is already in use" in done.stderr


@pytest.mark.slow
def test_listen_addresses_follow_segments_host(data_dir: Path) -> None:
    """SEGMENTS_HOST moves the gRPC servers and, unless SEGMENTS_HTTP_HOST says otherwise,
    Envoy's REST listener; the OpenAPI document served there names that address."""
    http_port, grpc_port = free_port(), free_port()
    env = {**environment(data_dir, http_port, grpc_port), "SEGMENTS_HOST": "127.0.0.3"}
    log = data_dir / "run.log"
    run = start_stack(env, log)
    try:
        ready = log.read_text()
        assert f"REST http://127.0.0.3:{http_port}  gRPC 127.0.0.3:{grpc_port}" in ready, ready
        with urllib.request.urlopen(f"http://127.0.0.3:{http_port}/openapi.json") as resp:
            document = json.loads(resp.read())
        assert document["servers"] == [{"url": f"http://127.0.0.3:{http_port}"}]
        for port in (http_port, grpc_port):
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.3", port)) == 0
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0, port
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(60) == 0, log.read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_leaves_nothing_behind(data_dir: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    env = environment(data_dir, http_port, grpc_port)
    log = data_dir / "run.log"
    run = start_stack(env, log)
    try:
        assert f"embedded PostgreSQL in {data_dir}" in log.read_text()

        # PostgreSQL goes down and another command starts it again underneath the run.
        pgdata = data_dir / "postgres"
        first = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(first, signal.SIGQUIT)
        psutil.Process(first).wait(30)
        migrated = subprocess.run(
            [str(SEGMENTS), "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert migrated.returncode == 0, migrated.stderr
        second = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert second != first and psutil.pid_exists(second)

        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(60) == 0, log.read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "segments stopped" in log.read_text()
    assert_nothing_left(data_dir)
    # The ports are free again.
    for port in (http_port, grpc_port):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_a_closed_terminal_stops_everything(data_dir: Path) -> None:
    """SIGHUP (the terminal went away) stops the stack as Ctrl-C does."""
    env = environment(data_dir, free_port(), free_port())
    log = data_dir / "run.log"
    run = start_stack(env, log)
    try:
        os.killpg(run.pid, signal.SIGHUP)
        assert run.wait(60) == 0, log.read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert_nothing_left(data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("after", [1.0, 3.0])
def test_ctrl_c_while_starting_leaves_nothing_behind(data_dir: Path, after: float) -> None:
    """Whatever it is doing (initdb, migrating, starting replicas or Envoy), Ctrl-C ends the
    start cleanly: no traceback, no process left, not even with SIGINT inherited ignored
    (as `make run &` leaves it)."""
    env = environment(data_dir, free_port(), free_port())
    run = subprocess.Popen(
        [str(SEGMENTS), "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        time.sleep(after)
        os.killpg(run.pid, signal.SIGINT)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode in (0, 130), output
    assert "Traceback" not in output
    assert_nothing_left(data_dir)


@pytest.mark.slow
def test_a_built_package_runs_without_the_checkout(data_dir: Path, tmp_path: Path) -> None:
    """`pip install` of the wheel, then `segments run` from it: Envoy's files and the
    OpenAPI document come with the package (setup.py), not from a checkout."""
    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"
    for name in ("service", "client", "stubs", "envoy", "openapi"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(root / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("segments-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300
    )
    http_port = free_port()
    env = {**environment(data_dir, http_port, free_port()), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import segments_service; print(segments_service.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site)), where
    command = [sys.executable, "-m", "segments_service.cli"]
    log = tmp_path / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [*command, "run"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while "segments ready" not in log.read_text():
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        created = subprocess.run(
            [*command, "create-project", "--name", "installed"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(created.stdout)["secretKey"]
        base = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{base}/openapi.json", timeout=10) as reply:
            document = json.load(reply)
        assert document["servers"][0]["url"] == base
        request = urllib.request.Request(
            f"{base}/segments", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
            assert json.load(reply) == []
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(timeout=60)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode in (0, 130), log.read_text()
    assert_nothing_left(data_dir, within=0)


def test_a_run_with_its_standby_serves_listings_from_it_and_stops_both(data_dir: Path) -> None:
    http_port = free_port()
    env = environment(data_dir, http_port, free_port())
    log = data_dir / "run.log"
    run = start_stack(env, log, "--replica")
    try:
        standby = data_dir / "replica"
        assert f"replica: postgresql://postgres@/segments?host={standby}&port=5433" in (
            log.read_text()
        )
        assert (standby / "standby.signal").exists()
        created = subprocess.run(
            [str(SEGMENTS), "create-project", "--name", "Acme"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        key = json.loads(created.stdout)["secretKey"]
        listing = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/contacts", headers={"Authorization": f"Bearer {key}"}
        )
        metrics = f"http://127.0.0.1:{env['SEGMENTS_METRICS_PORT']}/metrics"
        served = 'segments_replica_reads_total{reason="fresh",served_by="replica"} 1.0'
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(listing, timeout=30) as reply:
                assert json.loads(reply.read())["data"] == []
            with urllib.request.urlopen(metrics, timeout=30) as reply:
                if served in reply.read().decode():
                    break  # the standby answered it (before it was measured: the primary)
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(60) == 0, log.read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert "segments stopped" in log.read_text()
    assert_nothing_left(data_dir)
    assert not (data_dir / "replica" / "postmaster.pid").exists()


def test_a_standby_of_another_server_is_named_not_started(data_dir: Path) -> None:
    env = environment(data_dir, free_port(), free_port())
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:5432/postgres"
    done = subprocess.run(
        [str(SEGMENTS), "run", "--replica"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "point DATABASE_REPLICA_URL at a standby of that server" in done.stderr
    assert not (data_dir / "replica").exists()
