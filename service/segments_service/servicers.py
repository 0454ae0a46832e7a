"""gRPC servicers: each RPC validates its request, calls the domain in one transaction
(rpc.Runner) and converts the result to protobuf. No SQL and no business rule here; the key
an RPC needs and its budget are settled before it runs (interceptors.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import grpc
from google.protobuf import empty_pb2, struct_pb2
from google.protobuf.message import Message
from sqlalchemy import text
from sqlalchemy.orm import Session

from segments_api.v1 import (
    contacts_pb2,
    contacts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    resources_pb2,
    segments_pb2,
    segments_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from segments_service import (
    contacts,
    events,
    explain,
    feed,
    history,
    members,
    membership,
    segments,
    streams,
    webhooks,
)
from segments_service.auth import Caller
from segments_service.contacts import ContactWrite, check_json, require_email
from segments_service.convert import (
    condition_to_json,
    contact_to_proto,
    from_timestamp,
    ordered_condition,
    parse_id,
    py_to_value,
    require_type,
    segment_to_proto,
    struct_to_dict,
    timestamp,
)
from segments_service.errors import DeadlineExceeded, FieldViolation, ServiceError, ValidationError
from segments_service.rpc import (
    Runner,
    abort,
    current_scope,
    in_transaction,
    set_statement_timeout,
)

Context = grpc.aio.ServicerContext[Any, Any]

CREATED = 201
NO_CONTENT = 204


def _raise(violations: list[FieldViolation]) -> None:
    if violations:
        raise ValidationError(violations)


class SegmentServicer(segments_pb2_grpc.SegmentServiceServicer):
    def __init__(self, runner: Runner, watch: streams.FeedWatch, stopping: asyncio.Event) -> None:
        self.runner = runner
        self.watch = watch
        self.stopping = stopping

    async def ListSegments(
        self, request: segments_pb2.ListSegmentsRequest, context: Context
    ) -> segments_pb2.ListSegmentsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.ListSegmentsResponse, None]:
            views = segments.list_segments(session, caller.project_id)
            return segments_pb2.ListSegmentsResponse(
                segments=[segment_to_proto(v) for v in views]
            ), None

        return await self.runner.unary(context, work)

    async def CreateSegment(
        self, request: segments_pb2.CreateSegmentRequest, context: Context
    ) -> resources_pb2.Segment:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Segment, int]:
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

        return await self.runner.unary(context, work)

    async def GetSegment(
        self, request: segments_pb2.GetSegmentRequest, context: Context
    ) -> resources_pb2.Segment:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Segment, None]:
            segment_id = parse_id(request.id, "segment")
            view = segments.get_segment(session, caller.project_id, segment_id)
            return segment_to_proto(view), None

        return await self.runner.unary(context, work)

    async def UpdateSegment(
        self, request: segments_pb2.UpdateSegmentRequest, context: Context
    ) -> resources_pb2.Segment:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Segment, None]:
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

        return await self.runner.unary(context, work)

    async def DeleteSegment(
        self, request: segments_pb2.DeleteSegmentRequest, context: Context
    ) -> empty_pb2.Empty:
        def work(session: Session, caller: Caller) -> tuple[empty_pb2.Empty, int]:
            segments.delete_segment(session, caller.project_id, parse_id(request.id, "segment"))
            return empty_pb2.Empty(), NO_CONTENT

        return await self.runner.unary(context, work)

    async def ListSegmentContacts(
        self, request: segments_pb2.ListSegmentContactsRequest, context: Context
    ) -> segments_pb2.ListSegmentContactsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.ListSegmentContactsResponse, None]:
            segment_id = parse_id(request.id, "segment")
            page, page_size = members.normalize_paging(request.page, request.page_size)
            result = members.list_members(session, caller.project_id, segment_id, page, page_size)
            return segments_pb2.ListSegmentContactsResponse(
                data=[contact_to_proto(r) for r in result.rows],
                total=result.total,
                page=result.page,
                page_size=result.page_size,
                total_pages=result.total_pages,
            ), None

        return await self.runner.unary(context, work)

    async def AddSegmentMembers(
        self, request: segments_pb2.AddSegmentMembersRequest, context: Context
    ) -> segments_pb2.AddSegmentMembersResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.AddSegmentMembersResponse, None]:
            segment_id = parse_id(request.id, "segment")
            result = members.add_members(
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

        return await self.runner.unary(context, work)

    async def RemoveSegmentMembers(
        self, request: segments_pb2.RemoveSegmentMembersRequest, context: Context
    ) -> segments_pb2.RemoveSegmentMembersResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.RemoveSegmentMembersResponse, None]:
            segment_id = parse_id(request.id, "segment")
            removed = members.remove_members(
                session, caller.project_id, segment_id, list(request.emails)
            )
            return segments_pb2.RemoveSegmentMembersResponse(removed=removed), None

        return await self.runner.unary(context, work)

    async def WatchSegmentEvents(  # type: ignore[override]  # writes through the context
        self, request: segments_pb2.WatchSegmentEventsRequest, context: Context
    ) -> None:
        scope = current_scope()
        runner = self.runner

        def opened(session: Session) -> tuple[Caller, feed.Cursor, list[str]]:
            caller = runner.authenticated(scope, session)
            cursor = (
                feed.Cursor.parse(request.after)
                if request.after
                else feed.start_cursor(session, caller.project_id)
            )
            return caller, cursor, [str(parse_id(i, "segment")) for i in request.segment_ids]

        caller, cursor, segment_ids = await runner.blocking(
            context, partial(in_transaction, runner.stream_sessions, opened)
        )
        project_id = caller.project_id
        with contextlib.ExitStack() as slot:
            try:
                slot.enter_context(runner.fair.streams.hold(project_id))
            except ServiceError as err:
                await abort(context, err, scope.request_id)
            # The headers tell the caller the stream is open and its start fixed: every
            # change committed after they arrive is sent (Watch from now loses none).
            await context.send_initial_metadata(())
            reauthenticate = streams.Reauthenticate()
            while not self.stopping.is_set() and not context.done():
                seen = self.watch.known(project_id)
                read = partial(
                    feed.read_after, project_id=project_id, after=cursor, segment_ids=segment_ids
                )
                batch = await runner.blocking(
                    context, partial(in_transaction, runner.stream_sessions, read)
                )
                for event in batch:
                    await context.write(_segment_event(event))
                    cursor = event.cursor
                if reauthenticate.due():
                    await runner.blocking(context, partial(runner.still_valid, scope))
                if len(batch) < feed.BATCH:
                    await self.watch.wait_beyond(
                        project_id, cursor.seq if seen is None else seen, streams.REAUTH_SECONDS
                    )

    async def ExportSegmentContacts(  # type: ignore[override]  # writes through the context
        self, request: segments_pb2.ExportSegmentContactsRequest, context: Context
    ) -> None:
        await self._export(
            context,
            request.id,
            lambda rows: streams.export_messages(map(contact_to_proto, rows)),
        )

    async def ExportSegmentCsv(  # type: ignore[override]  # writes through the context
        self, request: segments_pb2.ExportSegmentCsvRequest, context: Context
    ) -> None:
        await self._export(
            context,
            request.id,
            streams.csv_messages,
            # Over REST: the transcoder passes initial metadata on as response headers.
            lambda segment_id: (
                ("content-disposition", f'attachment; filename="segment-{segment_id}.csv"'),
            ),
        )

    async def _export(
        self,
        context: Context,
        raw_id: str,
        render: Callable[[Iterator[Any]], Iterator[Message]],
        headers: Callable[[uuid.UUID], tuple[tuple[str, str], ...]] | None = None,
    ) -> None:
        """Stream the segment's members, as `render` makes messages of its rows (contacts
        in id order), from one snapshot, within the project's stream share. The first
        message is made before anything is sent, so that what goes wrong up to there (an
        unknown segment, a BUILDING segment that cannot be read in time) is the call's
        status; an error after that ends the call with its status, which Envoy turns into
        a reset of the REST response (never a clean end)."""
        scope = current_scope()
        runner = self.runner

        # Every session given to `begin` (the standby's, and the primary's after it if the
        # standby failed): closed when the export ends, however it ends.
        given: list[Session] = []

        def begin(session: Session) -> None:
            given.append(session)
            # One snapshot for the whole export, taken by this first statement: a
            # consistent member list.
            session.connection(
                execution_options={
                    "isolation_level": "REPEATABLE READ",
                    "postgresql_readonly": True,
                }
            )
            # A reader that stalls longer than the idle limit loses its snapshot anyway.
            session.execute(
                text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)"),
                {"ms": str(int((streams.EXPORT_IDLE_SECONDS + 10) * 1000))},
            )

        def opened(caller: Caller) -> tuple[uuid.UUID, Message | None, Iterator[Message]]:
            segment_id = parse_id(raw_id, "segment")
            # The statement that reads the first rows does the work (a BUILDING segment's
            # members are selected live, and sorted): it gets one step's budget, after which
            # that segment is SEGMENT_BUILDING. Each later read is a short FETCH.
            set_statement_timeout(session, int(scope.step_seconds * 1000))
            messages = render(members.export_members(session, caller.project_id, segment_id))
            return segment_id, next(messages, None), messages

        loop = asyncio.get_running_loop()

        async def release() -> None:
            """Ends the snapshot's transaction and gives its connection back (once)."""
            while given:
                await loop.run_in_executor(runner.stream_pool, given.pop().close)

        try:
            # On the standby when it may serve (runner.snapshot), else on the primary.
            session, caller = await runner.blocking(context, partial(runner.snapshot, scope, begin))
            with contextlib.ExitStack() as slot:
                try:
                    slot.enter_context(runner.fair.streams.hold(caller.project_id))
                except ServiceError as err:
                    await abort(context, err, scope.request_id)
                segment_id, message, messages = await runner.blocking(
                    context, partial(opened, caller)
                )
                if headers is not None:
                    await context.send_initial_metadata(headers(segment_id))
                reauthenticate = streams.Reauthenticate()
                while message is not None and not context.done():
                    try:
                        await asyncio.wait_for(context.write(message), streams.EXPORT_IDLE_SECONDS)
                    except TimeoutError:
                        # The status goes out behind the messages the reader has not taken,
                        # i.e. once it reads again or goes away: the snapshot is released
                        # now, not then. The call keeps its stream share until it ends.
                        await release()
                        idle = DeadlineExceeded(
                            f"the export was closed: its reader took nothing for "
                            f"{streams.EXPORT_IDLE_SECONDS:.0f} s"
                        )
                        await abort(context, idle, scope.request_id)
                    if reauthenticate.due():
                        await runner.blocking(context, partial(runner.still_valid, scope))
                    message = await runner.blocking(context, partial(next, messages, None))
        finally:
            await release()

    async def CountMatchingContacts(
        self, request: segments_pb2.CountMatchingContactsRequest, context: Context
    ) -> segments_pb2.CountMatchingContactsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.CountMatchingContactsResponse, None]:
            condition = (
                condition_to_json(request.condition) if request.HasField("condition") else None
            )
            count = segments.count_matching(session, caller.project_id, condition)
            return segments_pb2.CountMatchingContactsResponse(count=count), None

        return await self.runner.unary(context, work, evaluates=True)

    async def PreviewSegment(
        self, request: segments_pb2.PreviewSegmentRequest, context: Context
    ) -> segments_pb2.PreviewSegmentResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.PreviewSegmentResponse, None]:
            condition = (
                condition_to_json(request.condition) if request.HasField("condition") else None
            )
            found = segments.preview(session, caller.project_id, condition)
            return segments_pb2.PreviewSegmentResponse(
                member_count=found.member_count,
                sample=[contact_to_proto(r) for r in found.sample],
            ), None

        return await self.runner.unary(context, work, evaluates=True)

    async def ListSegmentEvents(
        self, request: segments_pb2.ListSegmentEventsRequest, context: Context
    ) -> segments_pb2.ListSegmentEventsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.ListSegmentEventsResponse, None]:
            segment_id = parse_id(request.id, "segment")
            page = history.feed_page(
                session, caller.project_id, segment_id, request.after, request.limit
            )
            return segments_pb2.ListSegmentEventsResponse(
                data=[
                    segments_pb2.SegmentFeedEvent(
                        cursor=str(e.cursor),
                        type=e.type,
                        contact_id=str(e.contact_id),
                        email=e.email,
                        occurred_at=timestamp(e.occurred_at),
                    )
                    for e in page.entries
                ],
                next_cursor=str(page.next_cursor),
            ), None

        return await self.runner.unary(context, work)

    async def GetSegmentHistory(
        self, request: segments_pb2.GetSegmentHistoryRequest, context: Context
    ) -> segments_pb2.GetSegmentHistoryResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.GetSegmentHistoryResponse, None]:
            segment_id = parse_id(request.id, "segment")
            buckets = history.history(
                session,
                caller.project_id,
                segment_id,
                request.interval,
                getattr(request, "from"),
                request.to,
                membership.db_now(session),
            )
            return segments_pb2.GetSegmentHistoryResponse(
                data=[
                    segments_pb2.SegmentHistoryBucket(
                        start=timestamp(b.start), entries=b.entries, exits=b.exits, size=b.size
                    )
                    for b in buckets
                ]
            ), None

        return await self.runner.unary(context, work)

    async def ExplainMembership(
        self, request: segments_pb2.ExplainMembershipRequest, context: Context
    ) -> segments_pb2.ExplainMembershipResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[segments_pb2.ExplainMembershipResponse, None]:
            segment_id = parse_id(request.id, "segment")
            contact_id = parse_id(request.contact_id, "contact")
            found = explain.explain(session, caller.project_id, segment_id, contact_id)
            return segments_pb2.ExplainMembershipResponse(
                member=found.member, condition=py_to_value(ordered_condition(found.condition))
            ), None

        return await self.runner.unary(context, work, evaluates=True)


def _segment_event(event: feed.FeedEvent) -> segments_pb2.SegmentEvent:
    return segments_pb2.SegmentEvent(
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
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def UpsertContact(
        self, request: contacts_pb2.UpsertContactRequest, context: Context
    ) -> resources_pb2.Contact:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Contact, int | None]:
            write = _contact_write(request, "")
            result = contacts.upsert(session, caller.project_id, [write])
            (contact_id,) = result.ids
            row = contacts.get_contact(session, caller.project_id, contact_id)
            return contact_to_proto(row), CREATED if result.created else None

        return await self.runner.unary(context, work)

    async def BatchUpsertContacts(
        self, request: contacts_pb2.BatchUpsertContactsRequest, context: Context
    ) -> contacts_pb2.BatchUpsertContactsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[contacts_pb2.BatchUpsertContactsResponse, None]:
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

        return await self.runner.unary(context, work)

    async def GetContact(
        self, request: contacts_pb2.GetContactRequest, context: Context
    ) -> resources_pb2.Contact:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Contact, None]:
            contact_id = parse_id(request.id, "contact")
            return contact_to_proto(
                contacts.get_contact(session, caller.project_id, contact_id)
            ), None

        return await self.runner.unary(context, work)

    async def DeleteContact(
        self, request: contacts_pb2.DeleteContactRequest, context: Context
    ) -> empty_pb2.Empty:
        def work(session: Session, caller: Caller) -> tuple[empty_pb2.Empty, int]:
            contacts.delete_contact(session, caller.project_id, parse_id(request.id, "contact"))
            return empty_pb2.Empty(), NO_CONTENT

        return await self.runner.unary(context, work)

    async def ListContacts(
        self, request: contacts_pb2.ListContactsRequest, context: Context
    ) -> contacts_pb2.ListContactsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[contacts_pb2.ListContactsResponse, None]:
            page = contacts.list_contacts(
                session,
                caller.project_id,
                limit=request.limit,
                cursor=request.cursor,
                search=request.search,
                subscribed=request.subscribed if request.HasField("subscribed") else None,
            )
            return contacts_pb2.ListContactsResponse(
                data=[contact_to_proto(r) for r in page.rows],
                cursor=py_to_value(page.cursor),
                has_more=page.cursor is not None,
                total=page.total or 0,
            ), None

        return await self.runner.unary(context, work)

    async def UpdateContact(
        self, request: contacts_pb2.UpdateContactRequest, context: Context
    ) -> resources_pb2.Contact:
        def work(session: Session, caller: Caller) -> tuple[resources_pb2.Contact, None]:
            contact_id = parse_id(request.id, "contact")
            email = require_email(request.email, "email") if request.HasField("email") else None
            data = struct_to_dict(request.data) if request.HasField("data") else {}
            _raise(check_json(data, "data"))
            row = contacts.update_contact(
                session,
                caller.project_id,
                contact_id,
                email=email,
                subscribed=request.subscribed if request.HasField("subscribed") else None,
                patch=data,
            )
            return contact_to_proto(row), None

        return await self.runner.unary(context, work)

    async def ListContactSegments(
        self, request: contacts_pb2.ListContactSegmentsRequest, context: Context
    ) -> contacts_pb2.ListContactSegmentsResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[contacts_pb2.ListContactSegmentsResponse, None]:
            contact_id = parse_id(request.id, "contact")
            rows = contacts.contact_segments(session, caller.project_id, contact_id)
            return contacts_pb2.ListContactSegmentsResponse(
                segments=[
                    contacts_pb2.ContactSegment(
                        id=str(r.id), name=r.name, type=resources_pb2.Segment.Type.Value(r.type)
                    )
                    for r in rows
                ]
            ), None

        return await self.runner.unary(context, work)


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def Track(
        self, request: events_pb2.TrackRequest, context: Context
    ) -> events_pb2.TrackResponse:
        def work(session: Session, caller: Caller) -> tuple[events_pb2.TrackResponse, None]:
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

        return await self.runner.unary(context, work)

    async def IngestEvents(
        self, request: events_pb2.IngestEventsRequest, context: Context
    ) -> events_pb2.IngestEventsResponse:
        def work(session: Session, caller: Caller) -> tuple[events_pb2.IngestEventsResponse, None]:
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

        return await self.runner.unary(context, work)


def _webhook(view: webhooks.WebhookView) -> webhooks_pb2.Webhook:
    return webhooks_pb2.Webhook(
        id=str(view.id),
        url=view.url,
        segment_ids=[str(i) for i in view.segment_ids],
        created_at=timestamp(view.created_at),
    )


def _delivery(view: webhooks.DeliveryView) -> webhooks_pb2.WebhookDelivery:
    delivery = webhooks_pb2.WebhookDelivery(
        event_cursor=str(feed.Cursor(view.feed_seq)),
        event_id=view.event_id,
        type=view.type,
        status=webhooks_pb2.WebhookDelivery.Status.Value(view.status),
        attempts=view.attempts,
    )
    if view.last_error is None:
        delivery.last_error.null_value = struct_pb2.NULL_VALUE
    else:
        delivery.last_error.string_value = view.last_error
    if view.next_attempt_at is None:
        delivery.next_attempt_at.null_value = struct_pb2.NULL_VALUE
    else:
        delivery.next_attempt_at.string_value = timestamp(view.next_attempt_at).ToJsonString()
    return delivery


class WebhookServicer(webhooks_pb2_grpc.WebhookServiceServicer):
    def __init__(self, runner: Runner, allow_private: bool) -> None:
        self.runner = runner
        # Whether URLs with loopback and private address literals are accepted.
        self.allow_private = allow_private

    async def CreateWebhook(
        self, request: webhooks_pb2.CreateWebhookRequest, context: Context
    ) -> webhooks_pb2.CreateWebhookResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[webhooks_pb2.CreateWebhookResponse, int]:
            view = webhooks.create_webhook(
                session,
                caller.project_id,
                request.url,
                list(request.segment_ids),
                allow_private=self.allow_private,
            )
            return webhooks_pb2.CreateWebhookResponse(
                id=str(view.id),
                url=view.url,
                segment_ids=[str(i) for i in view.segment_ids],
                secret=view.secret or "",
                created_at=timestamp(view.created_at),
            ), CREATED

        return await self.runner.unary(context, work)

    async def ListWebhooks(
        self, request: webhooks_pb2.ListWebhooksRequest, context: Context
    ) -> webhooks_pb2.ListWebhooksResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[webhooks_pb2.ListWebhooksResponse, None]:
            views = webhooks.list_webhooks(session, caller.project_id)
            return webhooks_pb2.ListWebhooksResponse(webhooks=[_webhook(v) for v in views]), None

        return await self.runner.unary(context, work)

    async def GetWebhook(
        self, request: webhooks_pb2.GetWebhookRequest, context: Context
    ) -> webhooks_pb2.Webhook:
        def work(session: Session, caller: Caller) -> tuple[webhooks_pb2.Webhook, None]:
            webhook_id = parse_id(request.id, "webhook")
            return _webhook(webhooks.get_webhook(session, caller.project_id, webhook_id)), None

        return await self.runner.unary(context, work)

    async def DeleteWebhook(
        self, request: webhooks_pb2.DeleteWebhookRequest, context: Context
    ) -> empty_pb2.Empty:
        def work(session: Session, caller: Caller) -> tuple[empty_pb2.Empty, int]:
            webhooks.delete_webhook(session, caller.project_id, parse_id(request.id, "webhook"))
            return empty_pb2.Empty(), NO_CONTENT

        return await self.runner.unary(context, work)

    async def ListWebhookDeliveries(
        self, request: webhooks_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        def work(
            session: Session, caller: Caller
        ) -> tuple[webhooks_pb2.ListWebhookDeliveriesResponse, None]:
            webhook_id = parse_id(request.id, "webhook")
            views = webhooks.list_deliveries(session, caller.project_id, webhook_id, request.limit)
            return webhooks_pb2.ListWebhookDeliveriesResponse(
                data=[_delivery(v) for v in views]
            ), None

        return await self.runner.unary(context, work)
