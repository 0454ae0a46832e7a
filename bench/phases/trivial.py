"""Phase 1: the per-request cost of the stack, GetContact over gRPC and REST."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from bench.context import Env, Stack, md
from bench.measure import summary, timed
from segments_api.v1 import contacts_pb2


def trivial(env: Env, stack: Stack, runs: int) -> dict[str, Any]:
    """GetContact: authenticate, read one row by primary key, answer."""
    main = env.dataset.project("main")
    with env.engine.connect() as conn:
        contact_id = str(
            conn.execute(
                text("SELECT id FROM contacts WHERE project_id = :p ORDER BY id LIMIT 1"),
                {"p": main.id},
            ).scalar_one()
        )
    key = env.keys["main"]
    rest = stack.rest(key)
    request = contacts_pb2.GetContactRequest(id=contact_id)
    grpc_ms: list[float] = []
    rest_ms: list[float] = []
    for i in range(runs + 20):
        g, _ = timed(lambda: stack.server.contacts.GetContact(request, metadata=md(key)))
        r, _ = timed(lambda: rest.get(f"/contacts/{contact_id}"))
        if i >= 20:
            grpc_ms.append(g)
            rest_ms.append(r)
    rest.close()
    return {
        "rpc": "GetContact / GET /contacts/{id}",
        "contact_id": contact_id,
        "grpc_ms": summary(grpc_ms),
        "rest_ms": summary(rest_ms),
    }
