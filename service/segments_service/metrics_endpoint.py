"""The /metrics endpoint (Prometheus text format): the series of metrics.py, summed over the
server processes of a `segments run` (prometheus_client's multiprocess files), followed by
Envoy's own statistics, read from its admin interface on a Unix socket of the run.

A scrape reads small files and asks Envoy once; it never touches the database.
"""

from __future__ import annotations

import http.client
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

# Envoy's counters and gauges that have been used (the others are all zero), in the format
# Prometheus reads.
ENVOY_STATS_PATH = "/stats/prometheus?usedonly"
ENVOY_TIMEOUT = 1.0


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """A registry of the values the server processes write into `directory`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return registry


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


def envoy_stats(admin_socket: Path, timeout: float = ENVOY_TIMEOUT) -> bytes:
    """Envoy's statistics in the Prometheus text format, from its admin socket."""
    connection = _UnixConnection(admin_socket, timeout)
    try:
        connection.request("GET", ENVOY_STATS_PATH)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"Envoy's admin interface answered {response.status}")
        return body
    finally:
        connection.close()


def _envoy_part(admin_socket: Path) -> bytes:
    try:
        return envoy_stats(admin_socket)
    except OSError as err:
        return f"# Envoy's statistics are unavailable: {err}\n".encode()


def render(
    registry: CollectorRegistry,
    admin_socket: Path | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> bytes:
    """One scrape: the registry's series, then Envoy's (a comment if Envoy cannot answer);
    with `pool`, Envoy is asked while the registry is read."""
    if admin_socket is None:
        return generate_latest(registry)
    if pool is None:
        return generate_latest(registry) + _envoy_part(admin_socket)
    theirs = pool.submit(_envoy_part, admin_socket)
    ours = generate_latest(registry)
    return ours + theirs.result()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), handler)


class MetricsEndpoint:
    """Serves GET /metrics on host:port from a thread of its own until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        admin_socket: Path | None = None,
    ) -> None:
        endpoint = self
        self.registry = registry
        self.admin_socket = admin_socket
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="metrics-envoy")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self._answer(404, b"not found; the metrics are at /metrics\n")
                    return
                self._answer(200, render(endpoint.registry, endpoint.admin_socket, endpoint.pool))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape is not news: a healthy server's log stays quiet

        # Binding here: a port in use fails the caller at once (OSError).
        self.server = _Server(host, port, Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )

    def start(self) -> MetricsEndpoint:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.pool.shutdown(wait=False)
