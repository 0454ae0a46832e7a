"""Phase 3: the scale curve, the scenarios' counts at every project size side by side."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from bench.context import Env, Stack, log, md, size_label
from bench.measure import median, timed
from bench.phases.counting import (
    Measured,
    count_side_by_side,
    create_scenarios,
    explain_compiled,
    settle,
)
from bench.targets import LIMITS
from segments_api.v1 import segments_pb2


def scale_curve(
    env: Env,
    stack: Stack,
    main_measured: list[Measured],
    now: datetime,
    small_plans: dict[str, str],
    settled: dict[str, Any],
) -> dict[str, Any]:
    """The counts at every size side by side; for each scenario growing faster than
    linearly, `small_plans` gets its compiled count's plan at the smallest size (the plan
    at the largest is in the scenarios' plans)."""
    sizes = [*env.args.scale, env.args.contacts]
    by_size: dict[int, str] = {}
    for project in env.dataset.projects:
        by_size.setdefault(project.contacts, project.tag)
    compiled: dict[str, dict[str, float]] = {sc.name: {} for sc in env.args.scenarios}
    hand: dict[str, dict[str, float]] = {sc.name: {} for sc in env.args.scenarios}
    ids: dict[str, dict[str, float]] = {sc.name: {} for sc in env.args.scenarios}
    runs: dict[str, dict[str, list[float]]] = {sc.name: {} for sc in env.args.scenarios}
    create: dict[str, dict[str, float]] = {sc.name: {} for sc in env.args.scenarios}
    measured: dict[int, list[Measured]] = {}
    for size in sizes:
        tag = by_size[size]
        measured[size] = main_measured if tag == "main" else create_scenarios(env, stack, tag, now)
    settled["scale"] = settle(env)
    # Per scenario, every size side by side: the growth is a ratio of these.
    for n, sc in enumerate(env.args.scenarios):
        cases = [(env.dataset.project(by_size[size]).id, measured[size][n]) for size in sizes]
        for size, counts in zip(
            sizes, count_side_by_side(env, cases, now, env.args.runs), strict=True
        ):
            compiled[sc.name][str(size)] = counts["compiled_ms"]
            hand[sc.name][str(size)] = counts["hand_ms"]
            ids[sc.name][str(size)] = counts["ids_ms"]
            runs[sc.name][str(size)] = counts["compiled_runs_ms"]
            create[sc.name][str(size)] = round(measured[size][n].create_ms, 1)
    # The count a caller reads for a segment, through each stack: every run visits every
    # scenario at every size, so whatever slows the machine meanwhile slows all alike.
    served = served_counts(stack, env, measured, by_size, sizes)
    for size in sizes:
        log(
            f"    {size_label(size)}: total compiled "
            f"{sum(compiled[n][str(size)] for n in compiled):,.0f} ms over "
            f"{len(measured[size])} scenarios; memberCount gRPC "
            f"{served['grpc'][str(size)]:.2f} ms, REST {served['rest'][str(size)]:.2f} ms"
        )
    lo, hi = str(sizes[0]), str(sizes[-1])
    factor = sizes[-1] / sizes[0]
    growth = {n: round(compiled[n][hi] / compiled[n][lo] / factor, 3) for n in compiled}
    # The hand-written SQL's growth beside it: where both grow alike, the cost is the
    # workload's on this machine (e.g. a hash table outgrowing the CPU cache), not the
    # compiler's.
    hand_growth = {n: round(hand[n][hi] / hand[n][lo] / factor, 3) for n in hand}
    with env.engine.connect() as conn:
        for n, sc in enumerate(env.args.scenarios):
            if growth[sc.name] > LIMITS["count_growth"]:
                small_plans[sc.name] = explain_compiled(conn, measured[sizes[0]][n])
    total_lo = sum(compiled[n][lo] for n in compiled)
    total_hi = sum(compiled[n][hi] for n in compiled)
    return {
        "sizes": sizes,
        "projects": {str(s): by_size[s] for s in sizes},
        "compiled_ms": compiled,
        "hand_ms": hand,
        "ids_ms": ids,
        "compiled_runs_ms": runs,
        "create_ms": create,
        "growth": growth,
        "hand_growth": hand_growth,
        "growth_total": round(total_hi / total_lo / factor, 3),
        "member_count_ms": served,
        "member_count_growth": {
            api: round(ms[hi] / ms[lo] / factor, 3) for api, ms in served.items()
        },
    }


def served_counts(
    stack: Stack,
    env: Env,
    measured: dict[int, list[Measured]],
    by_size: dict[int, str],
    sizes: list[int],
) -> dict[str, dict[str, float]]:
    """Median latency of reading a scenario segment's memberCount, per size: `GetSegment`
    over gRPC and `GET /segments/{id}` through Envoy, over every scenario and run."""
    rests = {size: stack.rest(env.keys[by_size[size]]) for size in sizes}
    grpc_ms: dict[int, list[float]] = {size: [] for size in sizes}
    rest_ms: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for _ in range(env.args.runs):
            for n in range(len(env.args.scenarios)):
                for size in sizes:
                    segment_id = measured[size][n].segment_id
                    request = segments_pb2.GetSegmentRequest(id=segment_id)
                    key = env.keys[by_size[size]]
                    g, _reply = timed(
                        partial(stack.server.segments.GetSegment, request, metadata=md(key))
                    )
                    r, _body = timed(partial(rests[size].get, f"/segments/{segment_id}"))
                    grpc_ms[size].append(g)
                    rest_ms[size].append(r)
    finally:
        for rest in rests.values():
            rest.close()
    return {
        "grpc": {str(size): median(grpc_ms[size]) for size in sizes},
        "rest": {str(size): median(rest_ms[size]) for size in sizes},
    }
