"""Compiled statements stay correct when PostgreSQL runs them in parallel workers, which it
does for large projects: every SQL function they call must be safe there."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from segments import F, SegmentsClient
from segments_service import segments
from tests.conftest import Project


def _force_parallel(session: Session) -> None:
    """Plan every statement of this transaction with parallel workers, however small."""
    version = int(session.execute(text("SHOW server_version_num")).scalar_one())
    forcing = "debug_parallel_query" if version >= 160000 else "force_parallel_mode"
    for setting in (
        f"SET LOCAL {forcing} = on",
        "SET LOCAL parallel_setup_cost = 0",
        "SET LOCAL parallel_tuple_cost = 0",
        "SET LOCAL min_parallel_table_scan_size = 0",
    ):
        session.execute(text(setting))


def test_data_timestamp_filters_count_in_parallel_workers(
    client: SegmentsClient, project: Project, sessions: sessionmaker[Session]
) -> None:
    now = datetime.now(UTC)
    values = [
        (now - timedelta(days=1)).isoformat(),  # within 7 days
        (now - timedelta(days=30)).isoformat(),
        "2023-02-30",  # the shape of a date, but no such day
        "not a date",
        "2024-02-29",
    ]
    client.batch_upsert_contacts(
        [{"email": f"c{i}@x.com", "data": {"renewed": v}} for i, v in enumerate(values)]
    )
    renewed = F.data("renewed")
    condition = (renewed.within(7, "days") | (renewed < "2024-03-01")).to_dict()
    with sessions.begin() as session:
        serial = segments.count_matching(session, uuid.UUID(project.id), condition)
    with sessions.begin() as session:
        _force_parallel(session)
        parallel = segments.count_matching(session, uuid.UUID(project.id), condition)
    assert serial == parallel == 2
