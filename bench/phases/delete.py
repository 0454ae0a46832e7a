"""Phase 8: the main project's segments deleted, then its member table vacuumed."""

from __future__ import annotations

from functools import partial
from typing import Any

from sqlalchemy import text

from bench.context import Env, Stack, md
from bench.measure import summary, timed
from segments_api.v1 import segments_pb2


def delete_segments(env: Env, stack: Stack) -> dict[str, Any]:
    """DeleteSegment for every segment of the main project (referencing ones first), then
    VACUUM so the ingestion run that follows starts from a clean table."""
    key = env.keys["main"]
    seg = stack.server.segments
    listed = seg.ListSegments(segments_pb2.ListSegmentsRequest(), metadata=md(key)).segments
    # Newest first: a segment is always deleted before the segments it references.
    times = []
    for s in listed:
        request = segments_pb2.DeleteSegmentRequest(id=s.id)
        ms, _ = timed(partial(seg.DeleteSegment, request, metadata=md(key), timeout=600))
        times.append(ms)
    with env.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        vacuum_ms, _ = timed(lambda: conn.execute(text("VACUUM (ANALYZE) segment_members")))
    return {
        "segments": len(listed),
        "delete_ms": summary(times, 1),
        "vacuum_segment_members_ms": round(vacuum_ms, 1),
    }
