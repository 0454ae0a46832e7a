"""Settings read from the environment, with the defaults `make run` uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"{name} must be 1 or 0, got {raw!r}")


@dataclass(frozen=True)
class WebhookSettings:
    """How webhook deliveries are made (webhooks/worker.py); SEGMENTS_WEBHOOK_* variables."""

    # Loopback and private addresses may be delivered to (local development, tests);
    # link-local ones never.
    allow_private: bool = False
    # Deliveries in flight at once in one server, and at most this many of one project.
    workers: int = 4
    project_workers: int = 2
    # How often the workers look for due deliveries.
    poll_seconds: float = 0.5
    # An attempt's limit: connecting, sending and the response's status line.
    timeout: float = 10.0
    # Backoff: the n-th retry after about first * 2**(n-1) seconds (at most `longest`),
    # each delay drawn between half and all of it (jitter).
    retry_first: float = 10.0
    retry_longest: float = 300.0
    # An event not delivered this long after it happened is given up (FAILED).
    give_up: float = 24 * 3600.0
    # Finished deliveries are kept this long for the deliveries listing.
    retention: float = 7 * 24 * 3600.0

    @classmethod
    def from_env(cls) -> WebhookSettings:
        default = cls()
        return cls(
            allow_private=_flag("SEGMENTS_WEBHOOK_ALLOW_PRIVATE"),
            workers=_int("SEGMENTS_WEBHOOK_WORKERS", default.workers),
            project_workers=_int("SEGMENTS_WEBHOOK_PROJECT_WORKERS", default.project_workers),
            poll_seconds=_float("SEGMENTS_WEBHOOK_POLL_SECONDS", default.poll_seconds),
            timeout=_float("SEGMENTS_WEBHOOK_TIMEOUT", default.timeout),
            retry_first=_float("SEGMENTS_WEBHOOK_RETRY_FIRST", default.retry_first),
            retry_longest=_float("SEGMENTS_WEBHOOK_RETRY_LONGEST", default.retry_longest),
            give_up=_float("SEGMENTS_WEBHOOK_GIVE_UP", default.give_up),
            retention=_float("SEGMENTS_WEBHOOK_RETENTION", default.retention),
        )


# Seconds a standby may be behind the primary and still serve the reads that may lag.
DEFAULT_REPLICA_MAX_LAG = 5.0


@dataclass(frozen=True)
class Settings:
    """Everything configurable, one field per environment variable."""

    database_url: str | None
    data_dir: Path
    grpc_port: int
    http_port: int
    # The address the gRPC servers listen on (SEGMENTS_HOST), and Envoy's REST listener
    # (SEGMENTS_HTTP_HOST, else the same).
    host: str
    http_host: str
    workers: int
    db_pool_size: int
    sweep_seconds: float
    drain_seconds: float
    rate_limit_per_minute: int
    project_concurrency: int
    project_streams: int
    project_evaluations: int
    request_timeout: float
    # Seconds one statement of background work (a sweep) may run.
    background_timeout: float
    inline_build_contacts: int
    build_slice: int
    webhooks: WebhookSettings
    # The /metrics endpoint: `segments run` serves it on this port (default 9464, 0: none);
    # `segments serve` alone only when SEGMENTS_METRICS_PORT is set (metrics_port_set).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    metrics_port_set: bool = False
    # A streaming standby of the database (DATABASE_REPLICA_URL) for the reads that may lag
    # (replica.py), used while it is at most replica_max_lag seconds behind
    # (SEGMENTS_REPLICA_MAX_LAG); without it every read is the primary's.
    replica_url: str | None = None
    replica_max_lag: float = DEFAULT_REPLICA_MAX_LAG

    @classmethod
    def from_env(cls) -> Settings:
        host = os.environ.get("SEGMENTS_HOST") or DEFAULT_HOST
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=data_dir(),
            grpc_port=_int("GRPC_PORT", 50051),
            http_port=_int("HTTP_PORT", 8080),
            host=host,
            http_host=os.environ.get("SEGMENTS_HTTP_HOST") or host,
            workers=_int("SEGMENTS_WORKERS", 16),
            db_pool_size=_int("SEGMENTS_DB_POOL", 10),
            sweep_seconds=_float("SEGMENTS_SWEEP_SECONDS", 60.0),
            drain_seconds=_float("SEGMENTS_DRAIN_SECONDS", 20.0),
            rate_limit_per_minute=_int("SEGMENTS_RATE_LIMIT_PER_MINUTE", 1000),
            project_concurrency=_int("SEGMENTS_PROJECT_CONCURRENCY", 8),
            project_streams=_int("SEGMENTS_PROJECT_STREAMS", 16),
            project_evaluations=_int("SEGMENTS_PROJECT_EVALUATIONS", 1),
            request_timeout=_float("SEGMENTS_REQUEST_TIMEOUT", 30.0),
            background_timeout=background_timeout(),
            inline_build_contacts=inline_build_contacts(),
            build_slice=_int("SEGMENTS_BUILD_SLICE", DEFAULT_BUILD_SLICE),
            webhooks=WebhookSettings.from_env(),
            metrics_host=os.environ.get("SEGMENTS_METRICS_HOST") or "127.0.0.1",
            metrics_port=_int("SEGMENTS_METRICS_PORT", DEFAULT_METRICS_PORT),
            metrics_port_set=bool(os.environ.get("SEGMENTS_METRICS_PORT")),
            replica_url=os.environ.get("DATABASE_REPLICA_URL") or None,
            replica_max_lag=_float("SEGMENTS_REPLICA_MAX_LAG", DEFAULT_REPLICA_MAX_LAG),
        )


# Where the servers listen unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"


def connect_host(bind: str) -> str:
    """The address this machine reaches a server listening on `bind` at: loopback for the
    wildcard addresses (every interface), else `bind` itself."""
    unbracketed = bind.strip("[]")
    if unbracketed in ("0.0.0.0", ""):
        return "127.0.0.1"
    if unbracketed == "::":
        return "::1"
    return unbracketed


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (`[::1]:8080`)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def checkout_root() -> Path | None:
    """The repository this code runs from (an editable install, `make run`), else None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "service" / "segments_service").is_dir():
        return root
    return None


def envoy_root() -> Path:
    """Where Envoy's committed files are (envoy/envoy.json, filter.lua, segments.pb) and
    openapi/openapi.json: the checkout, or the copies a built package carries (setup.py)."""
    checkout = checkout_root()
    if checkout is not None:
        return checkout
    return Path(__file__).resolve().parent / "bundle"


def data_dir() -> Path:
    """Where the embedded PostgreSQL and Envoy's files live: SEGMENTS_DATA_DIR, else the
    checkout's own `.data/`, else (an installed package) the user's data directory,
    /var/lib/segments for root. Never the current directory: every command of one
    installation must find the database `make run` serves, wherever it is started."""
    raw = os.environ.get("SEGMENTS_DATA_DIR")
    if raw:
        return Path(raw).expanduser().resolve()
    checkout = checkout_root()
    if checkout is not None:
        return checkout / ".data"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root's home is private, and the embedded server runs as another system user
        # that must traverse every parent (database.start_embedded).
        return Path("/var/lib/segments")
    import platformdirs

    return Path(platformdirs.user_data_dir("segments", appauthor=False))


# Where `segments run` serves /metrics (Prometheus exporters' customary port range).
DEFAULT_METRICS_PORT = 9464

# Segment builds (builds.py): projects of at most this many contacts build inline.
DEFAULT_INLINE_BUILD_CONTACTS = 10_000
# Each background statement's budget, in seconds.
DEFAULT_BACKGROUND_TIMEOUT = 60.0
# Contacts per slice of a background build.
DEFAULT_BUILD_SLICE = 50_000


def inline_build_contacts() -> int:
    return _int("SEGMENTS_INLINE_BUILD_CONTACTS", DEFAULT_INLINE_BUILD_CONTACTS)


def background_timeout() -> float:
    return _float("SEGMENTS_BACKGROUND_TIMEOUT", DEFAULT_BACKGROUND_TIMEOUT)
