"""The results files (JSON, plans, Markdown tables) and the tables printed at the end."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from typing import Any

from bench import noisy
from bench.context import size_label


def ladder_step(step: str, ladder: dict[str, Any]) -> str:
    """One step of the ingestion ladder, for the summary table."""
    if step not in ladder["steps"]:
        return "not measured (not a step of --ladder-steps)"
    return ladder_run(ladder["steps"][step], ladder["ratio_to_five"][step])


def ladder_run(run: dict[str, Any], ratio: float) -> str:
    """A run of the ingestion ladder: its throughput, and what it is relative to."""
    made = run.get("membership_events_per_1000_events")
    return (
        f"{run['events_per_second']:,} events/s (batch p50 {run['batch_ms']['median']} ms, "
        f"p95 {run['batch_ms']['p95']} ms; {ratio:.2f}x the 5-segment step; "
        f"{run.get('fraction_of_executemany', 'n/a')} of executemany, "
        f"{run.get('fraction_of_copy', 'n/a')} of COPY"
        + (f"; {made:,} entries and exits per 1,000 events" if made is not None else "")
        + ")"
    )


def tracking_run(t: dict[str, Any]) -> str:
    """A paced stream's latency from event to entry event."""
    return (
        f"p50 {t['latency_s']['median']} s, p95 {t['latency_s']['p95']} s, "
        f"p99 {t['latency_s']['p99']} s, max {t['latency_s']['max']} s at "
        f"{t['achieved_rate']} events/s ({t['observed']}/{t['probes']} entries seen)"
    )


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def dig(results: dict[str, Any], *path: str) -> Any:
    """results[a][b]..., or None where a phase failed or was skipped."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def render_table(results: dict[str, Any]) -> str:
    head = (
        "| scenario | members | create s | compiled ms | hand SQL ms | ratio | ids ms (ratio) | "
        "CountMatching gRPC ms | gRPC count ms | REST count ms | gRPC p1 / p100 ms | "
        "REST p1 / p100 ms |"
    )
    lines = [head, "|" + "---|" * 12]
    rows = results.get("scenarios")
    if not isinstance(rows, list):
        return ""
    for s in rows:
        if "error" in s:
            lines.append(f"| {s['name']} | failed: {s['error'][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {s['name']} | {fmt(s['members'])} | {s['create_ms'] / 1000:.2f} | "
            f"{fmt(s['compiled_ms'])} | {fmt(s['hand_ms'])} | {s['ratio']:.2f} | "
            f"{fmt(s['ids_ms'])} ({s['ids_ratio']:.2f}) | {fmt(s['grpc_count_matching_ms'])} | "
            f"{fmt(s['grpc_get_ms'], 2)} | {fmt(s['rest_get_ms'], 2)} | "
            f"{fmt(s['grpc_page1_ms'])} / {fmt(s['grpc_page100_ms'])} | "
            f"{fmt(s['rest_page1_ms'])} / {fmt(s['rest_page100_ms'])} |"
        )
    return "\n".join(lines)


def render_scale(results: dict[str, Any]) -> str:
    scale = results.get("scale")
    if not scale or "error" in scale:
        return ""
    sizes = scale["sizes"]
    head = (
        "| scenario (compiled count) | "
        + " | ".join(f"{size_label(s)} ms" for s in sizes)
        + " | growth vs linear | hand-written SQL's growth |"
    )
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    hand_growth = scale.get("hand_growth", {})
    for name, row in scale["compiled_ms"].items():
        cells = " | ".join(fmt(row[str(s)]) for s in sizes)
        hand = f"{hand_growth[name]:.2f}" if name in hand_growth else "-"
        lines.append(f"| {name} | {cells} | {scale['growth'][name]:.2f} | {hand} |")
    total = " | ".join(
        fmt(sum(row[str(s)] for row in scale["compiled_ms"].values())) for s in sizes
    )
    lines.append(f"| all scenarios together | {total} | {scale['growth_total']:.2f} | - |")
    for label, key in (("gRPC GetSegment", "grpc"), ("REST GET /segments/{id}", "rest")):
        cells = " | ".join(fmt(scale["member_count_ms"][key][str(s)], 2) for s in sizes)
        growth = scale["member_count_growth"][key]
        lines.append(f"| memberCount via {label} | {cells} | {growth:.2f} | - |")
    return "\n".join(lines)


def render_figures(results: dict[str, Any]) -> str:
    """Everything else, one line each."""

    def line(label: str, *path: str, fmt_: Callable[[Any], str]) -> str:
        value = dig(results, *path)
        if value is None:
            return f"| {label} | not measured |"
        if isinstance(value, dict) and "error" in value:
            return f"| {label} | failed: {value['error'][:100]} |"
        return f"| {label} | {fmt_(value)} |"

    ds = results["dataset"]
    rows = sum(p["contacts"] + p["events"] + p["email_events"] for p in ds["projects"])
    lines = [
        "| measurement | result |",
        "|---|---|",
        f"| dataset load | {rows:,} rows in {ds['load_seconds']:.0f} s "
        f"({ds['rows_per_second']:,} rows/s; phases {ds['phases']}) |",
        line(
            "trivial RPC (GetContact), gRPC / REST",
            "trivial",
            fmt_=lambda t: f"{t['grpc_ms']['median']:.2f} / {t['rest_ms']['median']:.2f} ms",
        ),
        line(
            "ListSegments, gRPC / REST",
            "list_segments",
            fmt_=lambda t: (
                f"{t['segments']} segments: {t['grpc_ms']['median']:.2f} / "
                f"{t['rest_ms']['median']:.2f} ms ({t['response_bytes']:,} bytes of JSON)"
            ),
        ),
        line(
            "IngestEvents throughput, 5 tracked segments",
            "ingestion",
            "throughput",
            fmt_=lambda t: (
                f"{t['events_per_second']:,} events/s ({t['events']:,} events, "
                f"{t['workers']} callers, batch p50 {t['batch_ms']['median']} ms, "
                f"p95 {t['batch_ms']['p95']} ms; 5 s windows "
                f"{', '.join(f'{n:,}' for n in t['events_per_second_5s_windows'])}"
                + (
                    f"; per 1,000 events {w['full_page_images']} full-page images, "
                    f"{w['mb']} MB of WAL)"
                    if (w := t.get("wal_per_1000_events"))
                    else ")"
                )
            ),
        ),
        line(
            "the database's own limit for the same event rows, executemany / COPY",
            "ingestion",
            "database_limits",
            fmt_=lambda t: (
                f"{t['executemany']['events_per_second']:,} / {t['copy']['events_per_second']:,} "
                f"events/s (one connection, {t['events']:,} rows in transactions of "
                f"{t['batch_size']:,})"
            ),
        ),
        *(
            line(
                f"IngestEvents throughput, {step} tracked segments (ladder)",
                "ingestion",
                "ladder",
                fmt_=partial(ladder_step, step),
            )
            for step in ("5", "50", "200")
        ),
        line(
            "IngestEvents throughput, every ladder segment present, names none reads",
            "ingestion",
            "ladder",
            "unread",
            fmt_=lambda t: (
                ladder_run(t, dig(results, "ingestion", "ladder", "ratio_to_five", "unread"))
                + f", {t['tracked_segments']} tracked segments, {len(t['names'])} names"
            ),
        ),
        line(
            "IngestEvents throughput, every segment present",
            "ingestion_all_segments",
            fmt_=lambda t: (
                f"{t['events_per_second']:,} events/s with {t['segments']} segments "
                f"(batch p50 {t['batch_ms']['median']} ms)"
            ),
        ),
        line(
            "tracking latency (event -> entry event)",
            "ingestion",
            "tracking",
            fmt_=tracking_run,
        ),
        line(
            "tracking latency (event -> entry event), 50 tracked segments (ladder)",
            "ingestion",
            "ladder",
            "tracking",
            fmt_=tracking_run,
        ),
        line(
            "ExportSegmentContacts",
            "export",
            fmt_=lambda t: (
                f"{t['rows']:,} contacts in {t['seconds']} s "
                f"({t['rows_per_second']:,}/s, first row {t['first_row_ms']} ms); "
                f"creating the segment took {t['create_seconds']} s"
            ),
        ),
        line(
            "GET /segments/{id}/export (CSV through Envoy)",
            "export_csv",
            fmt_=lambda t: (
                f"{t['rows']:,} rows, {t['bytes'] / 2**20:,.0f} MB in {t['seconds']} s "
                f"({t['rows_per_second']:,} rows/s, {t['megabytes_per_second']} MB/s, first "
                f"byte {t['first_byte_ms']} ms); server RSS peak {t['server_rss_peak_mb']} MB "
                f"(from {t['server_rss_mb_by_rows'][0][1]} MB before the first row to "
                f"{t['server_rss_mb_by_rows'][-1][1]} MB after the last), Envoy "
                f"{t['envoy_rss_peak_mb']} MB"
            ),
        ),
        line(
            "server RSS peak (all phases / during export)",
            "memory",
            fmt_=lambda t: (
                f"{t['server_rss_peak_mb']} MB / "
                f"{t['server_rss_by_phase_mb'].get('export_stream', 'n/a')} MB "
                f"(Envoy {t['envoy_rss_peak_mb']} MB)"
            ),
        ),
        line(
            "one sweep of the main project (informational)",
            "sweep",
            fmt_=lambda t: f"{t['seconds']} s, {t['stale_contacts']} stale contacts",
        ),
    ]
    return "\n".join(lines)


def render_targets(targets: dict[str, Any]) -> str:
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for name, t in targets.items():
        op = t.get("comparison", "<=")
        unit = t.get("unit", "")
        figure = t["measured"]
        measured = "not measured" if figure is None else f"{fmt(figure, 2)} {unit}".rstrip()
        bound = t["limit"]
        if bound is None:
            limit = "-"
        elif isinstance(bound, str):
            limit = f"{op} {bound}"
        else:
            limit = f"{op} {fmt(bound, 2)} {unit}".rstrip()
        lines.append(f"| {name} | {measured} | {limit} | {'yes' if t['met'] else '**NO**'} |")
    return "\n".join(lines)


def write_outputs(
    args: argparse.Namespace,
    results: dict[str, Any],
    plans: dict[str, tuple[str, str, str]],
    small_plans: dict[str, str],
) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plan_file = args.output.with_suffix(".plans.txt")
    with plan_file.open("w") as out:
        for name, (compiled, hand, ids) in plans.items():
            out.write(f"==== {name}: compiled count (CountMatchingContacts) ====\n{compiled}\n\n")
            out.write(f"==== {name}: hand-written SQL ====\n{hand}\n\n")
            out.write(f"==== {name}: count of the member ids (create, rebuild) ====\n{ids}\n\n")
        smallest = size_label(results["scale"]["sizes"][0]) if small_plans else ""
        for name, plan in small_plans.items():
            out.write(
                f"==== {name}: compiled count at {smallest} (scale curve: grows faster "
                f"than linearly) ====\n{plan}\n\n"
            )
    parts = [
        render_table(results),
        render_scale(results),
        render_figures(results),
        noisy.render(results.get("noisy")),
        render_targets(results.get("targets", {})),
    ]
    markdown = "\n\n".join(p for p in parts if p)
    args.output.with_suffix(".md").write_text(markdown + "\n")
    print()
    print(markdown)
    if dig(results, "machine", "warning"):
        print(f"\nWARNING: {results['machine']['warning']}")
    print(f"\nwrote {args.output}, {plan_file.name}, {args.output.with_suffix('.md').name}")
