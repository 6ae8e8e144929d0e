"""Transfer routing (SPEC §3.6): requested agent, else the least-loaded online agent
with a matching skill and free capacity, else the desk queue."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.agents.models import Agent
from app.sessions.enums import SessionStatus
from app.sessions.models import Session
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer


def agent_loads(db: DbSession, agent_ids: list[str]) -> dict[str, int]:
    """Sessions an agent handles now plus transfers offered to it and not yet accepted."""
    if not agent_ids:
        return {}
    loads = dict.fromkeys(agent_ids, 0)
    handling = db.execute(
        select(Session.assigned_agent_id, func.count())
        .where(
            Session.assigned_agent_id.in_(agent_ids),
            Session.status.in_([SessionStatus.ACTIVE, SessionStatus.TRANSFERRED]),
        )
        .group_by(Session.assigned_agent_id)
    )
    for agent_id, count in handling:
        if agent_id is not None:
            loads[agent_id] += count
    offered = db.execute(
        select(Transfer.offered_agent_id, func.count())
        .where(
            Transfer.offered_agent_id.in_(agent_ids),
            Transfer.status == TransferStatus.PENDING,
        )
        .group_by(Transfer.offered_agent_id)
    )
    for agent_id, count in offered:
        if agent_id is not None:
            loads[agent_id] += count
    return loads


def choose_agent(
    db: DbSession,
    *,
    requested_agent_id: str | None,
    skill: str | None,
    default_capacity: int,
) -> str | None:
    """The agent a transfer is offered to, or None to leave it in the desk queue."""
    if requested_agent_id:
        return requested_agent_id
    agents = db.execute(select(Agent).where(Agent.presence == "online")).scalars().all()
    candidates = [
        a for a in agents if not a.skills or skill is None or skill in (a.skills or [])
    ]
    loads = agent_loads(db, [a.agent_id for a in candidates])
    free = [
        (loads[a.agent_id], a.agent_id)
        for a in candidates
        if loads[a.agent_id] < (a.max_concurrent or default_capacity)
    ]
    return min(free)[1] if free else None
