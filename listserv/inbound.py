"""Stored inbound mail waiting for a task (confirm replies, requests, bounces):
find it, claim it, mark it failed. One implementation for every task that reads
`inbound_messages`, so they claim the same way and two daemons never both take
a message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.addresses import Kind
from listserv.db import Database
from listserv.models import InboundMessage, InboundState

#: rows read per round
BATCH = 50


def pending(db: Database, kinds: Iterable[Kind], *, limit: int = BATCH) -> list[int]:
    """Ids of stored mail of these kinds still pending, oldest first."""
    with db.reading() as session:
        return list(
            session.scalars(
                sa.select(InboundMessage.id)
                .where(
                    InboundMessage.kind.in_([k.value for k in kinds]),
                    InboundMessage.state == InboundState.PENDING,
                )
                .order_by(InboundMessage.id)
                .limit(limit)
            )
        )


def claim(session: Session, inbound_id: int) -> InboundMessage | None:
    """The message, marked done by one conditional UPDATE; None when another daemon
    claimed it first (or it is no longer pending). It is done whatever follows: a
    failure marks it failed in the same transaction."""
    claimed = session.execute(
        sa.update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.state == InboundState.PENDING)
        .values(state=InboundState.DONE)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    inbound = session.get_one(InboundMessage, inbound_id)
    session.refresh(inbound)
    return inbound


def mark_failed(
    session: Session, inbound_id: int, reason: str, *, log: logging.Logger, what: str, event: str
) -> None:
    """Keep the message as failed (for the operator) and log why, in the task's own
    logger, as "`what` failed" with the log event `event`."""
    session.execute(
        sa.update(InboundMessage)
        .where(InboundMessage.id == inbound_id)
        .values(state=InboundState.FAILED)
        .execution_options(synchronize_session=False)
    )
    log.warning(
        "inbound %d: %s failed: %s",
        inbound_id,
        what,
        reason,
        extra={"event": event, "inbound_id": inbound_id},
    )
