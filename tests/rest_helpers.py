"""Assertions and small helpers shared by the REST contract tests (docs/api.md, docs/errors.md)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

# cond and flt live in tests.conditions; the strict-JSON tests take them from here too.
from tests.conditions import cond as cond
from tests.conditions import flt as flt
from tests.conftest import Project, Response, Rest

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")

SEGMENT_KEYS = {
    "id",
    "name",
    "description",
    "type",
    "condition",
    "trackMembership",
    "memberCount",
    "projectId",
    "createdAt",
    "updatedAt",
    "status",
    "statusReason",
}
CONTACT_KEYS = {"id", "email", "subscribed", "data", "createdAt", "updatedAt"}
ERROR_KEYS = {"code", "message", "statusCode", "requestId"}


def parse_time(value: Any) -> datetime:
    """An RFC 3339 UTC timestamp as the API prints it."""
    assert isinstance(value, str) and RFC3339_UTC.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def check_segment(body: Any, project: Project | None = None) -> dict[str, Any]:
    """The exact Segment shape of docs/api.md."""
    assert isinstance(body, dict), body
    assert set(body) == SEGMENT_KEYS, sorted(body)
    assert is_uuid(body["id"])
    assert isinstance(body["name"], str) and 1 <= len(body["name"]) <= 100
    assert body["description"] is None or isinstance(body["description"], str)
    assert body["status"] in ("READY", "BUILDING", "FAILED")
    assert (body["statusReason"] is None) == (body["status"] != "FAILED")
    assert body["type"] in ("DYNAMIC", "STATIC")
    if body["type"] == "STATIC":
        assert body["condition"] is None
    else:
        assert isinstance(body["condition"], dict)
    assert isinstance(body["trackMembership"], bool)
    count = body["memberCount"]
    assert isinstance(count, int) and not isinstance(count, bool) and count >= 0, count
    assert is_uuid(body["projectId"])
    if project is not None:
        assert body["projectId"] == project.id
    assert parse_time(body["updatedAt"]) >= parse_time(body["createdAt"])
    return body


def check_contact(body: Any) -> dict[str, Any]:
    """The exact Contact shape of docs/api.md."""
    assert isinstance(body, dict), body
    assert set(body) == CONTACT_KEYS, sorted(body)
    assert is_uuid(body["id"])
    assert isinstance(body["email"], str)
    assert body["email"] == body["email"].strip().lower()
    assert isinstance(body["subscribed"], bool)
    assert isinstance(body["data"], dict)
    assert parse_time(body["updatedAt"]) >= parse_time(body["createdAt"])
    return body


def check_error(resp: Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """The one error envelope of docs/errors.md, with this HTTP status and code; `field`, when
    given, must be named by one of the `errors` entries. Answers the `error` object."""
    assert resp.status == status, (resp.status, resp.raw[:500])
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json
    assert isinstance(body, dict) and set(body) == {"success", "error", "timestamp"}, body
    assert body["success"] is False
    parse_time(body["timestamp"])
    err = body["error"]
    assert ERROR_KEYS <= set(err) <= ERROR_KEYS | {"errors"}, err
    assert err["code"] == code, err
    assert err["statusCode"] == status and isinstance(err["statusCode"], int), err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["requestId"], str) and err["requestId"], err
    # The request id the caller can quote is the one echoed in the response header.
    assert err["requestId"] == resp.headers.get("x-request-id"), (err, resp.headers)
    if "errors" in err:
        assert isinstance(err["errors"], list) and err["errors"], err
        for item in err["errors"]:
            assert set(item) == {"field", "message", "code"}, item
            assert all(isinstance(v, str) for v in item.values()), item
    if field is not None:
        fields = [e["field"] for e in err.get("errors", [])]
        assert field in fields, (field, err)
    return dict(err)


def error_fields(resp: Response) -> list[str]:
    return [e["field"] for e in resp.json["error"].get("errors", [])]


class Api:
    """One project's view of the REST surface, asserting the success status of each call."""

    def __init__(self, rest: Rest, project: Project) -> None:
        self.rest = rest
        self.project = project
        self.key = project.secret_key

    def create_segment(self, name: str = "Segment", condition: Any = None, **extra: Any) -> Any:
        body: dict[str, Any] = {"name": name, **extra}
        if condition is not None:
            body["condition"] = condition
        resp = self.rest.post("/segments", body, key=self.key)
        assert resp.status == 201, resp.raw[:500]
        return check_segment(resp.json, self.project)

    def static_segment(self, name: str = "List") -> Any:
        return self.create_segment(name, type="STATIC")

    def segment(self, segment_id: str) -> Any:
        resp = self.rest.get(f"/segments/{segment_id}", key=self.key)
        assert resp.status == 200, resp.raw[:500]
        return check_segment(resp.json, self.project)

    def patch_segment(self, segment_id: str, body: dict[str, Any]) -> Any:
        resp = self.rest.patch(f"/segments/{segment_id}", body, key=self.key)
        assert resp.status == 200, resp.raw[:500]
        return check_segment(resp.json, self.project)

    def upsert(self, email: str, data: dict[str, Any] | None = None, **extra: Any) -> Any:
        body: dict[str, Any] = {"email": email, **extra}
        if data is not None:
            body["data"] = data
        resp = self.rest.post("/contacts", body, key=self.key)
        assert resp.status in (200, 201), resp.raw[:500]
        return check_contact(resp.json)

    def batch(self, contacts: list[dict[str, Any]]) -> Any:
        resp = self.rest.post("/contacts/batch", {"contacts": contacts}, key=self.key)
        assert resp.status == 200, resp.raw[:500]
        return resp.json

    def events(self, events: list[dict[str, Any]]) -> Any:
        resp = self.rest.post("/events/batch", {"events": events}, key=self.key)
        assert resp.status == 200, resp.raw[:500]
        assert resp.json == {"accepted": len(events)}
        return resp.json

    def add(self, segment_id: str, emails: list[str], **extra: Any) -> Any:
        resp = self.rest.post(
            f"/segments/{segment_id}/members", {"emails": emails, **extra}, key=self.key
        )
        assert resp.status == 200, resp.raw[:500]
        return resp.json

    def page(self, segment_id: str, query: str = "") -> Any:
        resp = self.rest.get(f"/segments/{segment_id}/contacts{query}", key=self.key)
        assert resp.status == 200, resp.raw[:500]
        body = resp.json
        assert set(body) == {"data", "total", "page", "pageSize", "totalPages"}, body
        for contact in body["data"]:
            check_contact(contact)
        return body

    def members(self, segment_id: str) -> list[str]:
        """Emails of every member, in listing order; also checks count == listing."""
        emails: list[str] = []
        page = 1
        while True:
            body = self.page(segment_id, f"?page={page}&pageSize=100")
            emails += [c["email"] for c in body["data"]]
            if page >= body["totalPages"]:
                break
            page += 1
        assert body["total"] == len(emails)
        assert self.segment(segment_id)["memberCount"] == len(emails)
        return emails

    def member_set(self, segment_id: str) -> set[str]:
        return set(self.members(segment_id))
