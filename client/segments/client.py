"""Typed Python client of the segments service: one method per RPC, blocking or asyncio,
returning the generated protobuf messages and raising `SegmentsError` subclasses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeAlias, TypeVar

# grpcio ships no annotations; with types-grpcio installed the ignore is simply unused.
import grpc
from google.api import httpbody_pb2
from google.protobuf import empty_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from segments.conditions import Expression
from segments_api.v1 import contacts_pb2, events_pb2, resources_pb2, segments_pb2, webhooks_pb2

__all__ = [
    "NO_RETRY",
    "AlreadyExistsError",
    "AsyncContactListPager",
    "AsyncContactPager",
    "AsyncSegmentsClient",
    "Condition",
    "ContactListPager",
    "ContactPager",
    "DeadlineExceededError",
    "Explanation",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "InvalidRequestError",
    "NotFoundError",
    "RateLimitedError",
    "Retry",
    "SegmentInUseError",
    "SegmentsClient",
    "SegmentsError",
    "UnauthenticatedError",
    "UnavailableError",
    "contacts_cursor",
    "delivery_last_error",
    "delivery_next_attempt_at",
    "segment_condition",
    "segment_description",
    "verify_webhook_signature",
]

Segment = resources_pb2.Segment
Contact = resources_pb2.Contact
Webhook = webhooks_pb2.Webhook
WebhookDelivery = webhooks_pb2.WebhookDelivery
FilterCondition = resources_pb2.FilterCondition

#: A filter condition: built with `segments.F` (`(F.data("plan") == "pro") & ...`), in its REST
#: JSON form, e.g. {"logic": "AND", "groups": [{"filters": [{"field": ..., "operator": ...}]}]},
#: or as a message.
Condition: TypeAlias = Expression | Mapping[str, Any] | FilterCondition

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


# --- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, from google.rpc.BadRequest (`field` is a dot path)."""

    field: str
    description: str
    reason: str


class SegmentsError(Exception):
    """A failed call: its gRPC status code plus the service's google.rpc error details."""

    def __init__(
        self,
        status_code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        # The delay the service suggests before a retry (google.rpc.RetryInfo), if any.
        self.retry_after = retry_after
        self.status_code = status_code
        self.message = message
        # Empty when no ErrorInfo came back, e.g. the connection itself failed.
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.request_id: str | None = self.metadata.get("requestId")
        http_status = self.metadata.get("httpStatus", "")
        self.http_status: int | None = int(http_status) if http_status.isdigit() else None

    def __str__(self) -> str:
        text = f"{self.reason or self.status_code.name}: {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
            text += ")"
        if self.request_id:
            text += f" [request {self.request_id}]"
        return text


class InvalidArgumentError(SegmentsError):
    """INVALID_ARGUMENT: the request failed validation; see `field_violations`."""


class InvalidRequestError(InvalidArgumentError, ValueError, json_format.ParseError):
    """INVALID_ARGUMENT found by the client, before anything is sent: the request cannot be
    encoded (a condition with an unknown operator or key, a value that is not JSON).
    `field_violations` name the fields as the service would. It is a ValueError too, and a
    json_format.ParseError for callers written when protobuf's own error surfaced here."""

    @classmethod
    def of(cls, violations: Sequence[FieldViolation]) -> InvalidRequestError:
        return cls(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the request is invalid",
            reason="VALIDATION_ERROR",
            field_violations=violations,
        )


class UnauthenticatedError(SegmentsError):
    """UNAUTHENTICATED: missing or unknown API key, or a key of the wrong type."""


class NotFoundError(SegmentsError):
    """NOT_FOUND: no such segment or contact in the key's project."""


class FailedPreconditionError(SegmentsError):
    """FAILED_PRECONDITION: the request does not fit the resource's state."""


class SegmentInUseError(FailedPreconditionError):
    """The segment cannot be deleted while other segments reference it."""

    @property
    def referenced_by(self) -> list[str]:
        """Ids of the segments whose conditions name this one."""
        return [id for id in self.metadata.get("referencedBy", "").split(",") if id]


class AlreadyExistsError(SegmentsError):
    """ALREADY_EXISTS: a uniqueness rule was violated."""


class UnavailableError(SegmentsError):
    """UNAVAILABLE: the service or its database cannot be reached; retrying may succeed."""


class RateLimitedError(SegmentsError):
    """RESOURCE_EXHAUSTED: the project is over one of its fair-share limits; nothing was
    done, and retrying after `retry_after` seconds may succeed."""


class DeadlineExceededError(SegmentsError):
    """DEADLINE_EXCEEDED: the call ran out of time; the service committed nothing of it."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[SegmentsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _error(
    code: grpc.StatusCode, message: str | None, status: status_pb2.Status | None
) -> SegmentsError:
    """The typed error for a status and its google.rpc details (None when none were sent)."""
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details if status is not None else ():
        # Unpack answers False, leaving the message empty, when the detail is another type.
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
            metadata.update(info.metadata)
        elif detail.Unpack(bad_request):
            violations.extend(
                FieldViolation(v.field, v.description, v.reason)
                for v in bad_request.field_violations
            )
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    cls = _ERRORS_BY_CODE.get(code, SegmentsError)
    if cls is FailedPreconditionError and reason == "SEGMENT_IN_USE":
        cls = SegmentInUseError
    return cls(
        code,
        message or "",
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )


def _error_from_call(err: grpc.RpcError) -> SegmentsError:
    """Convert a blocking call's RpcError; its details come from rpc_status."""
    status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    return _error(err.code(), err.details(), status)


def _error_from_aio(err: aio.AioRpcError) -> SegmentsError:
    """Convert an asyncio call's error; rpc_status.from_call needs a live aio call, so the
    details are read from the trailing metadata instead."""
    status = None
    for key, value in err.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    return _error(err.code(), err.details(), status)


# --- reading a Segment ----------------------------------------------------------------------


def segment_condition(segment: Segment) -> FilterCondition | None:
    """The FilterCondition of a DYNAMIC segment, or None for a STATIC one."""
    if segment.condition.WhichOneof("kind") != "struct_value":
        return None
    as_json = json_format.MessageToDict(segment.condition.struct_value)
    return json_format.ParseDict(as_json, FilterCondition())


def segment_description(segment: Segment) -> str | None:
    """The segment's description, or None when it has none."""
    if segment.description.WhichOneof("kind") != "string_value":
        return None
    return segment.description.string_value


def contacts_cursor(page: contacts_pb2.ListContactsResponse) -> str | None:
    """The cursor of the page after `page` (ListContacts), or None after the last one."""
    if page.cursor.WhichOneof("kind") != "string_value":
        return None
    return page.cursor.string_value


def delivery_last_error(delivery: WebhookDelivery) -> str | None:
    """Why the delivery's last attempt failed, or None."""
    if delivery.last_error.WhichOneof("kind") != "string_value":
        return None
    return delivery.last_error.string_value


def delivery_next_attempt_at(delivery: WebhookDelivery) -> datetime | None:
    """When the delivery's next attempt is due (UTC), or None once delivered or failed."""
    if delivery.next_attempt_at.WhichOneof("kind") != "string_value":
        return None
    moment = timestamp_pb2.Timestamp()
    moment.FromJsonString(delivery.next_attempt_at.string_value)
    return moment.ToDatetime(tzinfo=UTC)


def verify_webhook_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> bool:
    """Whether `header` (Segments-Signature: t=<unix seconds>,v1=<hex>) signs `body` with the
    webhook's `secret`, at most `tolerance` seconds from `now` (default: the clock)."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        sent_at = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{sent_at}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


# --- the RPCs and their requests, shared by both clients -------------------------------------

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)


class BytesOut(Protocol):
    """Where export_segment_csv writes: a binary file, sys.stdout.buffer, io.BytesIO..."""

    def write(self, data: bytes, /) -> object: ...


# One table of typed RPCs instead of the generated *_pb2_grpc stubs: it binds to blocking and
# asyncio channels alike, and types every call even where grpc itself has no annotations.
@dataclass(frozen=True)
class _Rpc(Generic[_Req, _Resp]):
    """One unary RPC: the path it is sent on and its message types."""

    path: str
    request: type[_Req]
    response: type[_Resp]
    # Whether sending it twice does no more than sending it once: such calls are retried
    # on UNAVAILABLE too (a refusal for the project's share is retried for every call).
    idempotent: bool

    def bind(self, channel: grpc.Channel | aio.Channel) -> Any:
        """The multi-callable for this RPC on a blocking or an asyncio channel."""
        return channel.unary_unary(
            self.path,
            request_serializer=self.request.SerializeToString,
            response_deserializer=self.response.FromString,
        )

    def checked(self, response: object) -> _Resp:
        """`response` typed as this RPC's answer (grpc is untyped, so calls return Any)."""
        if not isinstance(response, self.response):
            raise TypeError(f"{self.path} answered {type(response).__name__}")
        return response


def _rpc(
    service: ServiceDescriptor,
    method: str,
    request: type[_Req],
    response: type[_Resp],
    *,
    idempotent: bool = True,
) -> _Rpc[_Req, _Resp]:
    # Checked against the compiled protos so that a renamed RPC fails at import, not per call.
    descriptor = service.methods_by_name[method]
    if (descriptor.input_type, descriptor.output_type) != (request.DESCRIPTOR, response.DESCRIPTOR):
        raise TypeError(f"{descriptor.full_name} is not {request.__name__} -> {response.__name__}")
    return _Rpc(f"/{service.full_name}/{method}", request, response, idempotent)


_SEGMENTS = segments_pb2.DESCRIPTOR.services_by_name["SegmentService"]
# Server-streaming RPCs: (path, response type).
_WATCH_PATH = f"/{_SEGMENTS.full_name}/WatchSegmentEvents"


def _stream_ended(
    error: SegmentsError, timeout: float | None, ends_at_deadline: bool, started: float
) -> bool:
    """Whether `error` ends a stream's iteration quietly instead of raising: cancelled by
    the caller; and for a stream with no end of its own (Watch), the caller's own `timeout`
    running out. Only that deadline: the service's DEADLINE_EXCEEDED (its budget of a step,
    which carries its ErrorInfo) still raises, and so does an export cut short by its
    deadline, which is incomplete. A proxy that enforces the same deadline (Envoy) may
    reset the stream at that moment rather than end it with DEADLINE_EXCEEDED: once the
    caller's deadline (`started` + `timeout`, monotonic) has passed, that reset (INTERNAL)
    ends the iteration too."""
    if error.status_code == grpc.StatusCode.CANCELLED:
        return True
    if not ends_at_deadline or timeout is None or error.reason:
        return False
    if error.status_code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    return (
        error.status_code == grpc.StatusCode.INTERNAL
        and time.monotonic() >= started + timeout - _DEADLINE_SLACK
    )


# Timers of the client and of a proxy enforcing one deadline fire within this of each other.
_DEADLINE_SLACK = 0.05


_EXPORT_PATH = f"/{_SEGMENTS.full_name}/ExportSegmentContacts"
_EXPORT_CSV_PATH = f"/{_SEGMENTS.full_name}/ExportSegmentCsv"
_CONTACTS = contacts_pb2.DESCRIPTOR.services_by_name["ContactService"]
_EVENTS = events_pb2.DESCRIPTOR.services_by_name["EventService"]

_LIST_SEGMENTS = _rpc(
    _SEGMENTS, "ListSegments", segments_pb2.ListSegmentsRequest, segments_pb2.ListSegmentsResponse
)
_CREATE_SEGMENT = _rpc(
    _SEGMENTS, "CreateSegment", segments_pb2.CreateSegmentRequest, Segment, idempotent=False
)
_GET_SEGMENT = _rpc(_SEGMENTS, "GetSegment", segments_pb2.GetSegmentRequest, Segment)
_UPDATE_SEGMENT = _rpc(_SEGMENTS, "UpdateSegment", segments_pb2.UpdateSegmentRequest, Segment)
# A delete sent again after its answer was lost would find nothing: not retried.
_DELETE_SEGMENT = _rpc(
    _SEGMENTS, "DeleteSegment", segments_pb2.DeleteSegmentRequest, empty_pb2.Empty, idempotent=False
)
_LIST_SEGMENT_CONTACTS = _rpc(
    _SEGMENTS,
    "ListSegmentContacts",
    segments_pb2.ListSegmentContactsRequest,
    segments_pb2.ListSegmentContactsResponse,
)
_ADD_SEGMENT_MEMBERS = _rpc(
    _SEGMENTS,
    "AddSegmentMembers",
    segments_pb2.AddSegmentMembersRequest,
    segments_pb2.AddSegmentMembersResponse,
)
_REMOVE_SEGMENT_MEMBERS = _rpc(
    _SEGMENTS,
    "RemoveSegmentMembers",
    segments_pb2.RemoveSegmentMembersRequest,
    segments_pb2.RemoveSegmentMembersResponse,
)
_COUNT_MATCHING_CONTACTS = _rpc(
    _SEGMENTS,
    "CountMatchingContacts",
    segments_pb2.CountMatchingContactsRequest,
    segments_pb2.CountMatchingContactsResponse,
)
_LIST_SEGMENT_EVENTS = _rpc(
    _SEGMENTS,
    "ListSegmentEvents",
    segments_pb2.ListSegmentEventsRequest,
    segments_pb2.ListSegmentEventsResponse,
)
_GET_SEGMENT_HISTORY = _rpc(
    _SEGMENTS,
    "GetSegmentHistory",
    segments_pb2.GetSegmentHistoryRequest,
    segments_pb2.GetSegmentHistoryResponse,
)
_EXPLAIN_MEMBERSHIP = _rpc(
    _SEGMENTS,
    "ExplainMembership",
    segments_pb2.ExplainMembershipRequest,
    segments_pb2.ExplainMembershipResponse,
)
_UPSERT_CONTACT = _rpc(_CONTACTS, "UpsertContact", contacts_pb2.UpsertContactRequest, Contact)
_BATCH_UPSERT_CONTACTS = _rpc(
    _CONTACTS,
    "BatchUpsertContacts",
    contacts_pb2.BatchUpsertContactsRequest,
    contacts_pb2.BatchUpsertContactsResponse,
)
_GET_CONTACT = _rpc(_CONTACTS, "GetContact", contacts_pb2.GetContactRequest, Contact)
_DELETE_CONTACT = _rpc(
    _CONTACTS, "DeleteContact", contacts_pb2.DeleteContactRequest, empty_pb2.Empty, idempotent=False
)
_WEBHOOKS = webhooks_pb2.DESCRIPTOR.services_by_name["WebhookService"]
_CREATE_WEBHOOK = _rpc(
    _WEBHOOKS,
    "CreateWebhook",
    webhooks_pb2.CreateWebhookRequest,
    webhooks_pb2.CreateWebhookResponse,
    idempotent=False,
)
_LIST_WEBHOOKS = _rpc(
    _WEBHOOKS, "ListWebhooks", webhooks_pb2.ListWebhooksRequest, webhooks_pb2.ListWebhooksResponse
)
_GET_WEBHOOK = _rpc(_WEBHOOKS, "GetWebhook", webhooks_pb2.GetWebhookRequest, Webhook)
_DELETE_WEBHOOK = _rpc(
    _WEBHOOKS, "DeleteWebhook", webhooks_pb2.DeleteWebhookRequest, empty_pb2.Empty, idempotent=False
)
_LIST_WEBHOOK_DELIVERIES = _rpc(
    _WEBHOOKS,
    "ListWebhookDeliveries",
    webhooks_pb2.ListWebhookDeliveriesRequest,
    webhooks_pb2.ListWebhookDeliveriesResponse,
)
_LIST_CONTACTS = _rpc(
    _CONTACTS, "ListContacts", contacts_pb2.ListContactsRequest, contacts_pb2.ListContactsResponse
)
# Sending the same change twice leaves the contact as sending it once.
_UPDATE_CONTACT = _rpc(_CONTACTS, "UpdateContact", contacts_pb2.UpdateContactRequest, Contact)
_LIST_CONTACT_SEGMENTS = _rpc(
    _CONTACTS,
    "ListContactSegments",
    contacts_pb2.ListContactSegmentsRequest,
    contacts_pb2.ListContactSegmentsResponse,
)
_PREVIEW_SEGMENT = _rpc(
    _SEGMENTS,
    "PreviewSegment",
    segments_pb2.PreviewSegmentRequest,
    segments_pb2.PreviewSegmentResponse,
)
_TRACK = _rpc(_EVENTS, "Track", events_pb2.TrackRequest, events_pb2.TrackResponse, idempotent=False)
_INGEST_EVENTS = _rpc(
    _EVENTS,
    "IngestEvents",
    events_pb2.IngestEventsRequest,
    events_pb2.IngestEventsResponse,
    idempotent=False,
)


def _condition(condition: Condition | None) -> FilterCondition | None:
    """The message for a condition, or InvalidRequestError naming every part that has no place
    in one (a key, an operator, a logic or unit name); the service validates the rest."""
    if condition is None or isinstance(condition, FilterCondition):
        return condition
    raw = condition.to_dict() if isinstance(condition, Expression) else condition
    violations: list[FieldViolation] = []
    message = _ConditionReader(violations).condition(raw, "condition")
    if violations:
        raise InvalidRequestError.of(violations)
    return message


class _ConditionReader:
    """Reads a condition's JSON form into a FilterCondition, noting what cannot be encoded."""

    _ENUMS: Mapping[str, Any] = {
        "logic": FilterCondition.Logic,
        "operator": resources_pb2.Filter.Operator,
        "unit": resources_pb2.Filter.Unit,
        "function": resources_pb2.Filter.Aggregate.Function,
    }

    def __init__(self, violations: list[FieldViolation]) -> None:
        self._violations = violations

    def _fail(self, path: str, description: str, reason: str) -> None:
        self._violations.append(FieldViolation(path, description, reason))

    def _object(self, raw: object, path: str, keys: set[str], what: str) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            self._fail(path, f"must be an object with {what}", "invalid_type")
            return {}
        for key in raw:
            if key not in keys:
                self._fail(
                    f"{path}.{key}",
                    f"unknown key; known: {', '.join(sorted(keys))}",
                    "unknown_field",
                )
        # A JSON null is the same as an absent key.
        return {k: v for k, v in raw.items() if k in keys and v is not None}

    def _list(self, raw: object, path: str) -> Sequence[Any]:
        if isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
            return raw
        self._fail(path, "must be an array", "invalid_type")
        return ()

    def _enum(self, raw: object, path: str, kind: str) -> int:
        enum = self._ENUMS[kind]
        names = [v.name for v in enum.DESCRIPTOR.values if not v.name.endswith("_UNSPECIFIED")]
        if isinstance(raw, str) and raw in names:
            return int(enum.Value(raw))
        self._fail(path, f"unknown {kind} {raw!r}; known: {', '.join(names)}", "invalid_enum")
        return 0

    def condition(self, raw: object, path: str) -> FilterCondition:
        fields = self._object(raw, path, {"logic", "groups"}, "`logic` and `groups`")
        out = FilterCondition()
        if "logic" in fields:
            out.logic = self._enum(fields["logic"], f"{path}.logic", "logic")  # type: ignore[assignment]
        for i, group in enumerate(self._list(fields.get("groups", ()), f"{path}.groups")):
            out.groups.append(self.group(group, f"{path}.groups.{i}"))
        return out

    def group(self, raw: object, path: str) -> resources_pb2.FilterGroup:
        fields = self._object(raw, path, {"filters", "conditions"}, "`filters` and/or `conditions`")
        out = resources_pb2.FilterGroup()
        for i, item in enumerate(self._list(fields.get("filters", ()), f"{path}.filters")):
            out.filters.append(self.filter(item, f"{path}.filters.{i}"))
        if "conditions" in fields:
            out.conditions.CopyFrom(self.condition(fields["conditions"], f"{path}.conditions"))
        return out

    def filter(self, raw: object, path: str) -> resources_pb2.Filter:
        keys = {"field", "operator", "value", "unit", "count", "where", "aggregate"}
        fields = self._object(raw, path, keys, "`field` and `operator`")
        out = resources_pb2.Filter()
        self._field(fields, path, out)
        for kind in ("operator", "unit"):
            if kind in fields:
                setattr(out, kind, self._enum(fields[kind], f"{path}.{kind}", kind))
        self._value(fields, path, out.value)
        if "count" in fields:
            count = self._object(
                fields["count"], f"{path}.count", {"operator", "value"}, "`operator` and `value`"
            )
            if "operator" in count:
                out.count.operator = self._enum(  # type: ignore[assignment]
                    count["operator"], f"{path}.count.operator", "operator"
                )
            self._value(count, f"{path}.count", out.count.value)
            out.count.SetInParent()
        for i, item in enumerate(self._list(fields.get("where", ()), f"{path}.where")):
            out.where.append(self.filter(item, f"{path}.where.{i}"))
        if "aggregate" in fields:
            at = f"{path}.aggregate"
            keys = {"function", "field", "operator", "value"}
            what = "`function`, `field`, `operator` and `value`"
            aggregate = self._object(fields["aggregate"], at, keys, what)
            self._field(aggregate, at, out.aggregate)
            for kind in ("function", "operator"):
                if kind in aggregate:
                    setattr(out.aggregate, kind, self._enum(aggregate[kind], f"{at}.{kind}", kind))
            self._value(aggregate, at, out.aggregate.value)
            out.aggregate.SetInParent()
        return out

    def _field(self, fields: Mapping[str, Any], path: str, out: Any) -> None:
        if "field" in fields:
            if isinstance(fields["field"], str):
                out.field = fields["field"]
            else:
                self._fail(f"{path}.field", "must be a string", "invalid_type")

    def _value(self, fields: Mapping[str, Any], path: str, out: struct_pb2.Value) -> None:
        if "value" in fields:
            try:
                json_format.ParseDict(fields["value"], out)
            except json_format.ParseError:
                description = "must be a JSON value (string, number, boolean or array)"
                self._fail(f"{path}.value", description, "invalid_type")


def _history_request(
    segment_id: str, interval: str, start: datetime | None, end: datetime | None
) -> segments_pb2.GetSegmentHistoryRequest:
    request = segments_pb2.GetSegmentHistoryRequest(id=segment_id, interval=interval)
    for name, moment in (("from", start), ("to", end)):
        if moment is not None:
            if moment.tzinfo is None:
                raise ValueError(f"{name} must be an aware datetime")
            setattr(request, name, moment.isoformat())
    return request


def _struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if data is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(data)  # None values become JSON null, which removes the key on upsert
    return struct


def _create_segment(
    name: str,
    condition: Condition | None,
    type: str,
    description: str | None,
    track_membership: bool | None,
) -> segments_pb2.CreateSegmentRequest:
    return segments_pb2.CreateSegmentRequest(
        name=name,
        description=description,
        # Raises ValueError for a name other than DYNAMIC or STATIC.
        type=Segment.Type.Value(type),
        condition=_condition(condition),
        track_membership=track_membership,
    )


def _update_segment(
    id: str,
    name: str | None,
    description: str | None,
    condition: Condition | None,
    track_membership: bool | None,
) -> segments_pb2.UpdateSegmentRequest:
    return segments_pb2.UpdateSegmentRequest(
        id=id,
        name=name,
        description=description,
        condition=_condition(condition),
        track_membership=track_membership,
    )


def _add_members(
    id: str, emails: Iterable[str], create_missing: bool | None, subscribed: bool | None
) -> segments_pb2.AddSegmentMembersRequest:
    return segments_pb2.AddSegmentMembersRequest(
        id=id, emails=list(emails), create_missing=create_missing, subscribed=subscribed
    )


def _upsert_contact(
    email: str, subscribed: bool | None, data: Mapping[str, Any] | None
) -> contacts_pb2.UpsertContactRequest:
    return contacts_pb2.UpsertContactRequest(email=email, subscribed=subscribed, data=_struct(data))


def _update_contact(
    id: str, email: str | None, subscribed: bool | None, data: Mapping[str, Any] | None
) -> contacts_pb2.UpdateContactRequest:
    return contacts_pb2.UpdateContactRequest(
        id=id, email=email, subscribed=subscribed, data=_struct(data)
    )


def _list_contacts(
    limit: int, cursor: str | None, search: str, subscribed: bool | None
) -> contacts_pb2.ListContactsRequest:
    return contacts_pb2.ListContactsRequest(
        limit=limit, cursor=cursor or "", search=search, subscribed=subscribed
    )


def _parsed(
    items: Iterable[Mapping[str, Any] | _Req],
    parse: Callable[[Mapping[str, Any]], _Req],
    path: str,
    message: type[_Req],
) -> list[_Req]:
    """Items of a REST body's list as messages (an item that is already a `message` is taken
    as it is); InvalidRequestError names the ones that are not."""
    parsed: list[_Req] = []
    violations: list[FieldViolation] = []
    for i, item in enumerate(items):
        if isinstance(item, message):
            parsed.append(item)
            continue
        try:
            parsed.append(parse(item))  # type: ignore[arg-type]  # a Mapping, not a message
        except (json_format.ParseError, TypeError, ValueError) as err:
            violations.append(FieldViolation(f"{path}.{i}", str(err), "invalid"))
    if violations:
        raise InvalidRequestError.of(violations)
    return parsed


def _batch_upsert(
    contacts: Iterable[Mapping[str, Any] | contacts_pb2.UpsertContactRequest],
) -> contacts_pb2.BatchUpsertContactsRequest:
    # The REST body's item shape, {email, subscribed?, data?}, parsed as JSON.
    return contacts_pb2.BatchUpsertContactsRequest(
        contacts=_parsed(
            contacts,
            lambda c: json_format.ParseDict(dict(c), contacts_pb2.UpsertContactRequest()),
            "contacts",
            contacts_pb2.UpsertContactRequest,
        )
    )


def _track(
    event: str, email: str, subscribed: bool | None, data: Mapping[str, Any] | None
) -> events_pb2.TrackRequest:
    return events_pb2.TrackRequest(
        event=event, email=email, subscribed=subscribed, data=_struct(data)
    )


def _ingested_event(event: Mapping[str, Any]) -> events_pb2.IngestedEvent:
    fields = dict(event)
    for key in ("occurredAt", "occurred_at"):
        if isinstance(fields.get(key), datetime):
            fields[key] = _rfc3339(fields[key])
    return json_format.ParseDict(fields, events_pb2.IngestedEvent())


def _create_webhook(
    url: str, segment_ids: Iterable[str] | None
) -> webhooks_pb2.CreateWebhookRequest:
    if isinstance(segment_ids, str):
        raise TypeError("segment_ids is a list of segment ids, not one string")
    return webhooks_pb2.CreateWebhookRequest(url=url, segment_ids=list(segment_ids or ()))


def _rfc3339(moment: datetime) -> str:
    # A naive datetime would silently be read as UTC; local time is the likelier intent.
    if moment.tzinfo is None:
        raise ValueError(f"occurredAt {moment.isoformat()} has no time zone")
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp.ToJsonString()


def _ingest(
    events: Iterable[Mapping[str, Any] | events_pb2.IngestedEvent],
) -> events_pb2.IngestEventsRequest:
    return events_pb2.IngestEventsRequest(
        events=_parsed(events, _ingested_event, "events", events_pb2.IngestedEvent)
    )


# --- paging ---------------------------------------------------------------------------------

_Page = segments_pb2.ListSegmentContactsResponse
#: Most contacts the service returns in one page.
MAX_PAGE_SIZE = 100


def _page_size(page_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size is a number of contacts, got {page_size!r}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, got {page_size}")
    return page_size


class AsyncEventStream(AsyncIterator[segments_pb2.SegmentEvent]):
    """What AsyncSegmentsClient.watch_segment_events returns: the events as an async
    iterator, and `opened()`, which returns once the server has fixed the stream's start
    (its headers came): every change written after that is sent. Iterating waits for it
    first anyway."""

    def __init__(self, call: Any, events: AsyncIterator[segments_pb2.SegmentEvent]) -> None:
        self._call = call
        self._events = events

    async def opened(self) -> None:
        """Wait until the stream is open; a refusal raises at the first iteration."""
        await self._call.initial_metadata()

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> segments_pb2.SegmentEvent:
        return await self._events.__anext__()


class _PageWalk:
    """The walk over ListSegmentContacts pages both pagers share: which page comes next, and
    which contacts of a page were not yielded already."""

    def __init__(self) -> None:
        self.next_page: int | None = 1
        #: Members in all, as the latest page counted them (None before the first page).
        self.total: int | None = None
        self._previous: set[str] = set()

    def take(self, page: _Page) -> list[Contact]:
        """The contacts of `page` to yield. A member that joins while the walk goes on shifts
        the later ones back by one place; the one pushed over the page boundary then comes
        again on the next page, and is skipped."""
        self.total = page.total
        fresh = [c for c in page.data if c.id not in self._previous]
        self._previous = {c.id for c in page.data}
        done = not page.data or page.page >= page.total_pages
        self.next_page = None if done else page.page + 1
        return fresh


class ContactPager:
    """Every member of a segment, fetched a page at a time as the iteration reaches it (in the
    spirit of google-api-core's page iterators). Iterate for the contacts, or over `pages` for
    the responses; `total` is known once the first page is read. One walk per pager.

    Pages are numbered, so a member that leaves while the walk goes on may let one that stays
    slip past a page boundary unseen; export_segment_contacts reads one snapshot instead."""

    def __init__(self, fetch: Callable[[int], _Page]) -> None:
        self._fetch = fetch
        self._walk = _PageWalk()
        self._started = False

    @property
    def total(self) -> int | None:
        return self._walk.total

    @property
    def pages(self) -> Iterator[_Page]:
        if self._started:
            raise RuntimeError("this pager has been iterated already; ask the client for another")
        self._started = True
        return self._pages()

    def _pages(self) -> Iterator[_Page]:
        while self._walk.next_page is not None:
            page = self._fetch(self._walk.next_page)
            # The contacts already yielded are removed from the page itself.
            fresh = self._walk.take(page)
            del page.data[:]
            page.data.extend(fresh)
            yield page

    def __iter__(self) -> Iterator[Contact]:
        for page in self.pages:
            yield from page.data


class AsyncContactPager:
    """ContactPager for the asyncio client: `async for contact in pager`, or over `pages`."""

    def __init__(self, fetch: Callable[[int], Awaitable[_Page]]) -> None:
        self._fetch = fetch
        self._walk = _PageWalk()
        self._started = False

    @property
    def total(self) -> int | None:
        return self._walk.total

    @property
    def pages(self) -> AsyncIterator[_Page]:
        if self._started:
            raise RuntimeError("this pager has been iterated already; ask the client for another")
        self._started = True
        return self._pages()

    async def _pages(self) -> AsyncIterator[_Page]:
        while self._walk.next_page is not None:
            page = await self._fetch(self._walk.next_page)
            fresh = self._walk.take(page)
            del page.data[:]
            page.data.extend(fresh)
            yield page

    async def __aiter__(self) -> AsyncIterator[Contact]:
        async for page in self.pages:
            for contact in page.data:
                yield contact


_ContactsPage = contacts_pb2.ListContactsResponse


class _CursorWalk:
    """The walk over ListContacts pages both cursor pagers share: the cursor of the next page
    (keyset pages: a contact inserted meanwhile never shifts the others, so nothing comes
    twice and nothing that was there is skipped)."""

    def __init__(self) -> None:
        self.started = False
        self.cursor: str | None = None
        #: Contacts matching the filters, counted by the first page (None before it).
        self.total: int | None = None

    @property
    def more(self) -> bool:
        return not self.started or self.cursor is not None

    def take(self, page: _ContactsPage) -> None:
        if not self.started:
            self.total = page.total
        self.started = True
        self.cursor = contacts_cursor(page)


class ContactListPager:
    """Every contact of the project that the filters select, newest first, fetched a page at
    a time as the iteration reaches it (as ContactPager does for a segment's members).
    Iterate for the contacts, or over `pages` for the responses; `total` is known once the
    first page is read. One walk per pager."""

    def __init__(self, fetch: Callable[[str | None], _ContactsPage]) -> None:
        self._fetch = fetch
        self._walk = _CursorWalk()
        self._iterated = False

    @property
    def total(self) -> int | None:
        return self._walk.total

    @property
    def pages(self) -> Iterator[_ContactsPage]:
        if self._iterated:
            raise RuntimeError("this pager has been iterated already; ask the client for another")
        self._iterated = True
        return self._pages()

    def _pages(self) -> Iterator[_ContactsPage]:
        while self._walk.more:
            page = self._fetch(self._walk.cursor)
            self._walk.take(page)
            yield page

    def __iter__(self) -> Iterator[Contact]:
        for page in self.pages:
            yield from page.data


class AsyncContactListPager:
    """ContactListPager for the asyncio client: `async for contact in pager`, or over `pages`."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[_ContactsPage]]) -> None:
        self._fetch = fetch
        self._walk = _CursorWalk()
        self._iterated = False

    @property
    def total(self) -> int | None:
        return self._walk.total

    @property
    def pages(self) -> AsyncIterator[_ContactsPage]:
        if self._iterated:
            raise RuntimeError("this pager has been iterated already; ask the client for another")
        self._iterated = True
        return self._pages()

    async def _pages(self) -> AsyncIterator[_ContactsPage]:
        while self._walk.more:
            page = await self._fetch(self._walk.cursor)
            self._walk.take(page)
            yield page

    async def __aiter__(self) -> AsyncIterator[Contact]:
        async for page in self.pages:
            for contact in page.data:
                yield contact


@dataclass(frozen=True)
class Explanation:
    """Why a contact is or is not a member of a segment now (explain_membership)."""

    member: bool
    # The segment's condition as JSON, with `matched: True/False` on every filter, group
    # and condition; None for a STATIC segment.
    condition: dict[str, Any] | None

    @classmethod
    def of(cls, response: segments_pb2.ExplainMembershipResponse) -> Explanation:
        condition = json_format.MessageToDict(response.condition)
        return cls(response.member, condition if isinstance(condition, dict) else None)


# --- the clients ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How a client retries: a call refused for the project's share (RESOURCE_EXHAUSTED) is
    sent again, and so is an idempotent call that met UNAVAILABLE, after the delay the
    service suggests (RetryInfo) or else exponential backoff with full jitter, up to
    `attempts` sends in all and never past the call's timeout."""

    attempts: int = 4
    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0

    def applies(self, rpc: _Rpc[Any, Any], err: SegmentsError, attempt: int) -> bool:
        if attempt >= self.attempts:
            return False
        return isinstance(err, RateLimitedError) or (
            rpc.idempotent and isinstance(err, UnavailableError)
        )

    def delay(self, err: SegmentsError, attempt: int) -> float:
        """Seconds to wait before send number `attempt + 1`."""
        if err.retry_after is not None:
            # The service's own estimate, spread a little so refused callers do not return
            # in step.
            return err.retry_after * random.uniform(1.0, 1.25)
        return random.uniform(0, min(self.maximum, self.initial * self.multiplier ** (attempt - 1)))


#: No retries: every error reaches the caller at once.
NO_RETRY = Retry(attempts=1)


class _Client:
    """What both clients hold: the channel settings and the call metadata."""

    def __init__(self, api_key: str, timeout: float, owns_channel: bool, retry: Retry) -> None:
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout
        self._owns_channel = owns_channel
        self._retry = retry

    def _next_try(
        self, rpc: _Rpc[Any, Any], err: SegmentsError, attempt: int, deadline: float
    ) -> float | None:
        """The delay before sending `rpc` again, or None to raise `err`."""
        if not self._retry.applies(rpc, err, attempt):
            return None
        delay = self._retry.delay(err, attempt)
        return delay if time.monotonic() + delay < deadline else None


class SegmentsClient(_Client):
    """Blocking client for one API key: the secret key for all calls but `track` (public key)."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        channel: grpc.Channel | None = None,
        retry: Retry = Retry(),
    ) -> None:
        super().__init__(api_key, timeout, owns_channel=channel is None, retry=retry)
        # Pass `channel` for TLS or custom options; it is then left open by close().
        self._channel: grpc.Channel = (
            channel if channel is not None else grpc.insecure_channel(target)
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def _send(self, rpc: _Rpc[_Req, _Resp], request: _Req) -> _Resp:
        deadline = time.monotonic() + self._timeout
        attempt = 1
        while True:
            try:
                response = rpc.bind(self._channel)(
                    request,
                    timeout=max(0.0, deadline - time.monotonic()),
                    metadata=self._metadata,
                )
                return rpc.checked(response)
            except grpc.RpcError as raw:
                err = _error_from_call(raw)
                delay = self._next_try(rpc, err, attempt, deadline)
                if delay is None:
                    raise err from raw
            time.sleep(delay)
            attempt += 1

    def list_segments(self) -> list[Segment]:
        """Every segment of the project, newest first."""
        return list(self._send(_LIST_SEGMENTS, segments_pb2.ListSegmentsRequest()).segments)

    def create_segment(
        self,
        name: str,
        *,
        condition: Condition | None = None,
        type: str = "DYNAMIC",
        description: str | None = None,
        track_membership: bool | None = None,
    ) -> Segment:
        """Create a DYNAMIC (needs `condition`) or STATIC segment."""
        return self._send(
            _CREATE_SEGMENT,
            _create_segment(name, condition, type, description, track_membership),
        )

    def get_segment(self, id: str) -> Segment:
        """One segment with its current member count."""
        return self._send(_GET_SEGMENT, segments_pb2.GetSegmentRequest(id=id))

    def count_matching_contacts(self, condition: Condition) -> int:
        """How many of the project's contacts `condition` selects now; nothing is stored."""
        request = segments_pb2.CountMatchingContactsRequest(condition=_condition(condition))
        return self._send(_COUNT_MATCHING_CONTACTS, request).count

    def preview_segment(self, condition: Condition) -> segments_pb2.PreviewSegmentResponse:
        """How many contacts `condition` selects now (`member_count`) and up to 10 of them,
        the first the service finds, shown newest first (`sample`); nothing is stored."""
        request = segments_pb2.PreviewSegmentRequest(condition=_condition(condition))
        return self._send(_PREVIEW_SEGMENT, request)

    def explain_membership(self, segment_id: str, contact_id: str) -> Explanation:
        """Why the contact is or is not a member now: the condition, each part `matched`."""
        request = segments_pb2.ExplainMembershipRequest(id=segment_id, contact_id=contact_id)
        return Explanation.of(self._send(_EXPLAIN_MEMBERSHIP, request))

    def list_segment_events(
        self, segment_id: str, *, after: str = "", limit: int = 0
    ) -> segments_pb2.ListSegmentEventsResponse:
        """A page of a tracked segment's entries and exits after the cursor `after` (""
        from the oldest), oldest first; the next page starts after `next_cursor`."""
        request = segments_pb2.ListSegmentEventsRequest(id=segment_id, after=after, limit=limit)
        return self._send(_LIST_SEGMENT_EVENTS, request)

    def segment_history(
        self,
        segment_id: str,
        *,
        interval: str = "day",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[segments_pb2.SegmentHistoryBucket]:
        """A tracked segment's entries, exits and size per UTC hour or day, from the bucket
        holding `start` to the one holding `end` (defaults: the service's)."""
        request = _history_request(segment_id, interval, start, end)
        return list(self._send(_GET_SEGMENT_HISTORY, request).data)

    def update_segment(
        self,
        id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        condition: Condition | None = None,
        track_membership: bool | None = None,
    ) -> Segment:
        """Change the given fields and keep the others; description "" clears it."""
        return self._send(
            _UPDATE_SEGMENT,
            _update_segment(id, name, description, condition, track_membership),
        )

    def delete_segment(self, id: str) -> None:
        """Delete a segment that no other segment references."""
        self._send(_DELETE_SEGMENT, segments_pb2.DeleteSegmentRequest(id=id))

    def list_segment_contacts(
        self, id: str, *, page: int = 1, page_size: int = 20
    ) -> segments_pb2.ListSegmentContactsResponse:
        """One page (1-based, at most 100 contacts) of the segment's current members."""
        return self._send(
            _LIST_SEGMENT_CONTACTS,
            segments_pb2.ListSegmentContactsRequest(id=id, page=page, page_size=page_size),
        )

    def iter_segment_contacts(self, id: str, *, page_size: int = MAX_PAGE_SIZE) -> ContactPager:
        """Every current member of the segment, in listing order, fetched page by page as the
        iteration reaches it: `for contact in client.iter_segment_contacts(id): ...`."""
        size = _page_size(page_size)
        return ContactPager(lambda page: self.list_segment_contacts(id, page=page, page_size=size))

    def add_segment_members(
        self,
        id: str,
        emails: Iterable[str],
        *,
        create_missing: bool | None = None,
        subscribed: bool | None = None,
    ) -> segments_pb2.AddSegmentMembersResponse:
        """Add contacts to a STATIC segment by email, creating missing ones by default."""
        return self._send(
            _ADD_SEGMENT_MEMBERS, _add_members(id, emails, create_missing, subscribed)
        )

    def remove_segment_members(
        self, id: str, emails: Iterable[str]
    ) -> segments_pb2.RemoveSegmentMembersResponse:
        """Remove contacts from a STATIC segment by email."""
        return self._send(
            _REMOVE_SEGMENT_MEMBERS,
            segments_pb2.RemoveSegmentMembersRequest(id=id, emails=list(emails)),
        )

    def upsert_contact(
        self, email: str, *, subscribed: bool | None = None, data: Mapping[str, Any] | None = None
    ) -> Contact:
        """Create or update the contact; `data` is merged key by key, a None value removes a key."""
        return self._send(_UPSERT_CONTACT, _upsert_contact(email, subscribed, data))

    def batch_upsert_contacts(
        self, contacts: Iterable[Mapping[str, Any] | contacts_pb2.UpsertContactRequest]
    ) -> contacts_pb2.BatchUpsertContactsResponse:
        """Upsert up to 1000 {email, subscribed?, data?} contacts, all or nothing. Items may
        also be UpsertContactRequest messages (built directly, they skip the JSON parsing)."""
        return self._send(_BATCH_UPSERT_CONTACTS, _batch_upsert(contacts))

    def get_contact(self, id: str) -> Contact:
        """One contact."""
        return self._send(_GET_CONTACT, contacts_pb2.GetContactRequest(id=id))

    def delete_contact(self, id: str) -> None:
        """Delete a contact with its events and memberships."""
        self._send(_DELETE_CONTACT, contacts_pb2.DeleteContactRequest(id=id))

    def update_contact(
        self,
        id: str,
        *,
        email: str | None = None,
        subscribed: bool | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Contact:
        """Change the given fields of a contact and keep the others; `data` is merged key by
        key, a None value removes a key. AlreadyExistsError when `email` is another
        contact's."""
        return self._send(_UPDATE_CONTACT, _update_contact(id, email, subscribed, data))

    def list_contacts(
        self,
        *,
        limit: int = 20,
        cursor: str | None = None,
        search: str = "",
        subscribed: bool | None = None,
    ) -> contacts_pb2.ListContactsResponse:
        """One page (at most 100) of the project's contacts, newest first: those whose email
        contains `search` (any case) and, unless None, whose subscription is `subscribed`.
        Pass `contacts_cursor(page)` as `cursor` for the next page; `total` is counted on
        the first page only."""
        return self._send(_LIST_CONTACTS, _list_contacts(limit, cursor, search, subscribed))

    def iter_contacts(
        self, *, search: str = "", subscribed: bool | None = None, page_size: int = MAX_PAGE_SIZE
    ) -> ContactListPager:
        """Every contact list_contacts selects, fetched page by page as the iteration reaches
        it: `for contact in client.iter_contacts(search="@acme.com"): ...`."""
        size = _page_size(page_size)
        return ContactListPager(
            lambda cursor: self.list_contacts(
                limit=size, cursor=cursor, search=search, subscribed=subscribed
            )
        )

    def list_contact_segments(self, id: str) -> list[contacts_pb2.ContactSegment]:
        """The segments (id, name, type) the contact is a member of now, newest first."""
        request = contacts_pb2.ListContactSegmentsRequest(id=id)
        return list(self._send(_LIST_CONTACT_SEGMENTS, request).segments)

    def track(
        self,
        event: str,
        email: str,
        *,
        subscribed: bool | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> events_pb2.TrackResponse:
        """Record one event for a contact, creating it if needed; needs the PUBLIC key."""
        return self._send(_TRACK, _track(event, email, subscribed, data))

    def ingest_events(
        self, events: Iterable[Mapping[str, Any] | events_pb2.IngestedEvent]
    ) -> events_pb2.IngestEventsResponse:
        """Record up to 1000 {email, event, occurredAt?, data?} events, all or nothing. Items
        may also be IngestedEvent messages (built directly, they skip the JSON parsing)."""
        return self._send(_INGEST_EVENTS, _ingest(events))

    def create_webhook(
        self, url: str, *, segment_ids: Iterable[str] | None = None
    ) -> webhooks_pb2.CreateWebhookResponse:
        """Register `url` for the entry/exit events of `segment_ids` (tracked segments; None:
        all of them). The response holds the signing `secret`, which is never shown again."""
        return self._send(_CREATE_WEBHOOK, _create_webhook(url, segment_ids))

    def list_webhooks(self) -> list[Webhook]:
        """The project's webhooks, newest first (without secrets)."""
        return list(self._send(_LIST_WEBHOOKS, webhooks_pb2.ListWebhooksRequest()).webhooks)

    def get_webhook(self, id: str) -> Webhook:
        """One webhook (without its secret)."""
        return self._send(_GET_WEBHOOK, webhooks_pb2.GetWebhookRequest(id=id))

    def delete_webhook(self, id: str) -> None:
        """Delete a webhook: its deliveries stop within a moment."""
        self._send(_DELETE_WEBHOOK, webhooks_pb2.DeleteWebhookRequest(id=id))

    def list_webhook_deliveries(self, id: str, *, limit: int = 20) -> list[WebhookDelivery]:
        """The webhook's most recent deliveries (at most 100), newest event first."""
        request = webhooks_pb2.ListWebhookDeliveriesRequest(id=id, limit=limit)
        return list(self._send(_LIST_WEBHOOK_DELIVERIES, request).data)

    def _stream(
        self,
        path: str,
        request: Message,
        response: type[_Resp],
        timeout: float | None,
        *,
        ends_at_deadline: bool = False,
        opened: bool = False,
    ) -> Iterator[_Resp]:
        # The call starts here, not at the first next(): "from now on" means now.
        started = time.monotonic()
        call = self._channel.unary_stream(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )(request, metadata=self._metadata, timeout=timeout)
        if opened:
            # The server sends its headers once the stream's start is fixed: after them,
            # nothing written is missed. A refusal comes instead, raised by the first next().
            call.initial_metadata()

        def items() -> Iterator[_Resp]:
            try:
                yield from call
            except grpc.RpcError as err:
                error = _error_from_call(err)
                if not _stream_ended(error, timeout, ends_at_deadline, started):
                    raise error from err
            finally:
                call.cancel()

        return items()

    def watch_segment_events(
        self, *, after: str = "", segment_ids: Sequence[str] = (), timeout: float | None = None
    ) -> Iterator[segments_pb2.SegmentEvent]:
        """Entry/exit events of tracked segments, live, from the moment of this call (or after
        the `cursor` given as `after`, to resume without gaps or repeats); none by default.
        `timeout` (seconds) bounds the stream: when it runs out the iteration simply stops,
        as it does when the stream is cancelled; any other error raises."""
        request = segments_pb2.WatchSegmentEventsRequest(after=after, segment_ids=segment_ids)
        return self._stream(
            _WATCH_PATH,
            request,
            segments_pb2.SegmentEvent,
            timeout,
            ends_at_deadline=True,
            opened=True,
        )

    def export_segment_contacts(
        self, id: str, *, timeout: float | None = None
    ) -> Iterator[Contact]:
        """Every current member of a segment, streamed from one snapshot, in contact id
        order (the server sends them many to a message)."""
        request = segments_pb2.ExportSegmentContactsRequest(id=id)
        batches = self._stream(
            _EXPORT_PATH, request, segments_pb2.ExportSegmentContactsResponse, timeout
        )
        return (contact for batch in batches for contact in batch.contacts)

    def export_segment_csv(self, id: str, out: BytesOut, *, timeout: float | None = None) -> int:
        """Write every current member of a segment to `out` as CSV, as the server streams
        it: the bytes of `GET /segments/{id}/export` (UTF-8, the header row
        `id,email,subscribed,createdAt,updatedAt,data`, then one row per member in contact
        id order, from one snapshot). Returns the number of bytes written. An error raises
        as from any call, also after some rows were written: `out` then holds an incomplete
        CSV, to be discarded."""
        request = segments_pb2.ExportSegmentCsvRequest(id=id)
        written = 0
        for chunk in self._stream(_EXPORT_CSV_PATH, request, httpbody_pb2.HttpBody, timeout):
            out.write(chunk.data)
            written += len(chunk.data)
        return written


class AsyncSegmentsClient(_Client):
    """asyncio client for one API key, with the methods of SegmentsClient as coroutines."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        channel: aio.Channel | None = None,
        retry: Retry = Retry(),
    ) -> None:
        super().__init__(api_key, timeout, owns_channel=channel is None, retry=retry)
        # Create the client inside the event loop that uses it: aio channels are bound to it.
        self._channel: aio.Channel = (
            channel if channel is not None else aio.insecure_channel(target)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            await self._channel.close()

    async def _send(self, rpc: _Rpc[_Req, _Resp], request: _Req) -> _Resp:
        deadline = time.monotonic() + self._timeout
        attempt = 1
        while True:
            try:
                response = await rpc.bind(self._channel)(
                    request,
                    timeout=max(0.0, deadline - time.monotonic()),
                    metadata=self._metadata,
                )
                return rpc.checked(response)
            except aio.AioRpcError as raw:
                err = _error_from_aio(raw)
                delay = self._next_try(rpc, err, attempt, deadline)
                if delay is None:
                    raise err from raw
            await asyncio.sleep(delay)
            attempt += 1

    async def list_segments(self) -> list[Segment]:
        """`SegmentsClient.list_segments` as a coroutine."""
        response = await self._send(_LIST_SEGMENTS, segments_pb2.ListSegmentsRequest())
        return list(response.segments)

    async def create_segment(
        self,
        name: str,
        *,
        condition: Condition | None = None,
        type: str = "DYNAMIC",
        description: str | None = None,
        track_membership: bool | None = None,
    ) -> Segment:
        """`SegmentsClient.create_segment` as a coroutine."""
        return await self._send(
            _CREATE_SEGMENT,
            _create_segment(name, condition, type, description, track_membership),
        )

    async def get_segment(self, id: str) -> Segment:
        """`SegmentsClient.get_segment` as a coroutine."""
        return await self._send(_GET_SEGMENT, segments_pb2.GetSegmentRequest(id=id))

    async def count_matching_contacts(self, condition: Condition) -> int:
        """`SegmentsClient.count_matching_contacts` as a coroutine."""
        request = segments_pb2.CountMatchingContactsRequest(condition=_condition(condition))
        response = await self._send(_COUNT_MATCHING_CONTACTS, request)
        return response.count

    async def preview_segment(self, condition: Condition) -> segments_pb2.PreviewSegmentResponse:
        """`SegmentsClient.preview_segment` as a coroutine."""
        request = segments_pb2.PreviewSegmentRequest(condition=_condition(condition))
        return await self._send(_PREVIEW_SEGMENT, request)

    async def explain_membership(self, segment_id: str, contact_id: str) -> Explanation:
        """`SegmentsClient.explain_membership` as a coroutine."""
        request = segments_pb2.ExplainMembershipRequest(id=segment_id, contact_id=contact_id)
        return Explanation.of(await self._send(_EXPLAIN_MEMBERSHIP, request))

    async def list_segment_events(
        self, segment_id: str, *, after: str = "", limit: int = 0
    ) -> segments_pb2.ListSegmentEventsResponse:
        """`SegmentsClient.list_segment_events` as a coroutine."""
        request = segments_pb2.ListSegmentEventsRequest(id=segment_id, after=after, limit=limit)
        return await self._send(_LIST_SEGMENT_EVENTS, request)

    async def segment_history(
        self,
        segment_id: str,
        *,
        interval: str = "day",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[segments_pb2.SegmentHistoryBucket]:
        """`SegmentsClient.segment_history` as a coroutine."""
        request = _history_request(segment_id, interval, start, end)
        return list((await self._send(_GET_SEGMENT_HISTORY, request)).data)

    async def update_segment(
        self,
        id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        condition: Condition | None = None,
        track_membership: bool | None = None,
    ) -> Segment:
        """`SegmentsClient.update_segment` as a coroutine."""
        return await self._send(
            _UPDATE_SEGMENT,
            _update_segment(id, name, description, condition, track_membership),
        )

    async def delete_segment(self, id: str) -> None:
        """`SegmentsClient.delete_segment` as a coroutine."""
        await self._send(_DELETE_SEGMENT, segments_pb2.DeleteSegmentRequest(id=id))

    async def list_segment_contacts(
        self, id: str, *, page: int = 1, page_size: int = 20
    ) -> segments_pb2.ListSegmentContactsResponse:
        """`SegmentsClient.list_segment_contacts` as a coroutine."""
        return await self._send(
            _LIST_SEGMENT_CONTACTS,
            segments_pb2.ListSegmentContactsRequest(id=id, page=page, page_size=page_size),
        )

    def iter_segment_contacts(
        self, id: str, *, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncContactPager:
        """`SegmentsClient.iter_segment_contacts` as an async iterator."""
        size = _page_size(page_size)
        return AsyncContactPager(
            lambda page: self.list_segment_contacts(id, page=page, page_size=size)
        )

    async def add_segment_members(
        self,
        id: str,
        emails: Iterable[str],
        *,
        create_missing: bool | None = None,
        subscribed: bool | None = None,
    ) -> segments_pb2.AddSegmentMembersResponse:
        """`SegmentsClient.add_segment_members` as a coroutine."""
        return await self._send(
            _ADD_SEGMENT_MEMBERS, _add_members(id, emails, create_missing, subscribed)
        )

    async def remove_segment_members(
        self, id: str, emails: Iterable[str]
    ) -> segments_pb2.RemoveSegmentMembersResponse:
        """`SegmentsClient.remove_segment_members` as a coroutine."""
        return await self._send(
            _REMOVE_SEGMENT_MEMBERS,
            segments_pb2.RemoveSegmentMembersRequest(id=id, emails=list(emails)),
        )

    async def upsert_contact(
        self, email: str, *, subscribed: bool | None = None, data: Mapping[str, Any] | None = None
    ) -> Contact:
        """`SegmentsClient.upsert_contact` as a coroutine."""
        return await self._send(_UPSERT_CONTACT, _upsert_contact(email, subscribed, data))

    async def batch_upsert_contacts(
        self, contacts: Iterable[Mapping[str, Any] | contacts_pb2.UpsertContactRequest]
    ) -> contacts_pb2.BatchUpsertContactsResponse:
        """`SegmentsClient.batch_upsert_contacts` as a coroutine."""
        return await self._send(_BATCH_UPSERT_CONTACTS, _batch_upsert(contacts))

    async def get_contact(self, id: str) -> Contact:
        """`SegmentsClient.get_contact` as a coroutine."""
        return await self._send(_GET_CONTACT, contacts_pb2.GetContactRequest(id=id))

    async def delete_contact(self, id: str) -> None:
        """`SegmentsClient.delete_contact` as a coroutine."""
        await self._send(_DELETE_CONTACT, contacts_pb2.DeleteContactRequest(id=id))

    async def update_contact(
        self,
        id: str,
        *,
        email: str | None = None,
        subscribed: bool | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Contact:
        """`SegmentsClient.update_contact` as a coroutine."""
        return await self._send(_UPDATE_CONTACT, _update_contact(id, email, subscribed, data))

    async def list_contacts(
        self,
        *,
        limit: int = 20,
        cursor: str | None = None,
        search: str = "",
        subscribed: bool | None = None,
    ) -> contacts_pb2.ListContactsResponse:
        """`SegmentsClient.list_contacts` as a coroutine."""
        return await self._send(_LIST_CONTACTS, _list_contacts(limit, cursor, search, subscribed))

    def iter_contacts(
        self, *, search: str = "", subscribed: bool | None = None, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncContactListPager:
        """`SegmentsClient.iter_contacts` as an async iterator."""
        size = _page_size(page_size)
        return AsyncContactListPager(
            lambda cursor: self.list_contacts(
                limit=size, cursor=cursor, search=search, subscribed=subscribed
            )
        )

    async def list_contact_segments(self, id: str) -> list[contacts_pb2.ContactSegment]:
        """`SegmentsClient.list_contact_segments` as a coroutine."""
        request = contacts_pb2.ListContactSegmentsRequest(id=id)
        return list((await self._send(_LIST_CONTACT_SEGMENTS, request)).segments)

    async def track(
        self,
        event: str,
        email: str,
        *,
        subscribed: bool | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> events_pb2.TrackResponse:
        """`SegmentsClient.track` as a coroutine."""
        return await self._send(_TRACK, _track(event, email, subscribed, data))

    async def ingest_events(
        self, events: Iterable[Mapping[str, Any] | events_pb2.IngestedEvent]
    ) -> events_pb2.IngestEventsResponse:
        """`SegmentsClient.ingest_events` as a coroutine."""
        return await self._send(_INGEST_EVENTS, _ingest(events))

    async def create_webhook(
        self, url: str, *, segment_ids: Iterable[str] | None = None
    ) -> webhooks_pb2.CreateWebhookResponse:
        """Register `url` for the entry/exit events of `segment_ids` (tracked segments; None:
        all of them). The response holds the signing `secret`, which is never shown again."""
        return await self._send(_CREATE_WEBHOOK, _create_webhook(url, segment_ids))

    async def list_webhooks(self) -> list[Webhook]:
        """The project's webhooks, newest first (without secrets)."""
        response = await self._send(_LIST_WEBHOOKS, webhooks_pb2.ListWebhooksRequest())
        return list(response.webhooks)

    async def get_webhook(self, id: str) -> Webhook:
        """One webhook (without its secret)."""
        return await self._send(_GET_WEBHOOK, webhooks_pb2.GetWebhookRequest(id=id))

    async def delete_webhook(self, id: str) -> None:
        """Delete a webhook: its deliveries stop within a moment."""
        await self._send(_DELETE_WEBHOOK, webhooks_pb2.DeleteWebhookRequest(id=id))

    async def list_webhook_deliveries(self, id: str, *, limit: int = 20) -> list[WebhookDelivery]:
        """The webhook's most recent deliveries (at most 100), newest event first."""
        request = webhooks_pb2.ListWebhookDeliveriesRequest(id=id, limit=limit)
        return list((await self._send(_LIST_WEBHOOK_DELIVERIES, request)).data)

    def _stream(
        self,
        path: str,
        request: Message,
        response: type[_Resp],
        timeout: float | None,
        *,
        ends_at_deadline: bool = False,
    ) -> AsyncIterator[_Resp]:
        started = time.monotonic()
        call = self._start(path, request, response, timeout)
        return self._items(call, timeout, started, ends_at_deadline=ends_at_deadline, opened=False)

    def _start(
        self, path: str, request: Message, response: type[_Resp], timeout: float | None
    ) -> Any:
        # The call starts here, not at the first iteration: "from now on" means now.
        return self._channel.unary_stream(
            path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )(request, metadata=self._metadata, timeout=timeout)

    async def _items(
        self,
        call: Any,
        timeout: float | None,
        started: float,
        *,
        ends_at_deadline: bool,
        opened: bool,
    ) -> AsyncIterator[Any]:
        try:
            if opened:
                # As in SegmentsClient._stream, awaited at the first iteration.
                await call.initial_metadata()
            async for item in call:
                yield item
        except aio.AioRpcError as err:
            error = _error_from_aio(err)
            if not _stream_ended(error, timeout, ends_at_deadline, started):
                raise error from err
        finally:
            call.cancel()

    def watch_segment_events(
        self, *, after: str = "", segment_ids: Sequence[str] = (), timeout: float | None = None
    ) -> AsyncEventStream:
        """`SegmentsClient.watch_segment_events` as an async iterator (which stops when
        `timeout` runs out). The call starts at once; `await events.opened()` returns once
        the server has fixed the stream's start, from which on nothing written is missed
        (the first iteration waits for that too)."""
        request = segments_pb2.WatchSegmentEventsRequest(after=after, segment_ids=segment_ids)
        started = time.monotonic()
        call = self._start(_WATCH_PATH, request, segments_pb2.SegmentEvent, timeout)
        return AsyncEventStream(
            call, self._items(call, timeout, started, ends_at_deadline=True, opened=True)
        )

    def export_segment_contacts(
        self, id: str, *, timeout: float | None = None
    ) -> AsyncIterator[Contact]:
        """`SegmentsClient.export_segment_contacts` as an async iterator."""
        request = segments_pb2.ExportSegmentContactsRequest(id=id)
        batches = self._stream(
            _EXPORT_PATH, request, segments_pb2.ExportSegmentContactsResponse, timeout
        )

        async def contacts() -> AsyncIterator[Contact]:
            async for batch in batches:
                for contact in batch.contacts:
                    yield contact

        return contacts()

    async def export_segment_csv(
        self, id: str, out: BytesOut, *, timeout: float | None = None
    ) -> int:
        """`SegmentsClient.export_segment_csv` as a coroutine (`out.write` is called on the
        event loop, between chunks)."""
        request = segments_pb2.ExportSegmentCsvRequest(id=id)
        written = 0
        async for chunk in self._stream(_EXPORT_CSV_PATH, request, httpbody_pb2.HttpBody, timeout):
            out.write(chunk.data)
            written += len(chunk.data)
        return written
