"""Phase 6: the cost of one sweep of time-dependent segments (informational)."""

from __future__ import annotations

import uuid
from typing import Any

from bench.context import Env
from bench.measure import timed
from segments_service import sweeper


def sweep_cost(env: Env) -> dict[str, Any]:
    """One sweeper pass over the main project (the read-only statement every replica runs
    every SEGMENTS_SWEEP_SECONDS): how long, and how many contacts it found stale."""
    main = env.dataset.project("main")
    with env.sessions() as session:
        ms, stale = timed(lambda: sweeper.stale_contacts(session, uuid.UUID(main.id)))
        session.rollback()
    return {"project": "main", "seconds": round(ms / 1000, 2), "stale_contacts": len(stale)}
