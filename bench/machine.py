"""What a run measured: the machine, the PostgreSQL and Envoy it used, the source tree, and
the size of the tables."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import grpc
import psutil
from sqlalchemy import text

from bench.context import Env
from bench.stack import ROOT


def machine(env: Env) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with env.engine.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        settings = {
            name: conn.execute(text(f"SHOW {name}")).scalar()
            for name in (
                "shared_buffers",
                "work_mem",
                "effective_cache_size",
                "max_parallel_workers_per_gather",
                "jit",
                "random_page_cost",
            )
        }
    try:
        from segments_service.envoy_proxy import find_envoy

        envoy = (
            subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=30)
            .stdout.strip()
            .split("version:")[-1]
            .strip()
        )
    except Exception:
        envoy = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "postgres": version,
        "postgres_embedded": not env.args.database_url,
        "postgres_settings": settings,
        "envoy": envoy[:80],
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, whether the service tree differed from it, and a
    digest of the files that make up the service (so two results can be told apart)."""
    import hashlib

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except OSError:
            return ""

    digest = hashlib.sha256()
    for folder in ("service", "protos", "envoy"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".proto", ".lua", ".pb", ".mako"}:
                digest.update(str(path.relative_to(ROOT)).encode())
                digest.update(path.read_bytes())
    changed = git("status", "--porcelain", "--", "service", "protos", "envoy")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_service_changes": len(changed.splitlines()),
        "service_digest": digest.hexdigest()[:16],
    }


def table_sizes(env: Env) -> dict[str, str]:
    with env.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                "WHERE relname IN ('contacts', 'events', 'segment_members') ORDER BY 1"
            )
        ).all()
    return {r[0]: r[1] for r in rows}
