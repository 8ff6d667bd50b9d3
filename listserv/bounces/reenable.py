"""A member disabled for bounces turns delivery back on by replying to the notice.

The notice's Reply-To is NAME-confirm+TOKEN@ with a REENABLE token (score.warn);
moderation/replies.py routes confirm mail here first. The token is the proof: it
went only to the member's address. A token that is no REENABLE token of this list
is not ours (None: the caller goes on); anything else gets one short answer.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session

from listserv import addresses, tokens
from listserv.addresses import Kind
from listserv.bounces import score
from listserv.models import MailingList, TokenKind
from listserv.moderation import holds

log = logging.getLogger("listserv.bounces")


def handle(
    session: Session,
    mlist: MailingList,
    raw_token: str,
    *,
    sender: str,
    rcpt: str,
    in_reply_to: str | None,
    now: datetime,
) -> int | None:
    """Carry out a re-enable reply; returns the notices queued, or None when the token
    is not a re-enable token of `mlist`."""
    token = tokens.look_up(session, raw_token, TokenKind.REENABLE)
    if token is None or token.list_id != mlist.id:
        return None
    owner = addresses.build(mlist.local_part, mlist.domain, Kind.OWNER)

    def refuse(problem: str) -> int:
        log.info("re-enable reply from %s to %s refused: %s", sender, mlist.address, problem)
        holds.reply(
            session,
            mlist,
            "bounce_reenable_refused",
            to=sender,
            in_reply_to=in_reply_to,
            address=rcpt,
            problem=problem,
            owner=owner,
        )
        return 1

    if tokens.is_expired(token, now):
        return refuse("this notice's address has expired")
    if token.used_at is not None:
        return refuse("this notice's address was used already")
    rows = score.member_rows(session, mlist, token.address, lock=True)
    if not rows:
        return refuse(f"{token.address} is no longer a member of {mlist.address}")
    if not tokens.consume(session, token.id, now=now):
        return refuse("this notice's address was used already")
    score.reset(
        session, mlist, token.address, actor=sender or token.address, action="bounces.reenable"
    )
    log.info("%s re-enabled delivery from %s by reply", token.address, mlist.address)
    holds.reply(
        session,
        mlist,
        "bounce_reenabled",
        to=rows[0].address,
        in_reply_to=in_reply_to,
        address=rows[0].address,
        owner=owner,
    )
    return 1
