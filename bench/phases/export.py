"""Phase 5: ExportSegmentContacts of a segment holding every contact."""

from __future__ import annotations

import time
from typing import Any

from bench import scenarios
from bench.context import Env, Stack, create_segment, log, md
from segments_api.v1 import segments_pb2, segments_pb2_grpc


def export(env: Env, stack: Stack) -> dict[str, Any]:
    key = env.keys["main"]
    name, condition = scenarios.EVERYONE
    create_ms, segment = create_segment(stack, key, name, condition)
    log(f"    created {name}: {segment.member_count:,} members in {create_ms / 1000:.1f} s")
    channel = stack.server.new_channel()
    stub = segments_pb2_grpc.SegmentServiceStub(channel)
    rows = 0
    messages = 0
    first = None
    start = time.perf_counter()
    with stack.sampler.phase("export_stream"):
        for batch in stub.ExportSegmentContacts(
            segments_pb2.ExportSegmentContactsRequest(id=segment.id), metadata=md(key), timeout=3600
        ):
            if first is None:
                first = time.perf_counter() - start
            # What a sender reads of each contact, so the client pays for decoding them.
            rows += sum(1 for contact in batch.contacts if contact.email)
            messages += 1
    seconds = time.perf_counter() - start
    channel.close()
    if rows != segment.member_count:
        raise AssertionError(f"export streamed {rows} contacts, segment has {segment.member_count}")
    return {
        "segment_members": segment.member_count,
        "create_seconds": round(create_ms / 1000, 2),
        "rows": rows,
        "messages": messages,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "first_row_ms": round((first or 0) * 1000, 1),
        "server_rss_peak_mb": stack.sampler.peak_mb("server", "export_stream"),
    }
