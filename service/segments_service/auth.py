"""API keys: generation, hashed storage, and resolving a bearer key to its project."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from segments_service import tables
from segments_service.errors import FailedPrecondition, InvalidApiKey, MissingAuth, NotFound

KeyKind = Literal["secret", "public"]
PREFIX: dict[KeyKind, str] = {"secret": "sk_", "public": "pk_"}


def hash_key(key: str) -> bytes:
    """Keys are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(key.encode()).digest()


def new_key(kind: KeyKind) -> str:
    return PREFIX[kind] + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """The authenticated project of a request."""

    project_id: uuid.UUID
    key_kind: KeyKind


def bearer_token(authorization: str | None) -> str:
    """The key of an `Authorization: Bearer <key>` header; MissingAuth when the header is
    absent or not of that form (nothing is looked up)."""
    if not authorization:
        raise MissingAuth("Authorization header is required: `Authorization: Bearer <key>`")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise MissingAuth("Authorization header must be `Bearer <key>`")
    return token


def authenticate(session: Session, token: str, kind: KeyKind) -> Caller:
    """Resolve a bearer key (`bearer_token`'s); it must exist, be live and be of `kind`."""
    wanted = PREFIX[kind]
    if not token.startswith(("sk_", "pk_")):
        raise InvalidApiKey("Invalid API key")
    digest = hash_key(token)
    k = tables.api_keys.c
    row = session.execute(
        select(k.project_id, k.kind, k.key_hash).where(k.key_hash == digest, k.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise InvalidApiKey("Invalid API key")
    if row.kind != kind:
        label = "secret key (sk_*)" if kind == "secret" else "public key (pk_*)"
        raise InvalidApiKey(f"This endpoint requires a {label}, not a key starting {token[:3]}")
    assert token.startswith(wanted)
    return Caller(project_id=row.project_id, key_kind=kind)


def create_project(session: Session, name: str) -> dict[str, str]:
    """A new project with one secret and one public key; the keys are shown only here."""
    p = tables.projects.c
    project_id = session.execute(
        insert(tables.projects).values(name=name).returning(p.id)
    ).scalar_one()
    keys = {kind: issue_key(session, project_id, kind) for kind in ("secret", "public")}
    return {"id": str(project_id), "secretKey": keys["secret"], "publicKey": keys["public"]}


def issue_key(session: Session, project_id: uuid.UUID, kind: KeyKind) -> str:
    key = new_key(kind)
    session.execute(
        insert(tables.api_keys).values(
            project_id=project_id, kind=kind, key_hash=hash_key(key), key_prefix=key[:7]
        )
    )
    return key


def revoke_key(session: Session, key: str) -> uuid.UUID:
    """Revoke one key; answers its project id."""
    k = tables.api_keys.c
    project_id = session.execute(
        update(tables.api_keys)
        .where(k.key_hash == hash_key(key), k.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(k.project_id)
    ).scalar_one_or_none()
    if project_id is None:
        raise NotFound("no live key matches")
    return uuid.UUID(str(project_id))


def rotate_key(session: Session, key: str) -> str:
    """Revoke `key` and issue a new key of the same kind for the same project."""
    kind: KeyKind = "secret" if key.startswith("sk_") else "public"
    project_id = revoke_key(session, key)
    return issue_key(session, project_id, kind)


@dataclass(frozen=True)
class Project:
    id: uuid.UUID
    name: str
    created_at: datetime


@dataclass(frozen=True)
class KeyInfo:
    """What is known of a stored key: never the key itself, only its first characters."""

    id: uuid.UUID
    kind: KeyKind
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def list_projects(session: Session) -> list[Project]:
    """Every project, oldest first."""
    p = tables.projects.c
    rows = session.execute(select(p.id, p.name, p.created_at).order_by(p.created_at, p.id))
    return [Project(row.id, row.name, row.created_at) for row in rows]


def find_project(session: Session, ref: str) -> Project:
    """The project whose id is `ref`, else the one named exactly `ref`; NotFound when none
    is, FailedPrecondition when several projects share that name."""
    p = tables.projects.c
    query = select(p.id, p.name, p.created_at)
    try:
        by_id = session.execute(query.where(p.id == uuid.UUID(ref.strip()))).first()
    except ValueError:
        by_id = None
    if by_id is not None:
        return Project(by_id.id, by_id.name, by_id.created_at)
    named = session.execute(query.where(p.name == ref.strip()).order_by(p.created_at)).all()
    if not named:
        raise NotFound(f"no project has the id or name {ref!r}")
    if len(named) > 1:
        ids = ", ".join(str(row.id) for row in named)
        raise FailedPrecondition(f"{len(named)} projects are named {ref!r}; use an id: {ids}")
    (row,) = named
    return Project(row.id, row.name, row.created_at)


def list_keys(session: Session, project_id: uuid.UUID) -> list[KeyInfo]:
    """The project's keys, live and revoked, oldest first (of keys made together, as a
    project's first two are, the secret one first)."""
    k = tables.api_keys.c
    rows = session.execute(
        select(k.id, k.kind, k.key_prefix, k.created_at, k.revoked_at)
        .where(k.project_id == project_id)
        .order_by(k.created_at, k.kind.desc(), k.id)
    )
    return [KeyInfo(r.id, r.kind, r.key_prefix, r.created_at, r.revoked_at) for r in rows]


def revoke_key_by_id(session: Session, key_id: uuid.UUID) -> uuid.UUID:
    """Revoke the live key with this id (as `list_keys` shows it; for a key that is lost);
    answers its project id."""
    k = tables.api_keys.c
    project_id = session.execute(
        update(tables.api_keys)
        .where(k.id == key_id, k.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(k.project_id)
    ).scalar_one_or_none()
    if project_id is None:
        raise NotFound("no live key matches")
    return uuid.UUID(str(project_id))
