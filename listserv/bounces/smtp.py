"""Synchronous bounces: what our own delivery was refused, recorded with its results.

`batches.record` calls `record` in the transaction that writes the outcomes, so a
result and its bounce commit together. A 5xx to RCPT or DATA is a permanent bounce
of that recipient; a recipient still deferred (4xx) when the retry schedule gives
up is one permanent bounce too. Not the recipient's doing, so not counted: a
refused MAIL FROM, a smarthost without SMTPUTF8, a give-up after connection
failures only (no reply from anyone), and any mail that is not a members' post
(notices, mail forwarded to the owners).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv.bounces import score
from listserv.models import Audience, BounceKind, MailingList, Post

#: details sender.py gives failures that are the smarthost's or ours, not the recipient's
NOT_THE_RECIPIENT = ("MAIL FROM refused", "smarthost lacks SMTPUTF8")
SOURCE = "smtp"


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient of one post that failed in delivery."""

    post_id: int
    address: str
    code: int | None
    detail: str
    gave_up: bool = False  # deferred until the retry schedule gave up


def counts(failure: Failure) -> bool:
    """Whether this failure is the recipient's bounce."""
    if failure.code is None or failure.detail.startswith(NOT_THE_RECIPIENT):
        return False
    if failure.gave_up:
        return 400 <= failure.code < 500
    return 500 <= failure.code < 600


def record(session: Session, failures: Sequence[Failure], *, now: datetime) -> int:
    """Score the failures of members' posts; returns how many were members' bounces."""
    wanted = [f for f in failures if counts(f)]
    if not wanted:
        return 0
    rows = session.execute(
        sa.select(Post.id, Post.list_id).where(
            Post.id.in_({f.post_id for f in wanted}), Post.audience == Audience.MEMBERS
        )
    ).all()
    list_of = {post_id: list_id for post_id, list_id in rows}
    recorded = 0
    for failure in wanted:
        list_id = list_of.get(failure.post_id)
        mlist = session.get(MailingList, list_id) if list_id is not None else None
        if mlist is None:
            continue
        scored = score.register(
            session,
            mlist,
            failure.address,
            BounceKind.PERMANENT,
            now=now,
            source=SOURCE,
            post_id=failure.post_id,
            status=str(failure.code),
            detail=f"{failure.code} {failure.detail}".strip(),
        )
        recorded += scored is not None
    return recorded
