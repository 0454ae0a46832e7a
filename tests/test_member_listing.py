"""Listing a DYNAMIC segment's contacts: pages in the contacts' order (createdAt, then id,
newest first), cut from the segment_members_page index; and migration 0005's backfill."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from google.protobuf import struct_pb2
from sqlalchemy import Engine, create_engine, event, pool, text
from sqlalchemy.orm import Session, sessionmaker

from segments import Expression, F
from segments_api.v1 import contacts_pb2, resources_pb2, segments_pb2
from segments_service import members, segments
from segments_service.database import alembic_config, make_engine, make_sessionmaker, migrate
from tests.conditions import as_proto
from tests.conftest import Project, Stubs, new_project

PREMIUM = F.data("plan") == "premium"
SUBSCRIBED = F.subscribed.equals(True)


def create_segment(stubs: Stubs, project: Project, condition: Expression) -> str:
    seg = stubs.segments.CreateSegment(
        segments_pb2.CreateSegmentRequest(name="Listing", condition=as_proto(condition)),
        metadata=project.auth,
    )
    return seg.id


def contact(email: str, plan: str, subscribed: bool = True) -> contacts_pb2.UpsertContactRequest:
    data = struct_pb2.Struct()
    data.update({"plan": plan})
    return contacts_pb2.UpsertContactRequest(email=email, data=data, subscribed=subscribed)


def batch(
    stubs: Stubs, project: Project, contacts: list[contacts_pb2.UpsertContactRequest]
) -> None:
    """One statement inserts the batch's new contacts: they share one createdAt."""
    stubs.contacts.BatchUpsertContacts(
        contacts_pb2.BatchUpsertContactsRequest(contacts=contacts), metadata=project.auth
    )


def expected_order(engine: Engine, project: Project, where: str) -> list[str]:
    """Ids of the contacts meeting `where`, in the listing order, computed from contacts."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                f"SELECT id::text FROM contacts WHERE project_id = :p AND {where} "
                "ORDER BY created_at DESC, id DESC"
            ),
            {"p": project.id},
        )
        return [r[0] for r in rows]


def list_page(
    stubs: Stubs, project: Project, segment_id: str, page: int, size: int
) -> segments_pb2.ListSegmentContactsResponse:
    return stubs.segments.ListSegmentContacts(
        segments_pb2.ListSegmentContactsRequest(id=segment_id, page=page, page_size=size),
        metadata=project.auth,
    )


def test_dynamic_pages_follow_contact_order_with_ties(
    stubs: Stubs, project: Project, engine: Engine
) -> None:
    # Members from the segment's creation (rebuild), from later batches and single writes
    # (refresh), an old contact entering late and a member leaving and coming back.
    batch(
        stubs, project, [contact(f"a{i}@x.com", "premium" if i % 4 else "free") for i in range(10)]
    )
    premium = create_segment(stubs, project, PREMIUM)
    batch(
        stubs,
        project,
        [contact(f"b{i}@x.com", "premium" if i % 3 else "free", i % 2 == 0) for i in range(10)],
    )
    stubs.contacts.UpsertContact(contact("c0@x.com", "premium"), metadata=project.auth)
    subscribed = create_segment(stubs, project, SUBSCRIBED)
    for request in (
        contact("c1@x.com", "premium", subscribed=False),
        contact("c2@x.com", "premium"),
        contact("a0@x.com", "premium"),
        contact("a1@x.com", "free"),
        contact("a1@x.com", "premium"),
    ):
        stubs.contacts.UpsertContact(request, metadata=project.auth)

    size = 4
    for segment_id, where in (
        (premium, "data->>'plan' = 'premium'"),
        (subscribed, "subscribed"),
    ):
        expected = expected_order(engine, project, where)
        pages = math.ceil(len(expected) / size)
        assert pages >= 4
        listed: list[resources_pb2.Contact] = []
        for page in range(1, pages + 2):
            resp = list_page(stubs, project, segment_id, page, size)
            assert (resp.total, resp.total_pages) == (len(expected), pages)
            ids = [c.id for c in resp.data]
            assert ids == expected[(page - 1) * size : page * size], page
            listed.extend(resp.data)
        # Disjoint pages covering every member, in the contacts' order.
        assert [c.id for c in listed] == expected
        assert len({c.id for c in listed}) == len(expected)
        # Ties in createdAt are there, and some are cut by a page boundary.
        created = [c.created_at.ToDatetime() for c in listed]
        assert len(set(created)) < len(created)
        assert any(created[p * size - 1] == created[p * size] for p in range(1, pages))


def plan_nodes(
    node: dict[str, Any], parents: tuple[str, ...] = ()
) -> Iterator[tuple[dict[str, Any], tuple[str, ...]]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan with the node types above it."""
    yield node, parents
    for child in node.get("Plans", []):
        yield from plan_nodes(child, (*parents, node["Node Type"]))


@pytest.fixture
def own_database(
    empty_database_url: str,
) -> Iterator[tuple[Engine, sessionmaker[Session], Project]]:
    """A database of this test alone: the planner's statistics describe this test's data,
    not whatever other tests left in the shared one (many small segments there made a
    2,000-member segment look small enough for a bitmap scan and a sort)."""
    migrate(empty_database_url)
    engine = make_engine(empty_database_url, pool_size=2)
    sessions = make_sessionmaker(engine)
    try:
        yield engine, sessions, new_project(sessions)
    finally:
        engine.dispose()


def test_dynamic_page_is_read_from_the_listing_index(
    own_database: tuple[Engine, sessionmaker[Session], Project],
) -> None:
    engine, sessions, project = own_database
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO contacts (project_id, email, data, created_at) "
                "SELECT :p, 'c' || i || '@x.com', "
                "jsonb_build_object('plan', CASE WHEN i % 3 = 0 THEN 'free' ELSE 'premium' END), "
                "now() - make_interval(secs => i / 4) "  # ties, four by four
                "FROM generate_series(1, 3000) AS i"
            ),
            {"p": project.id},
        )
    project_id = uuid.UUID(project.id)
    with sessions.begin() as session:
        view = segments.create_segment(
            session,
            project_id,
            name="Premium",
            description=None,
            segment_type=segments.DYNAMIC,
            condition_json=PREMIUM.to_dict(),
            track_membership=False,
        )
    assert view.member_count == 2000
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE contacts"))
        conn.execute(text("ANALYZE segment_members"))

    with sessions.begin() as session:
        statements: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            statements.append((statement, parameters))

        conn = session.connection()
        event.listen(conn, "before_cursor_execute", record)
        page = members.list_members(session, project_id, view.row.id, page=5, page_size=20)
        event.remove(conn, "before_cursor_execute", record)
        statement, parameters = statements[-1]  # the page; the segment's row was read first
        explained = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)
        tree = explained.scalar_one()[0]["Plan"]

    assert len(page.rows) == 20
    scans = [
        (n, above) for n, above in plan_nodes(tree) if n.get("Relation Name") == "segment_members"
    ]
    assert scans, tree
    for node, above in scans:
        assert node["Node Type"] in ("Index Scan", "Index Only Scan"), node
        assert node["Index Name"] == "segment_members_page", node
        # The index gives the whole order: the page is cut without any sort (not even an
        # incremental one) between the limit and the index.
        assert "Limit" in above, above
        assert not any("Sort" in kind for kind in above[above.index("Limit") :]), above


def test_migration_backfills_contact_created_at(empty_database_url: str) -> None:
    cfg = alembic_config(empty_database_url)
    before = ScriptDirectory.from_config(cfg).get_revision("0005").down_revision
    assert isinstance(before, str)
    command.upgrade(cfg, before)
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            for project in ("one", "two"):
                conn.execute(
                    text(
                        """
                        WITH p AS (INSERT INTO projects (name) VALUES (:name) RETURNING id),
                        s AS (
                            INSERT INTO segments (project_id, name, type, condition)
                            SELECT p.id, n, 'DYNAMIC', '{}' FROM p, unnest(ARRAY['x', 'y']) n
                            RETURNING project_id, id, name
                        ),
                        c AS (
                            INSERT INTO contacts (project_id, email, created_at)
                            SELECT p.id, i || '@x.com',
                                   '2024-01-01'::timestamptz + make_interval(mins => i / 3)
                            FROM p, generate_series(1, 30) AS i
                            RETURNING project_id, id, email
                        )
                        INSERT INTO segment_members (project_id, segment_id, contact_id)
                        SELECT s.project_id, s.id, c.id FROM s JOIN c USING (project_id)
                        WHERE s.name = 'x' OR split_part(c.email, '@', 1)::int % 2 = 0
                        """
                    ),
                    {"name": project},
                )
        command.upgrade(cfg, "0005")
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT m.contact_created_at, c.created_at FROM segment_members m "
                    "JOIN contacts c ON c.project_id = m.project_id AND c.id = m.contact_id"
                )
            ).all()
            assert len(rows) == 2 * (30 + 15)
            assert all(copied == created for copied, created in rows)
            assert conn.execute(
                text(
                    "SELECT attnotnull FROM pg_attribute "
                    "WHERE attrelid = 'segment_members'::regclass AND attname = 'contact_created_at'"
                )
            ).scalar_one()
            assert (
                "contact_created_at DESC, contact_id DESC"
                in conn.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE indexname = 'segment_members_page'")
                ).scalar_one()
            )

        command.downgrade(cfg, before)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM segment_members")).scalar_one() == 90
            assert not conn.execute(
                text(
                    "SELECT 1 FROM pg_attribute WHERE attrelid = 'segment_members'::regclass "
                    "AND attname = 'contact_created_at' AND NOT attisdropped"
                )
            ).first()
            assert not conn.execute(
                text("SELECT 1 FROM pg_indexes WHERE indexname = 'segment_members_page'")
            ).first()
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()
