"""Phase 6: GET /segments/{id}/export of a segment holding every contact, through Envoy, read
as fast as one HTTP/1.1 client reads it: time, rows/s, bytes, and the server's RSS along the
way (it must not grow with the rows sent) and at its peak."""

from __future__ import annotations

import http.client
import time
from typing import Any

import psutil

from bench import scenarios
from bench.context import Env, Stack, create_segment, log, md
from segments_api.v1 import segments_pb2

# The server's RSS is read again after each this many rows.
RSS_EVERY_ROWS = 100_000
READ_BYTES = 1 << 20


def _everyone(stack: Stack, key: str) -> tuple[float | None, Any]:
    """The all-contacts segment: the export phase's if it ran, else created here (READY)."""
    name, condition = scenarios.EVERYONE
    listed = stack.server.segments.ListSegments(
        segments_pb2.ListSegmentsRequest(), metadata=md(key), timeout=60
    )
    for segment in listed.segments:
        if segment.name == name and segment.status == segment.READY:
            return None, segment
    create_ms, segment = create_segment(stack, key, name, condition)
    return create_ms, segment


def export_csv(env: Env, stack: Stack) -> dict[str, Any]:
    key = env.keys["main"]
    create_ms, segment = _everyone(stack, key)
    if create_ms is not None:
        log(
            f"    created the segment: {segment.member_count:,} members in {create_ms / 1000:.1f} s"
        )
    server = psutil.Process(stack.server.proc.pid)
    rss_mb: list[tuple[int, float]] = [(0, round(server.memory_info().rss / 2**20, 1))]
    conn = http.client.HTTPConnection("127.0.0.1", stack.envoy.http_port, timeout=600)
    rows = -1  # the header is a line too
    size = 0
    first = None
    tail = b""
    start = time.perf_counter()
    with stack.sampler.phase("export_csv_stream"):
        conn.request(
            "GET", f"/segments/{segment.id}/export", headers={"Authorization": f"Bearer {key}"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(300)!r}")
        content_type = resp.getheader("content-type")
        next_sample = RSS_EVERY_ROWS
        while chunk := resp.read1(READ_BYTES):
            if first is None:
                first = time.perf_counter() - start
            size += len(chunk)
            # Every row ends in CRLF, and no field holds a line break (data is JSON, which
            # escapes them); LF alone is counted, as a read may end between CR and LF.
            rows += chunk.count(b"\n")
            tail = chunk[-2:]
            if rows >= next_sample:
                rss_mb.append((rows, round(server.memory_info().rss / 2**20, 1)))
                next_sample += RSS_EVERY_ROWS
    seconds = time.perf_counter() - start
    conn.close()
    rss_mb.append((rows, round(server.memory_info().rss / 2**20, 1)))
    if tail != b"\r\n":
        raise AssertionError(f"the CSV ends in {tail!r}, not a whole row")
    if rows != segment.member_count:
        raise AssertionError(f"the CSV had {rows} rows, the segment {segment.member_count}")
    return {
        "segment_members": segment.member_count,
        "create_seconds": None if create_ms is None else round(create_ms / 1000, 2),
        "content_type": content_type,
        "rows": rows,
        "bytes": size,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "megabytes_per_second": round(size / 2**20 / seconds, 1),
        "first_byte_ms": round((first or 0) * 1000, 1),
        "server_rss_peak_mb": stack.sampler.peak_mb("server", "export_csv_stream"),
        "envoy_rss_peak_mb": stack.sampler.peak_mb("envoy", "export_csv_stream"),
        # (rows sent so far, the server's RSS then): flat, whatever the rows.
        "server_rss_mb_by_rows": rss_mb,
    }
