"""The command line of `make bench`: its flags, and which phases they select."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import bench
from bench import scenarios
from bench.context import size_label
from bench.phases.scenarios import API_ROUNDS, PREVIEW_ROUNDS
from bench.stack import ROOT

DEFAULT_CONTACTS = 1_000_000

PHASES = (
    "trivial",
    "scenarios",
    "scale",
    "list",
    "export",
    "export_csv",
    "sweep",
    "ingestion_all",
    "delete",
    "ingestion",
    "noisy",
    "webhooks",
    "metrics",
)

# What a phase takes from an earlier one: run along with it.
PHASE_NEEDS = {"scenarios": ("trivial",), "list": ("trivial",), "scale": ("scenarios",)}


# Tracked segments at each step of the ingestion ladder (bench/phases/ingestion.py).
LADDER_STEPS = (5, 50, 200)


def _steps(text: str) -> tuple[int, ...]:
    """--ladder-steps: ascending counts of tracked segments, from the phase's five."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    first = len(scenarios.TRACKED)
    if not steps or steps[0] != first or list(steps) != sorted(set(steps)):
        raise argparse.ArgumentTypeError(
            f"ascending counts of tracked segments starting at {first}, e.g. {first},50,200"
        )
    return steps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=bench.__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    d = p.add_argument_group("dataset")
    d.add_argument("--contacts", type=int, default=DEFAULT_CONTACTS, help="main project size")
    d.add_argument("--events", type=int, help="custom events in the main project (10 x contacts)")
    d.add_argument("--email-events", type=int, help="email-activity events (3 x contacts)")
    d.add_argument("--other-projects", type=int, default=2, help="other tenants (2)")
    d.add_argument("--other-contacts", type=int, help="contacts per other tenant (contacts / 10)")
    d.add_argument(
        "--scale", help="comma-separated scale-curve sizes below --contacts (contacts/10, 3/10)"
    )
    d.add_argument("--seed", type=float, default=0.42, help="PostgreSQL setseed() value")
    d.add_argument(
        "--database-url",
        help="PostgreSQL server to use (any database on it; the bench creates its own). "
        "Default: the embedded PostgreSQL in .data/",
    )
    d.add_argument("--database-name", help="default: segments_bench_<size>")
    d.add_argument("--reload", action="store_true", help="drop and reload the dataset")
    d.add_argument("--load-only", action="store_true", help="load the dataset, measure nothing")
    m = p.add_argument_group("measurements")
    m.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    m.add_argument(
        "--count-seconds",
        type=float,
        default=3.0,
        help="SQL counts: more runs than --runs (up to 25) until their rounds took this long",
    )
    m.add_argument(
        "--ingest-events",
        type=int,
        default=600_000,
        help="events in the throughput run (about 30 s at the target rate)",
    )
    m.add_argument("--ingest-workers", type=int, default=4, help="concurrent IngestEvents callers")
    m.add_argument(
        "--preview-rounds",
        type=int,
        default=PREVIEW_ROUNDS,
        help="rounds of CountMatchingContacts and PreviewSegment per scenario (at least --runs)",
    )
    m.add_argument(
        "--api-rounds",
        type=int,
        default=API_ROUNDS,
        help="rounds of the GET, listing, explain and trivial calls per scenario (at least --runs)",
    )
    m.add_argument(
        "--ladder-steps",
        type=_steps,
        default=LADDER_STEPS,
        help="tracked segments at each step of the ingestion ladder (5,50,200); each step's "
        "segments are built over every contact, minutes each at ten million",
    )
    m.add_argument("--tracking-seconds", type=float, default=30.0)
    m.add_argument("--tracking-rate", type=int, default=1000, help="events per second")
    m.add_argument("--tracking-batch", type=int, default=100, help="events per paced batch")
    m.add_argument(
        "--ladder-tracking-rate",
        type=int,
        default=5000,
        help="events per second of the paced stream at the ladder's 50-segment step",
    )
    m.add_argument(
        "--ladder-tracking-batch",
        type=int,
        default=500,
        help="events per paced batch at the ladder's 50-segment step (ten a second at 5,000)",
    )
    m.add_argument("--list-segments", type=int, default=50)
    m.add_argument(
        "--sweep-seconds",
        type=float,
        default=60.0,
        help="the server's SEGMENTS_SWEEP_SECONDS (60, the product default)",
    )
    m.add_argument(
        "--scenarios",
        default="",
        help="comma-separated scenario names, or 'reference' / 'extended' (the reference's "
        "filter language, the one beyond it), with the scenarios they reference (default: all)",
    )
    m.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated phases to run, with those they need (default: all): "
        + ", ".join(PHASES),
    )
    n_ = p.add_argument_group("noisy neighbour (bench/noisy.py)")
    n_.add_argument("--noisy-seconds", type=float, default=15.0, help="each measurement window")
    n_.add_argument("--noisy-streams", type=int, default=32, help="main project's open streams")
    n_.add_argument("--noisy-counts", type=int, default=16, help="main project's heavy counts")
    n_.add_argument(
        "--noisy-rate", type=float, default=20.0, help="small project's requests/s per endpoint"
    )
    n_.add_argument("--noisy-timeout", type=float, default=10.0, help="one probe request, s")
    n_.add_argument(
        "--noisy-build-timeout", type=float, default=900.0, help="the build of every contact, s"
    )
    m.add_argument(
        "--no-enforce",
        action="store_true",
        help="exit 0 when a target is missed (still 1 when a phase fails or a target is not "
        "measured): for smoke runs at sizes where timing ratios are noise. Default: any "
        "target missed, at any --contacts, exits 1 and lists the misses",
    )
    m.add_argument(
        "--output", type=Path, help="default: bench/results.json (1M) else -<size>[-<phases>]"
    )
    args = p.parse_args(argv)
    requested = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(requested) - set(PHASES))
    if unknown or not requested:
        p.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; known: {PHASES}")
    phases = set(requested)
    while extra := {need for name in phases for need in PHASE_NEEDS.get(name, ())} - phases:
        phases |= extra
    args.phases = [name for name in PHASES if name in phases]
    args.subset = "" if len(args.phases) == len(PHASES) else "-".join(requested)
    wanted = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    try:
        args.scenarios = scenarios.select_scenarios(wanted)
    except ValueError as err:
        p.error(f"--scenarios: {err}; languages: {', '.join(scenarios.LANGUAGES)}")
    if wanted:
        # A subset of the scenarios is a subset of the run, in a file of its own.
        args.subset = "-".join(filter(None, (args.subset, *wanted)))
    n = args.contacts
    args.events = args.events if args.events is not None else 10 * n
    args.email_events = args.email_events if args.email_events is not None else 3 * n
    args.other_contacts = args.other_contacts or max(n // 10, 1)
    args.scale = (
        sorted({int(x) for x in args.scale.split(",") if x.strip()})
        if args.scale
        else sorted({max(n // 10, 1), max(3 * n // 10, 1)})
    )
    args.scale = [s for s in args.scale if s < n]
    label = size_label(n)
    args.database_name = args.database_name or f"segments_bench_{label}"
    if args.output is None:
        # A subset never overwrites a whole run's results.
        stem = "results" if n == DEFAULT_CONTACTS else f"results-{label}"
        name = f"{stem}-{args.subset}.json" if args.subset else f"{stem}.json"
        args.output = ROOT / "bench" / name
    return args
