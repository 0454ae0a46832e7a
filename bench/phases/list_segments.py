"""Phase 4: ListSegments with many segments in the project, beside the trivial RPC."""

from __future__ import annotations

import json
from typing import Any

from bench import scenarios
from bench.context import Env, Stack, create_segment, md
from bench.measure import median, summary, timed
from segments_api.v1 import contacts_pb2, segments_pb2


def list_segments(
    env: Env, stack: Stack, runs: int, wanted: int, contact_id: str
) -> dict[str, Any]:
    key = env.keys["main"]
    seg = stack.server.segments
    seg_contacts = stack.server.contacts
    existing = len(seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key)).segments)
    create_ms = []
    for i in range(max(0, wanted - existing)):
        name, condition = scenarios.filler(i)
        ms, _ = create_segment(stack, key, name, condition)
        create_ms.append(ms)
    rest = stack.rest(key)
    grpc_ms: list[float] = []
    rest_ms: list[float] = []
    trivial_grpc: list[float] = []
    trivial_rest: list[float] = []
    contact_segments: list[float] = []
    contact = contacts_pb2.GetContactRequest(id=contact_id)
    count = 0
    for i in range(runs + 5):
        tg, _ = timed(lambda: seg_contacts.GetContact(contact, metadata=md(key)))
        tr, _ = timed(lambda: rest.get(f"/contacts/{contact_id}"))
        g, _reply = timed(
            lambda: seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key))
        )
        r, body = timed(lambda: rest.get("/segments"))
        count = len(body)
        # The segments one contact is in, every one of the project's checked.
        cs, _ = timed(lambda: rest.get(f"/contacts/{contact_id}/segments"))
        if i >= 5:
            contact_segments.append(cs)
            grpc_ms.append(g)
            rest_ms.append(r)
            trivial_grpc.append(tg)
            trivial_rest.append(tr)
    rest.close()
    return {
        "segments": count,
        "filler_create_ms": summary(create_ms, 1),
        "grpc_ms": summary(grpc_ms),
        "rest_ms": summary(rest_ms),
        "trivial_grpc_ms": summary(trivial_grpc),
        "trivial_rest_ms": summary(trivial_rest),
        "response_bytes": len(json.dumps(body)),
        "rest_contact_segments_ms": summary(contact_segments),
        "contact_segments_vs_trivial": round(
            median([c / t for c, t in zip(contact_segments, trivial_rest, strict=True)]), 3
        ),
    }
