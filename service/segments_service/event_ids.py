"""Public event ids: each project sees its events' ids through its own keyed permutation.

`events.id` is one sequence shared by every project, so the gaps between one project's
ids would count every other project's events. The API shows instead a 64-bit block
cipher of the id: a six-round Feistel network whose round function is keyed BLAKE2b
(a pseudorandom function), keyed per project by HMAC-SHA256 of the server secret
(table `server_secrets`, migration 0010) and the project id. Distinct ids give distinct
tokens (it is a permutation), and without the secret one project's tokens say nothing
about another's, nor about how far apart its own ids are.

The secret is read once per engine and kept: it never changes, so no request pays a query.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import uuid
import weakref

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

SECRET_NAME = "event_ids"
_ROUNDS = 6
_HALF = 0xFFFFFFFF
_TOKEN = re.compile(r"[0-9a-f]{16}")

_secrets: weakref.WeakKeyDictionary[Engine, bytes] = weakref.WeakKeyDictionary()
_secrets_lock = threading.Lock()


def server_secret(session: Session) -> bytes:
    """The database's event id secret, read on first use and kept per engine."""
    engine = session.get_bind().engine
    with _secrets_lock:
        known = _secrets.get(engine)
    if known is not None:
        return known
    secret: bytes = session.execute(
        text("SELECT secret FROM server_secrets WHERE name = :name"), {"name": SECRET_NAME}
    ).scalar_one()
    with _secrets_lock:
        _secrets[engine] = bytes(secret)
    return bytes(secret)


def project_key(secret: bytes, project_id: uuid.UUID) -> bytes:
    """The key of one project's permutation."""
    return hmac.new(secret, b"event-ids:" + project_id.bytes, hashlib.sha256).digest()


def key_for(session: Session, project_id: uuid.UUID) -> bytes:
    """project_key of the database's secret: no query once the secret is known."""
    return project_key(server_secret(session), project_id)


def _round(key: bytes, n: int, half: int) -> int:
    digest = hashlib.blake2b(
        half.to_bytes(4, "big"), digest_size=4, key=key, person=b"event-id-round" + bytes([n])
    ).digest()
    return int.from_bytes(digest, "big")


def public_event_id(key: bytes, event_id: int) -> str:
    """The token of `event_id` (0 <= id < 2**64) under a project's key: 16 hex digits."""
    if not 0 <= event_id < 1 << 64:
        raise ValueError(f"event id out of range: {event_id}")
    left, right = event_id >> 32, event_id & _HALF
    for n in range(_ROUNDS):
        left, right = right, left ^ _round(key, n, right)
    return f"{left << 32 | right:016x}"


def event_id_of(key: bytes, token: str) -> int | None:
    """The event id a token of this project's stands for, or None if it is not a token."""
    if not _TOKEN.fullmatch(token):
        return None
    value = int(token, 16)
    left, right = value >> 32, value & _HALF
    for n in reversed(range(_ROUNDS)):
        left, right = right ^ _round(key, n, left), left
    return left << 32 | right
