"""The benchmark's verdict: every target it measured applies, whatever the size it ran at,
and a smoke run of the whole benchmark at a tiny size on the test server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bench import load
from bench.dataset import check_disk, with_database
from bench.phases.ingestion import names_read
from bench.report import ladder_step, render_targets
from bench.run import verdict
from bench.targets import compute_targets
from segments_service.database import drop_database, sqlalchemy_url
from tests.conftest import ROOT, _admin_url

MET = {"measured": 1.1, "limit": 1.5, "met": True, "unit": "x"}
MISSED = {
    "measured": 2.29,
    "limit": 1.5,
    "met": False,
    "unit": "x",
    "worst_scenario": "data_timestamp_within",
    "note": {"data_timestamp_within": {"by": "2.29x, 1.53 times the limit"}},
}


def _results(**targets: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": {"contacts": 1_000}, "scenarios": [{"name": "a"}], "targets": targets}


def test_targets_met_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert verdict(_results(compiled_vs_hand_sql=MET), no_enforce=False) == 0
    assert "all 1 targets met" in capsys.readouterr().err


def test_a_missed_target_fails_the_run_and_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    results = _results(compiled_vs_hand_sql=MISSED, preview_vs_count=MET)
    assert verdict(results, no_enforce=False) == 1
    err = capsys.readouterr().err
    assert "TARGETS MISSED (1 of 2):" in err
    assert (
        "compiled_vs_hand_sql: 2.29 x (worst_scenario data_timestamp_within), limit <= 1.50 x"
        in err
    )
    assert "preview_vs_count" not in err


def test_no_enforce_lists_misses_but_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert verdict(_results(compiled_vs_hand_sql=MISSED), no_enforce=True) == 0
    err = capsys.readouterr().err
    assert "TARGETS MISSED (1 of 1): not enforced (--no-enforce):" in err
    assert "compiled_vs_hand_sql: 2.29 x" in err


@pytest.mark.parametrize("no_enforce", [False, True])
def test_a_failure_fails_the_run_even_unenforced(
    no_enforce: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    failed_phase = {**_results(compiled_vs_hand_sql=MET), "scale": {"error": "KeyError: 'x'"}}
    assert verdict(failed_phase, no_enforce=no_enforce) == 1
    assert "scale: KeyError: 'x'" in capsys.readouterr().err
    failed_scenario = {
        **_results(compiled_vs_hand_sql=MET),
        "scenarios": [{"name": "a", "error": "ValueError: answers differ"}],
    }
    assert verdict(failed_scenario, no_enforce=no_enforce) == 1
    assert "scenarios[a]: ValueError: answers differ" in capsys.readouterr().err
    unmeasured = _results(count_growth={"measured": None, "limit": 1.0, "met": False})
    assert verdict(unmeasured, no_enforce=no_enforce) == 1
    assert "count_growth: not measured" in capsys.readouterr().err


def _server_version(url: str) -> int:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return int(row[0])


def test_a_ladder_step_left_out_is_reported_as_not_measured() -> None:
    run = {"events_per_second": 24_865, "batch_ms": {"median": 155.0, "p95": 233.3}}
    ladder = {"steps": {"5": run}, "ratio_to_five": {"5": 1.0}}
    assert ladder_step("5", ladder).startswith("24,865 events/s (batch p50 155.0 ms")
    assert ladder_step("50", ladder) == "not measured (not a step of --ladder-steps)"


def test_an_ingestion_floor_left_unmeasured_reads_as_such() -> None:
    five = {
        "events_per_second": 24_865,
        "workers": 4,
        "batch_ms": {"median": 155.0, "p95": 233.3},
    }
    results = {"ingestion": {"ladder": {"steps": {"5": five}, "ratio_to_five": {"5": 1.0}}}}
    targets = compute_targets(results, {}, ["ingestion"])
    assert targets["ingest_5_segments"]["met"] is True
    for name in ("ingest_50_segments", "ingest_200_segments"):
        assert targets[name]["measured"] is None
        assert targets[name]["comparison"] == ">="
        assert targets[name]["met"] is False
        assert "is not a step of --ladder-steps" in targets[name]["note"]
    table = render_targets(targets)
    assert "| ingest_50_segments | not measured | >= 60,000.00 events/s | **NO** |" in table
    assert (
        "| ingest_200_segments | not measured | >= 0.8 x the 5-segment figure | **NO** |" in table
    )
    assert "None" not in table


def test_the_ladders_extra_targets_are_measured_against_its_5_segment_step() -> None:
    five = {"events_per_second": 20_000, "workers": 4, "batch_ms": {"median": 150, "p95": 230}}
    unread = {**five, "events_per_second": 15_000, "tracked_segments": 200, "names": ["a", "b"]}
    latency = {"median": 0.2, "p95": 1.4, "p99": 1.6, "max": 2.0}
    track = {
        "latency_s": latency,
        "missing": 0,
        "probes": 100,
        "achieved_rate": 4990,
        "target_rate": 5000,
        "batch_size": 100,
        "tracked_segments": 50,
    }
    ladder = {"steps": {"5": five}, "unread": unread, "tracking": track}
    targets = compute_targets({"ingestion": {"ladder": ladder}}, {}, ["ingestion"])
    unread_target = targets["ingest_200_segments_unread_names"]
    assert (unread_target["measured"], unread_target["limit"]) == (15_000, 16_000)
    assert unread_target["met"] is False
    assert "the 2 names none of them reads" in unread_target["rule"]
    tracking_target = targets["tracking_latency_50_segments_p95_seconds"]
    assert (tracking_target["measured"], tracking_target["limit"]) == (1.4, 1.0)
    assert tracking_target["met"] is False
    assert "50 tracked segments" in tracking_target["rule"]
    del ladder["tracking"]
    targets = compute_targets({"ingestion": {"ladder": ladder}}, {}, ["ingestion"])
    assert targets["tracking_latency_50_segments_p95_seconds"]["measured"] is None
    assert (
        "is not a step of --ladder-steps"
        in (targets["tracking_latency_50_segments_p95_seconds"]["note"])
    )


def test_the_names_a_condition_reads_are_found_at_any_depth() -> None:
    nested = {
        "logic": "AND",
        "groups": [
            {
                "filters": [
                    {"field": "data.plan", "operator": "equals", "value": "pro"},
                    {"field": "event.login", "operator": "triggered"},
                ],
                "conditions": {
                    "logic": "OR",
                    "groups": [{"filters": [{"field": "event.a.b", "operator": "triggered"}]}],
                },
            }
        ],
    }
    opened = {"field": "email.opened", "operator": "triggered"}
    email = {"logic": "AND", "groups": [{"filters": [opened]}]}
    assert names_read([nested, email]) == {"login", "a.b", "email.opened", "email.open"}


def test_a_load_the_disk_cannot_hold_is_refused_before_it_starts(tmp_path: Path) -> None:
    specs = load.plan_projects(10**12, 10**13, 3 * 10**12, 2, 10**11, [3 * 10**11])
    with pytest.raises(SystemExit) as refused:
        check_disk(tmp_path, specs)
    message = str(refused.value)
    assert "contacts and" in message and "GB on" in message and "GB are free" in message
    assert "--database-url" in message
    # Beyond the WAL the server may add, a load needs room in proportion to its rows.
    wal = 16 * 2**30
    small = load.disk_needed(load.plan_projects(10**6, 10**7, 3 * 10**6, 2, 10**5, []), wal) - wal
    large = load.disk_needed(load.plan_projects(10**7, 10**8, 3 * 10**7, 2, 10**6, []), wal) - wal
    assert large == 10 * small


@pytest.mark.slow
def test_the_whole_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """`make bench` end to end at 2,000 contacts, every phase, with the knobs at their
    smallest: it runs, every phase finishes and every target is measured. Timing limits
    are not enforced (--no-enforce): at this size the ratios are noise."""
    admin, _handle = _admin_url()
    if _server_version(admin) < 160000:
        pytest.skip("the benchmark's hand-written SQL needs PostgreSQL 16 (pg_input_is_valid)")
    name = f"segments_bench_smoke_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    output = tmp_path / "results.json"
    # The bench's own server and Envoy, and its database on the suite's PostgreSQL.
    command = [
        *(sys.executable, "-m", "bench", "--database-url", admin, "--database-name", name),
        *("--contacts", "2000", "--runs", "1", "--count-seconds", "0"),
        *("--ingest-events", "2000", "--tracking-seconds", "2", "--tracking-rate", "200"),
        *("--ladder-tracking-rate", "200", "--api-rounds", "1", "--preview-rounds", "1"),
        *("--noisy-seconds", "1", "--noisy-streams", "2", "--noisy-counts", "2"),
        *("--noisy-build-timeout", "60", "--no-enforce", "--output", str(output)),
    ]
    try:
        run = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
    finally:
        drop_database(sqlalchemy_url(admin), name)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["targets_enforced"] is False
    targets = results["targets"]
    assert set(targets) == {
        "compiled_vs_hand_sql",
        "rest_get_segment_vs_query",
        "rest_get_segment_vs_trivial",
        "list_segments_vs_trivial",
        "ingest_events_per_second",
        "ingest_5_segments",
        "ingest_50_segments",
        "ingest_200_segments",
        "ingest_200_segments_unread_names",
        "tracking_latency_p95_seconds",
        "tracking_latency_50_segments_p95_seconds",
        "server_rss_mb",
        "count_growth",
        "preview_vs_count",
        "explain_vs_trivial",
        "contact_segments_vs_trivial",
        "noisy_neighbour_streams",
        "noisy_neighbour_counts",
        "build_concurrent_writes",
        "build_response_s",
        "metrics_scrape_ms",
    }
    for target, entry in targets.items():
        assert isinstance(entry["measured"], (int, float)), (target, entry)
        assert isinstance(entry["met"], bool), (target, entry)
    assert {s["name"] for s in results["scenarios"]} == set(results["scenario_names"])
    assert "webhooks" in results and "error" not in results["webhooks"]
    ladder = results["ingestion"]["ladder"]
    # Each step's run records the entries and exits it made; the run of names no segment
    # reads makes none.
    assert all(
        isinstance(run["membership_events_per_1000_events"], int)
        for run in ladder["steps"].values()
    )
    assert ladder["unread"]["membership_events_per_1000_events"] == 0
    assert ladder["unread"]["tracked_segments"] == 200
    assert ladder["tracking"]["tracked_segments"] == 50
    assert ladder["tracking"]["missing"] == 0


@pytest.mark.slow
def test_a_background_build_is_stepped_to_the_end_and_timed() -> None:
    """`python -m bench.build_steps` at 2,000 contacts in slices of 500: the build runs
    through every phase in the service's own steps, the member count is the scenario's
    (its hand-written SQL, before and after), and the segment is gone afterwards."""
    admin, _handle = _admin_url()
    name = f"segments_bench_build_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    command = [
        *(sys.executable, "-m", "bench.build_steps", "--scenario", "count_in_window"),
        *("--slice", "500", "--database-url", admin, "--database-name", name),
        *("--contacts", "2000"),
    ]
    try:
        run = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
        assert run.returncode == 0, run.stderr[-4000:]
        report = json.loads(run.stdout)
        with psycopg.connect(with_database(admin, name)) as conn:
            left = conn.execute("SELECT count(*) FROM segments").fetchone()
    finally:
        drop_database(sqlalchemy_url(admin), name)
    assert report["status"] == "READY"
    # The main project's contacts (2,000 and the batch-created ones) in slices of 500.
    assert report["phases"]["compute"]["steps"] >= 4
    assert report["phases"]["apply"]["steps"] == report["phases"]["compute"]["steps"]
    assert set(report["phases"]) == {"compute", "apply", "catchup", "final"}
    assert report["members"] > 0
    # No writes meanwhile: a window's count can only fall as time passes.
    hand = report["hand_sql_count"]
    assert hand["after"] <= report["members"] <= hand["before"]
    assert "Index" in "\n".join(report["second_slice_plan"])
    assert left == (0,)


@pytest.mark.slow
def test_the_standby_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """`python -m bench.replica` end to end at 400 contacts, each part for a second, on the
    embedded PostgreSQL of .data/ (its standby must be of the same binaries): both mixes,
    the lag under ingestion, and nothing left behind (database, slot, standby)."""
    from segments_service.database import start_embedded

    primary = start_embedded((ROOT / ".data").resolve())
    name = f"segments_bench_replica_smoke_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    output = tmp_path / "results.json"
    command = [
        *(sys.executable, "-m", "bench.replica", "--database-name", name),
        *("--contacts", "400", "--readers", "2", "--seconds", "1", "--warmup", "0"),
        *("--writers", "1", "--ingest-seconds", "1", "--output", str(output)),
    ]
    try:
        run = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
    finally:
        drop_database(sqlalchemy_url(primary.get_uri()), name)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["segment_members"] == 100
    for mode in ("primary_only", "with_standby"):
        assert results[mode]["operations_per_second"] > 0
    assert results["with_standby"]["standby_postgres_cpu_seconds"] > 0
    assert results["lag_under_ingestion"]["events_per_second"] > 0
    assert results["lag_under_ingestion"]["samples"] > 0
    assert not (ROOT / ".data" / f"standby-{name}").exists()
    with psycopg.connect(primary.get_uri()) as conn:
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (name,)
        ).fetchone()
    assert slots == (0,)
