"""Phase 2: each scenario becomes a segment; its counts, GetSegment and contact pages are
timed side by side."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from bench.context import Env, Stack, condition_proto, log, md
from bench.measure import median, timed
from bench.phases.counting import Measured, count_both, create_scenarios, explain_both, settle
from segments_api.v1 import contacts_pb2, segments_pb2

PAGE_SIZE = 20
# Rounds of the API calls (at least --runs; --api-rounds): each call is a few milliseconds,
# and on a shared machine ten rounds left a scenario's medians at the mercy of one busy
# second.
API_ROUNDS = 20
# Rounds of CountMatchingContacts and PreviewSegment (at least --runs): their ratio is held
# to 1.2x, and in five rounds one scenario's median moved from 1.02x to 1.38x between runs
# of the same code at a million contacts (in-process, 1.02x) as the background sweep and
# the other processes came and went. --preview-rounds sets it: at ten million contacts each
# round is two counts of seconds.
PREVIEW_ROUNDS = 11


def api_latencies(
    stack: Stack,
    key: str,
    m: Measured,
    runs: int,
    contact_id: str,
    ids: dict[str, str],
    preview_rounds: int = PREVIEW_ROUNDS,
    api_rounds: int = API_ROUNDS,
) -> dict[str, Any]:
    """GetSegment and the contacts listing (page 1 and page 100), gRPC and REST, interleaved
    with the trivial RPC (GetContact) so that the REST target compares like with like; then
    CountMatchingContacts with the scenario's condition (gRPC only)."""
    rest = stack.rest(key)
    seg = stack.server.segments
    results: dict[str, list[float]] = {
        k: []
        for k in (
            "grpc_get",
            "rest_get",
            "grpc_page1",
            "rest_page1",
            "grpc_page100",
            "rest_page100",
            "grpc_trivial",
            "rest_trivial",
            "rest_explain",
        )
    }
    get = segments_pb2.GetSegmentRequest(id=m.segment_id)
    contact = contacts_pb2.GetContactRequest(id=contact_id)

    def page(n: int) -> segments_pb2.ListSegmentContactsRequest:
        return segments_pb2.ListSegmentContactsRequest(id=m.segment_id, page=n, page_size=PAGE_SIZE)

    calls: dict[str, Callable[[], Any]] = {
        "grpc_get": lambda: seg.GetSegment(get, metadata=md(key)),
        "rest_get": lambda: rest.get(f"/segments/{m.segment_id}"),
        "grpc_page1": lambda: seg.ListSegmentContacts(page(1), metadata=md(key), timeout=300),
        "rest_page1": lambda: rest.get(f"/segments/{m.segment_id}/contacts?page=1&pageSize=20"),
        "grpc_page100": lambda: seg.ListSegmentContacts(page(100), metadata=md(key), timeout=300),
        "rest_page100": lambda: rest.get(f"/segments/{m.segment_id}/contacts?page=100&pageSize=20"),
        "grpc_trivial": lambda: stack.server.contacts.GetContact(contact, metadata=md(key)),
        "rest_trivial": lambda: rest.get(f"/contacts/{contact_id}"),
        # Why the trivial call's contact is or is not a member (one contact's truths).
        "rest_explain": lambda: rest.get(f"/segments/{m.segment_id}/contacts/{contact_id}/explain"),
    }
    member_count = None
    for i in range(max(runs, api_rounds) + 1):
        for name, call in calls.items():
            ms, reply = timed(call)
            if i > 0:
                results[name].append(ms)
            if name == "rest_get":
                member_count = int(reply.get("memberCount", 0))
    rest.close()
    out: dict[str, Any] = {f"{k}_ms": median(v) for k, v in results.items()}
    # GET /segments/{id} over the trivial call of the same round: what slows the machine
    # for a moment slows both.
    out["rest_get_vs_trivial"] = round(
        median([g / t for g, t in zip(results["rest_get"], results["rest_trivial"], strict=True)]),
        3,
    )
    out["explain_vs_trivial"] = round(
        median(
            [e / t for e, t in zip(results["rest_explain"], results["rest_trivial"], strict=True)]
        ),
        3,
    )
    out["rest_get_runs_ms"] = [round(x, 2) for x in results["rest_get"]]
    out["rest_trivial_runs_ms"] = [round(x, 2) for x in results["rest_trivial"]]
    out["rest_member_count"] = member_count
    condition = condition_proto(m.scenario.resolved(ids))
    count = segments_pb2.CountMatchingContactsRequest(condition=condition)
    preview = segments_pb2.PreviewSegmentRequest(condition=condition)
    count_ms = []
    preview_ms = []
    for i in range(max(runs, preview_rounds) + 1):
        ms, reply = timed(partial(seg.CountMatchingContacts, count, metadata=md(key), timeout=300))
        # The preview (the count and up to 10 members) in the same round as the count.
        pms, previewed = timed(partial(seg.PreviewSegment, preview, metadata=md(key), timeout=300))
        if i > 0:
            count_ms.append(ms)
            preview_ms.append(pms)
    out["grpc_count_matching_ms"] = median(count_ms)
    out["count_matching"] = int(reply.count)
    out["grpc_preview_ms"] = median(preview_ms)
    out["preview_vs_count"] = round(
        median([p / c for p, c in zip(preview_ms, count_ms, strict=True)]), 3
    )
    out["preview_member_count"] = int(previewed.member_count)
    return out


def phase_scenarios(
    env: Env,
    stack: Stack,
    now: datetime,
    contact_id: str,
    measured: list[Measured],
    plans: dict[str, tuple[str, str, str]],
    settled: dict[str, Any],
) -> list[dict[str, Any]]:
    main = env.dataset.project("main")
    key = env.keys["main"]
    measured.extend(create_scenarios(env, stack, "main", now))
    settled["scenarios"] = settle(env)
    ids = {x.scenario.name: x.segment_id for x in measured}
    rows = []
    for m in measured:
        row: dict[str, Any] = {
            "name": m.scenario.name,
            "family": m.scenario.family,
            "language": m.scenario.language,
            "description": m.scenario.description,
            "filters": m.scenario.filter_count(),
            "condition": m.scenario.resolved(ids),
            "hand_sql": " ".join(m.scenario.hand_sql.split()),
            "members": m.members,
            "create_ms": round(m.create_ms, 1),
            "compile_ms": round(m.compile_ms, 2),
        }
        try:
            counts = count_both(env, main.id, m, now, env.args.runs)
            plans[m.scenario.name] = explain_both(env, main.id, m, now)
            api = api_latencies(
                stack,
                key,
                m,
                env.args.runs,
                contact_id,
                ids,
                env.args.preview_rounds,
                env.args.api_rounds,
            )
        except Exception as err:
            log(traceback.format_exc())
            row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            continue
        ratio = counts["compiled_ms"] / counts["hand_ms"]
        row.update(counts)
        row["ratio"] = round(ratio, 3)
        row["ids_ratio"] = round(counts["ids_ms"] / counts["hand_ms"], 3)
        row.update(api)
        if counts["count"] != m.members:
            row["count_note"] = (
                "maintained member count differs from the compiled count at the "
                "measurement instant (contacts crossed a window edge since creation)"
            )
        rows.append(row)
        log(
            f"    {m.scenario.name:<24} compiled {counts['compiled_ms']:9.1f} ms  "
            f"hand {counts['hand_ms']:9.1f} ms  ratio {ratio:5.2f}  "
            f"REST count {api['rest_get_ms']:6.2f} ms  "
            f"page100 {api['rest_page100_ms']:7.1f} ms"
        )
    return rows
