"""The failover drill (scripts/drill.py), short: the primary PostgreSQL is stopped at once
under load through Envoy to three servers, its synchronous standby promoted, and no
acknowledged write is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_failover_loses_no_acknowledged_write(tmp_path: Path) -> None:
    output = tmp_path / "drill.json"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.drill",
            "--seconds",
            "16",
            "--connections",
            "6",
            "--ingest-seconds",
            "1",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    record = json.loads(output.read_text())
    assert record["passed"] is True
    assert record["acknowledged_writes"] > 0
    assert record["writes_found"] == record["acknowledged_writes"]
    assert record["lost_writes"] == 0
    # The load went on through the new primary.
    assert record["promoted_at_s"] > record["crashed_at_s"] > 0
    assert record["requests_after_promotion"] > 0
    # Every error was a 503 retried to success, none long after the promotion.
    assert set(record["errors_by_status"]) <= {"503", "dropped connection"}
    assert record["error_window_s"] < record["seconds"]
    checks = {c["name"]: c["ok"] for c in record["checks"]}
    assert checks == {
        "zero lost writes": True,
        "only retried 503s in the kill window": True,
        "member counts equal SQL counts": True,
        "memory flat": True,
    }
    assert record["ingest_synchronous_events_per_s"] > 0
    assert record["ingest_asynchronous_events_per_s"] > 0
    # Nothing of the drill's servers is left running.
    left = subprocess.run(["pgrep", "-f", "segments-drill-"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
