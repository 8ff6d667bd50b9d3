"""The mail subscriptions send: composed from listserv/templates/, queued as notices.

Every text a subscriber or an owner reads (confirmation requests, welcome,
goodbye, refusals, the answer to a command) is a template whose first line is
``Subject: ...``, so a site edits the wording without touching code. Every
template may use $list, $description, $about (" (DESCRIPTION)" or nothing),
$owner, $request, $join and $leave, besides its own values; a template that
names one it was not given keeps the ``$field`` as written (notices.template).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from listserv import addresses, notices
from listserv.addresses import Kind
from listserv.models import MailingList
from listserv.moderation.holds import render


def values(mlist: MailingList, **extra: object) -> dict[str, object]:
    """The list's addresses and description, and `extra`, for any template."""
    name, domain = mlist.local_part, mlist.domain
    base: dict[str, object] = {
        "list": mlist.address,
        "description": mlist.description,
        "about": f" ({mlist.description})" if mlist.description else "",
        "owner": addresses.build(name, domain, Kind.OWNER),
        "request": addresses.build(name, domain, Kind.REQUEST),
        "join": addresses.build(name, domain, Kind.JOIN),
        "leave": addresses.build(name, domain, Kind.LEAVE),
    }
    return base | extra


def send(
    session: Session,
    mlist: MailingList,
    template: str,
    *,
    to: str,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    **extra: object,
) -> None:
    """Queue the notice `template` to `to` (stored now, sent by the scheduler)."""
    subject, body = render(template, **values(mlist, **extra))
    msg = notices.compose(
        mlist, to=to, subject=subject, body=body, reply_to=reply_to, in_reply_to=in_reply_to
    )
    notices.queue(session, mlist, msg, [to])


def body(mlist: MailingList, template: str, **extra: object) -> str:
    """A template's text without its Subject line (a refusal quoted in a command's answer)."""
    return render(template, **values(mlist, **extra))[1].strip()


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
