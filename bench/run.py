"""The run of `make bench`: the dataset, one server process and one Envoy, each selected phase
in order (the list is in bench/__init__.py), the targets, the results files."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from bench import noisy
from bench import webhooks as webhook_bench
from bench.cli import PHASES, parse_args
from bench.context import Env, Stack, db_now, issue_keys, log
from bench.dataset import bench_engine, prepare_dataset
from bench.machine import machine, source_state, table_sizes
from bench.phases.counting import Measured
from bench.phases.delete import delete_segments
from bench.phases.export import export
from bench.phases.export_csv import export_csv
from bench.phases.ingestion import phase_ingestion, phase_ingestion_all
from bench.phases.list_segments import list_segments
from bench.phases.metrics import metrics_scrape
from bench.phases.scale import scale_curve
from bench.phases.scenarios import phase_scenarios
from bench.phases.sweep import sweep_cost
from bench.phases.trivial import trivial
from bench.report import write_outputs
from bench.stack import ROOT, Envoy, Sampler, Server
from bench.targets import compute_targets, failures, misses


def guarded(results: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run one phase; a failure is recorded in the results and the next phase still runs."""
    try:
        value = fn()
    except Exception as err:
        log(traceback.format_exc())
        log(f"    phase {key!r} failed: {type(err).__name__}: {err}")
        results[key] = {"error": f"{type(err).__name__}: {err}"}
        return None
    results[key] = value
    return value


def run(args: argparse.Namespace) -> int:
    url, dataset, _handle = prepare_dataset(args)
    if args.load_only:
        return 0
    engine = bench_engine(url)
    env = Env(args, url, engine, sessionmaker(engine, expire_on_commit=False), dataset)
    issue_keys(env)
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make bench"
        + (f' BENCH_ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else ""),
        "machine": machine(env),
        "source": source_state(),
        "dataset": {**dataset.to_json(), "table_sizes": table_sizes(env)},
        "runs": args.runs,
        "phases": args.phases,
        "scenario_names": [sc.name for sc in args.scenarios],
    }
    plans: dict[str, tuple[str, str, str]] = {}
    small_plans: dict[str, str] = {}
    measured: list[Measured] = []
    settled: dict[str, Any] = {}
    results["settle"] = settled
    data_dir = Path(os.environ.get("SEGMENTS_DATA_DIR", ROOT / ".data")).resolve()
    server_log = data_dir / "bench" / f"server-{args.database_name}.log"
    server = Server(url, args.sweep_seconds, server_log)
    envoy = None
    sampler = None
    try:
        envoy = Envoy(server.port)
        sampler = Sampler({"server": server.proc.pid, "envoy": envoy.proc.pid}, args.database_name)
        sampler.start()
        stack = Stack(server, envoy, sampler)

        wanted = set(args.phases)
        total = len(PHASES)
        contact_id = ""
        if "trivial" in wanted:
            log(f"[1/{total}] trivial RPC")
            with sampler.phase("trivial"):
                base = trivial(env, stack, max(100, args.runs * 20))
                results["trivial"] = base
            log(
                f"    GetContact: gRPC {base['grpc_ms']['median']:.2f} ms, "
                f"REST {base['rest_ms']['median']:.2f} ms"
            )
            contact_id = base["contact_id"]

        now = db_now(engine)
        if "scenarios" in wanted:
            log(f"[2/{total}] scenarios")
            with sampler.phase("scenarios"):
                guarded(
                    results,
                    "scenarios",
                    lambda: phase_scenarios(env, stack, now, contact_id, measured, plans, settled),
                )

        if "scale" in wanted:
            log(f"[3/{total}] scale curve")
            with sampler.phase("scale"):
                guarded(
                    results,
                    "scale",
                    lambda: scale_curve(env, stack, measured, now, small_plans, settled),
                )

        if "list" in wanted:
            log(f"[4/{total}] ListSegments with 50 segments")
            with sampler.phase("list"):
                ls = guarded(
                    results,
                    "list_segments",
                    lambda: list_segments(
                        env, stack, max(50, args.runs * 10), args.list_segments, contact_id
                    ),
                )
            if ls:
                log(
                    f"    GET /segments ({ls['segments']} segments): "
                    f"{ls['rest_ms']['median']:.2f} ms"
                )

        if "export" in wanted:
            log(f"[5/{total}] ExportSegmentContacts of every contact")
            with sampler.phase("export"):
                ex = guarded(results, "export", lambda: export(env, stack))
            if ex:
                log(
                    f"    exported {ex['rows']:,} contacts in {ex['seconds']} s, "
                    f"server RSS peak {ex['server_rss_peak_mb']} MB"
                )

        if "export_csv" in wanted:
            log(f"[6/{total}] GET /segments/{{id}}/export of every contact, through Envoy")
            with sampler.phase("export_csv"):
                ec = guarded(results, "export_csv", lambda: export_csv(env, stack))
            if ec:
                log(
                    f"    {ec['rows']:,} rows ({ec['bytes'] / 2**20:,.0f} MB of CSV) in "
                    f"{ec['seconds']} s, server RSS peak {ec['server_rss_peak_mb']} MB"
                )

        if "sweep" in wanted:
            log(f"[7/{total}] one sweep with every segment present (informational)")
            with sampler.phase("sweep"):
                sw = guarded(results, "sweep", lambda: sweep_cost(env))
            if sw:
                log(f"    one sweep of the main project: {sw['seconds']} s")

        if "ingestion_all" in wanted:
            log(f"[8/{total}] ingestion with every segment present (informational)")
            with sampler.phase("ingestion_all_segments"):
                guarded(results, "ingestion_all_segments", lambda: phase_ingestion_all(env, stack))

        if "delete" in wanted:
            log(f"[9/{total}] deleting the main project's segments")
            with sampler.phase("delete_segments"):
                guarded(results, "delete_segments", lambda: delete_segments(env, stack))

        if "ingestion" in wanted:
            log(f"[10/{total}] ingestion with five tracked segments")
            with sampler.phase("ingestion"):
                guarded(results, "ingestion", lambda: phase_ingestion(env, stack))

        if "noisy" in wanted:
            log(f"[11/{total}] noisy neighbour")
            config = noisy.Config(
                seconds=args.noisy_seconds,
                streams=args.noisy_streams,
                counts=args.noisy_counts,
                rate=args.noisy_rate,
                timeout=args.noisy_timeout,
                build_timeout=args.noisy_build_timeout,
            )
            with sampler.phase("noisy"):
                guarded(results, "noisy", lambda: noisy.run(env, stack, config, log))

        if "webhooks" in wanted:
            log(f"[12/{total}] webhook deliveries to a local receiver (a server of their own)")
            with sampler.phase("webhooks"):
                wh = guarded(
                    results,
                    "webhooks",
                    lambda: webhook_bench.run(
                        argparse.Namespace(
                            backlog=2000,
                            rate=1000,
                            seconds=10.0,
                            webhooks=1,
                            senders=4,
                            timeout=120.0,
                        ),
                        env.url,
                    ),
                )
            if wh:
                steady = wh["steady"]
                log(
                    f"    backlog of {wh['backlog']['events']:,}: "
                    f"{wh['backlog']['events_per_second_per_webhook']:,} events/s; "
                    f"{steady['achieved_changes_per_second']:,} changes/s: entry -> delivery "
                    f"p95 {steady['entry_to_delivery_ms']['p95']} ms"
                )

        if "metrics" in wanted:
            log(f"[13/{total}] /metrics of a `segments run` stack (two replicas and Envoy)")
            with sampler.phase("metrics"):
                mx = guarded(results, "metrics", lambda: metrics_scrape(env))
            if mx:
                log(
                    f"    {mx['samples']:,} samples ({mx['scrape_bytes']:,} bytes): "
                    f"median {mx['scrape_ms']['median']} ms a scrape"
                )

        results["memory"] = {
            "server_rss_peak_mb": sampler.peak_mb("server"),
            "server_rss_by_phase_mb": sampler.by_phase("server"),
            "envoy_rss_peak_mb": sampler.peak_mb("envoy"),
        }
        foreign = sampler.foreign_load()
        results["machine"]["other_processes_cpu"] = foreign
        results["machine"]["postgres_background_cpu_seconds"] = sampler.background_load()
        busy = {
            name: v["share_of_machine"]
            for name, v in foreign.items()
            if v["share_of_machine"] is not None and v["share_of_machine"] > 0.1
        }
        if busy:
            results["machine"]["warning"] = (
                "other processes used more than 10% of the machine during: "
                + ", ".join(f"{k} ({v:.0%})" for k, v in busy.items())
                + "; timings of those phases are inflated"
            )
        results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["targets"] = compute_targets(results, plans, args.phases)
        results["targets_enforced"] = not args.no_enforce
    finally:
        if sampler is not None:
            sampler.stop()
        if envoy is not None:
            envoy.stop()
        server.stop()
        engine.dispose()

    write_outputs(args, results, plans, small_plans)
    return verdict(results, args.no_enforce)


def verdict(results: dict[str, Any], no_enforce: bool) -> int:
    """The exit status: 1 when a phase failed or a target was not measured; 1 when a target
    was missed, at whatever size ran, unless --no-enforce; 0 otherwise."""
    targets = results.get("targets", {})
    failed = failures(results, targets)
    missed = misses(targets)
    if failed:
        print(f"\nFAILED ({len(failed)}):", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
    if missed:
        print(
            f"\nTARGETS MISSED ({len(missed)} of {len(targets)})"
            + (": not enforced (--no-enforce)" if no_enforce else "")
            + ":",
            file=sys.stderr,
        )
        for line in missed:
            print(f"  {line}", file=sys.stderr)
    elif targets:
        print(f"\nall {len(targets)} targets met", file=sys.stderr)
    return 1 if failed or (missed and not no_enforce) else 0


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    # SIGTERM unwinds like Ctrl-C, so the server and Envoy are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = parse_args(argv)
    return run(args)
