"""gRPC servicers: each RPC validates its request, calls the domain in one transaction
(status.run_unary) and converts the result to protobuf. No SQL and no business rule here."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from sqlalchemy.orm import Session, sessionmaker

from segments.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    segments_pb2,
    segments_pb2_grpc,
)
from segments_service import contacts, events, feed, segments
from segments_service.auth import Caller, authenticate
from segments_service.contacts import ContactWrite, check_json, require_email
from segments_service.convert import (
    condition_to_json,
    contact_to_proto,
    from_timestamp,
    parse_id,
    require_type,
    segment_to_proto,
    struct_to_dict,
    timestamp,
)
from segments_service.errors import FieldViolation, ValidationError
from segments_service.status import (
    errors_mapped,
    metadata_value,
    request_id_of,
    run_unary,
)

# Set when the server starts draining: long-lived streams end (callers resume by cursor).
STREAMS_STOPPING = threading.Event()
WATCH_POLL_SECONDS = 0.2

# ExportSegmentContacts' messages: this many contacts at most, and about this many bytes
# (a message is sent before the contact that would take it past; one contact alone may).
EXPORT_BATCH_CONTACTS = 1000
EXPORT_BATCH_BYTES = 1 << 20

CREATED = 201
NO_CONTENT = 204


def _raise(violations: list[FieldViolation]) -> None:
    if violations:
        raise ValidationError(violations)


class SegmentServicer(segments_pb2_grpc.SegmentServiceServicer):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def ListSegments(
        self, request: segments_pb2.ListSegmentsRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            views = segments.list_segments(session, caller.project_id)
            return segments_pb2.ListSegmentsResponse(
                segments=[segment_to_proto(v) for v in views]
            ), None

        return run_unary(context, self.sessions, "secret", work)

    def CreateSegment(
        self, request: segments_pb2.CreateSegmentRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, int]:
            segment_type = require_type(request.type, "type") or segments.DYNAMIC
            condition = (
                condition_to_json(request.condition) if request.HasField("condition") else None
            )
            view = segments.create_segment(
                session,
                caller.project_id,
                name=request.name,
                description=request.description if request.HasField("description") else None,
                segment_type=segment_type,
                condition_json=condition,
                track_membership=request.track_membership,
            )
            return segment_to_proto(view), CREATED

        return run_unary(context, self.sessions, "secret", work)

    def GetSegment(
        self, request: segments_pb2.GetSegmentRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            segment_id = parse_id(request.id, "segment")
            view = segments.get_segment(session, caller.project_id, segment_id)
            return segment_to_proto(view), None

        return run_unary(context, self.sessions, "secret", work)

    def UpdateSegment(
        self, request: segments_pb2.UpdateSegmentRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            segment_id = parse_id(request.id, "segment")
            view = segments.update_segment(
                session,
                caller.project_id,
                segment_id,
                name=request.name if request.HasField("name") else None,
                description=request.description if request.HasField("description") else None,
                segment_type=require_type(request.type, "type"),
                condition_json=(
                    condition_to_json(request.condition) if request.HasField("condition") else None
                ),
                track_membership=(
                    request.track_membership if request.HasField("track_membership") else None
                ),
            )
            return segment_to_proto(view), None

        return run_unary(context, self.sessions, "secret", work)

    def DeleteSegment(
        self, request: segments_pb2.DeleteSegmentRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, int]:
            segments.delete_segment(session, caller.project_id, parse_id(request.id, "segment"))
            return empty_pb2.Empty(), NO_CONTENT

        return run_unary(context, self.sessions, "secret", work)

    def ListSegmentContacts(
        self, request: segments_pb2.ListSegmentContactsRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            segment_id = parse_id(request.id, "segment")
            page, page_size = segments.normalize_paging(request.page, request.page_size)
            result = segments.list_members(session, caller.project_id, segment_id, page, page_size)
            return segments_pb2.ListSegmentContactsResponse(
                data=[contact_to_proto(r) for r in result.rows],
                total=result.total,
                page=result.page,
                page_size=result.page_size,
                total_pages=result.total_pages,
            ), None

        return run_unary(context, self.sessions, "secret", work)

    def AddSegmentMembers(
        self, request: segments_pb2.AddSegmentMembersRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            segment_id = parse_id(request.id, "segment")
            result = segments.add_members(
                session,
                caller.project_id,
                segment_id,
                list(request.emails),
                create_missing=(
                    request.create_missing if request.HasField("create_missing") else True
                ),
                subscribed=request.subscribed if request.HasField("subscribed") else True,
            )
            return segments_pb2.AddSegmentMembersResponse(
                added=result.added, created=result.created, not_found=result.not_found
            ), None

        return run_unary(context, self.sessions, "secret", work)

    def RemoveSegmentMembers(
        self, request: segments_pb2.RemoveSegmentMembersRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            segment_id = parse_id(request.id, "segment")
            removed = segments.remove_members(
                session, caller.project_id, segment_id, list(request.emails)
            )
            return segments_pb2.RemoveSegmentMembersResponse(removed=removed), None

        return run_unary(context, self.sessions, "secret", work)

    def WatchSegmentEvents(
        self, request: segments_pb2.WatchSegmentEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[segments_pb2.SegmentEvent]:
        request_id = request_id_of(context)
        with errors_mapped(context, request_id), self.sessions.begin() as session:
            caller = authenticate(session, metadata_value(context, "authorization"), "secret")
            cursor = (
                feed.Cursor.parse(request.after)
                if request.after
                else feed.start_cursor(session, caller.project_id)
            )
            segment_ids = [str(parse_id(i, "segment")) for i in request.segment_ids]
        while context.is_active() and not STREAMS_STOPPING.is_set():
            with errors_mapped(context, request_id), self.sessions.begin() as session:
                batch = feed.read_after(session, caller.project_id, cursor, segment_ids)
            for event in batch:
                yield segments_pb2.SegmentEvent(
                    cursor=str(event.cursor),
                    kind=(
                        segments_pb2.SegmentEvent.ENTRY
                        if event.kind == "entry"
                        else segments_pb2.SegmentEvent.EXIT
                    ),
                    segment_id=event.segment_id,
                    segment_name=event.segment_name,
                    event_name=event.name,
                    contact_id=str(event.contact_id),
                    email=event.email,
                    occurred_at=timestamp(event.occurred_at),
                    event_id=str(event.event_id),
                )
                cursor = event.cursor
            if len(batch) < feed.BATCH:
                STREAMS_STOPPING.wait(WATCH_POLL_SECONDS)

    def ExportSegmentContacts(
        self, request: segments_pb2.ExportSegmentContactsRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        request_id = request_id_of(context)
        with errors_mapped(context, request_id), self.sessions() as session:
            # One snapshot for the whole export: a consistent member list.
            session.connection(
                execution_options={
                    "isolation_level": "REPEATABLE READ",
                    "postgresql_readonly": True,
                }
            )
            caller = authenticate(session, metadata_value(context, "authorization"), "secret")
            rows = segments.export_members(
                session, caller.project_id, parse_id(request.id, "segment")
            )
            yield from export_batches(map(contact_to_proto, rows), context)

    def CountMatchingContacts(
        self, request: segments_pb2.CountMatchingContactsRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            condition = (
                condition_to_json(request.condition) if request.HasField("condition") else None
            )
            count = segments.count_matching(session, caller.project_id, condition)
            return segments_pb2.CountMatchingContactsResponse(count=count), None

        return run_unary(context, self.sessions, "secret", work)


def export_batches(
    contacts: Iterator[Any], context: grpc.ServicerContext
) -> Iterator[segments_pb2.ExportSegmentContactsResponse]:
    """Contacts grouped into messages of at most EXPORT_BATCH_CONTACTS and, unless one
    contact alone is larger, EXPORT_BATCH_BYTES; stops when the caller has gone."""
    batch: list[Any] = []
    size = 0
    for contact in contacts:
        if not context.is_active():
            return
        contact_size = contact.ByteSize()
        full = len(batch) == EXPORT_BATCH_CONTACTS or size + contact_size > EXPORT_BATCH_BYTES
        if batch and full:
            yield segments_pb2.ExportSegmentContactsResponse(contacts=batch)
            batch, size = [], 0
        batch.append(contact)
        size += contact_size
    if batch:
        yield segments_pb2.ExportSegmentContactsResponse(contacts=batch)


def _contact_write(msg: contacts_pb2.UpsertContactRequest, prefix: str) -> ContactWrite:
    email = require_email(msg.email, f"{prefix}email")
    data = struct_to_dict(msg.data) if msg.HasField("data") else {}
    _raise(check_json(data, f"{prefix}data"))
    return ContactWrite(
        email=email,
        subscribed=msg.subscribed if msg.HasField("subscribed") else None,
        patch=data,
    )


class ContactServicer(contacts_pb2_grpc.ContactServiceServicer):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def UpsertContact(
        self, request: contacts_pb2.UpsertContactRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, int | None]:
            write = _contact_write(request, "")
            result = contacts.upsert(session, caller.project_id, [write])
            (contact_id,) = result.ids
            row = contacts.get_contact(session, caller.project_id, contact_id)
            return contact_to_proto(row), CREATED if result.created else None

        return run_unary(context, self.sessions, "secret", work)

    def BatchUpsertContacts(
        self, request: contacts_pb2.BatchUpsertContactsRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            if len(request.contacts) > contacts.MAX_BATCH:
                raise ValidationError.single(
                    "contacts",
                    f"at most {contacts.MAX_BATCH} contacts per batch, got {len(request.contacts)}",
                    "too_big",
                )
            writes, violations = [], []
            for i, item in enumerate(request.contacts):
                try:
                    writes.append(_contact_write(item, f"contacts.{i}."))
                except ValidationError as err:
                    violations.extend(err.violations)
            _raise(violations)
            result = contacts.upsert(session, caller.project_id, writes)
            return contacts_pb2.BatchUpsertContactsResponse(
                created=len(result.created), updated=len(result.updated)
            ), None

        return run_unary(context, self.sessions, "secret", work)

    def GetContact(
        self, request: contacts_pb2.GetContactRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            contact_id = parse_id(request.id, "contact")
            return contact_to_proto(
                contacts.get_contact(session, caller.project_id, contact_id)
            ), None

        return run_unary(context, self.sessions, "secret", work)

    def DeleteContact(
        self, request: contacts_pb2.DeleteContactRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, int]:
            contacts.delete_contact(session, caller.project_id, parse_id(request.id, "contact"))
            return empty_pb2.Empty(), NO_CONTENT

        return run_unary(context, self.sessions, "secret", work)


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def Track(self, request: events_pb2.TrackRequest, context: grpc.ServicerContext) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            violations = []
            try:
                email = require_email(request.email, "email")
            except ValidationError as err:
                violations.extend(err.violations)
            problem = events.event_name_problem(request.event, allow_email=False)
            if problem:
                violations.append(FieldViolation("event", *problem))
            data = struct_to_dict(request.data) if request.HasField("data") else {}
            violations.extend(check_json(data, "data"))
            _raise(violations)
            tracked = events.track(
                session,
                caller.project_id,
                email=email,
                event=request.event,
                subscribed=request.subscribed if request.HasField("subscribed") else None,
                data=data,
            )
            return events_pb2.TrackResponse(
                success=True,
                data=events_pb2.TrackedEvent(
                    contact=str(tracked.contact_id),
                    event=str(tracked.event_id),
                    timestamp=timestamp(tracked.occurred_at),
                ),
            ), None

        return run_unary(context, self.sessions, "public", work)

    def IngestEvents(
        self, request: events_pb2.IngestEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        def work(session: Session, caller: Caller) -> tuple[Any, None]:
            if len(request.events) > events.MAX_BATCH:
                raise ValidationError.single(
                    "events",
                    f"at most {events.MAX_BATCH} events per batch, got {len(request.events)}",
                    "too_big",
                )
            items, violations = [], []
            # A batch repeats a few dozen event names: each is checked once.
            name_problems: dict[str, tuple[str, str] | None] = {}
            for i, item in enumerate(request.events):
                try:
                    email = require_email(item.email, f"events.{i}.email")
                except ValidationError as err:
                    violations.extend(err.violations)
                    continue
                if item.event not in name_problems:
                    name_problems[item.event] = events.event_name_problem(
                        item.event, allow_email=True
                    )
                problem = name_problems[item.event]
                if problem:
                    violations.append(FieldViolation(f"events.{i}.event", *problem))
                data = struct_to_dict(item.data) if item.HasField("data") else {}
                if data:
                    violations.extend(check_json(data, f"events.{i}.data"))
                occurred = (
                    from_timestamp(item.occurred_at) if item.HasField("occurred_at") else None
                )
                items.append(events.IngestItem(email, item.event, occurred, data))
            _raise(violations)
            recorded = events.ingest(session, caller.project_id, items) if items else 0
            return events_pb2.IngestEventsResponse(accepted=recorded), None

        return run_unary(context, self.sessions, "secret", work)
