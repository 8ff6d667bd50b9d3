"""Joining and leaving, once decided: the member rows, the audit log, welcome and goodbye.

Both confirmed requests and owners' commands end here, so a member who joined
by mail, by an owner's ``add`` or after an owner's approval gets the same
welcome, and every change is in the audit log (members.add, members.unsubscribe).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from listserv import members
from listserv.models import MailingList, Role
from listserv.subscriptions import mails

log = logging.getLogger("listserv.subscriptions")

#: what the welcome says about leaving (the templates fill $leaving with one of these)
LEAVING = "To leave the list, send a message to {leave}, or write 'unsubscribe' to {request}."
NO_LEAVING = (
    "The list is mandatory: everyone it is meant for receives it, so there is no"
    " unsubscribing from it. Write to {owner} if you think you should not be on it."
)


def is_member(session: Session, mlist: MailingList, address: str) -> bool:
    return Role.MEMBER in members.roles_of(session, mlist, [address])


def join(
    session: Session,
    mlist: MailingList,
    address: str,
    *,
    name: str = "",
    source: str,
    actor: str,
    how: str,
) -> bool:
    """Make `address` a member and welcome it; False when it was one already (no mail).

    A subscriber who confirms (source "subscribe") voids an earlier leaving, so a
    later sync treats them as any member; an owner's ``add`` keeps that record.
    """
    added, _ = members.add(session, mlist, [address], name=name, source=source, actor=actor)
    if source == "subscribe":
        members.forget_unsubscription(session, mlist, address)
    if not added:
        return False
    v = mails.values(mlist)
    leaving = (NO_LEAVING if mlist.mandatory else LEAVING).format(**v)
    mails.send(session, mlist, "welcome", to=added[0], address=added[0], how=how, leaving=leaving)
    log.info(
        "%s joined %s (%s, by %s)",
        added[0],
        mlist.address,
        source,
        actor,
        extra={"event": "member_joined", "list": mlist.address},
    )
    return True


def leave(session: Session, mlist: MailingList, address: str, *, via: str, actor: str = "") -> bool:
    """`address` leaves (recorded, so no sync adds it back) and is told; False when it
    was no member (nothing sent)."""
    if not members.unsubscribe(session, mlist, address, via=via, actor=actor):
        return False
    if via == "owner":
        mails.send(session, mlist, "removed", to=address, address=address, actor=actor)
    else:
        mails.send(session, mlist, "goodbye", to=address, address=address)
    log.info(
        "%s left %s (via %s, by %s)",
        address,
        mlist.address,
        via,
        actor or address,
        extra={"event": "member_left", "list": mlist.address},
    )
    return True
