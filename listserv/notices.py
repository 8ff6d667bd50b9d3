"""Mail the server writes itself (held-post notices, moderators' requests, replies to
commands): composed from the templates in listserv/templates/, then queued like a
post (audience `notice`), so it is stored durably, DKIM-signed with the list's
domain, retried and recorded per recipient like any other mail.

`may_answer` holds the rules for writing back to someone (RFC 3834 section 2):
never to an empty envelope sender, never to mail marked auto-submitted or sent
by a list or a bulk mailer, so two robots cannot answer each other for ever.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from importlib import resources

from sqlalchemy.orm import Session

from listserv import addresses, mail
from listserv.addresses import Kind
from listserv.models import Audience, MailingList, Post, PostState

#: Precedence values of mail no robot should answer (RFC 3834 section 2; RFC 2076)
_NO_ANSWER_PRECEDENCE = frozenset({"bulk", "list", "junk"})


def template(name: str, **values: object) -> str:
    """The text of listserv/templates/NAME.txt with $fields filled in.

    A field the template names but `values` lacks stays as written, so an edited
    template with a typo still goes out rather than failing the notice.
    """
    text = (resources.files("listserv") / "templates" / f"{name}.txt").read_text("utf-8")
    return string.Template(text).safe_substitute({k: str(v) for k, v in values.items()})


def may_answer(mail_from: str, msg: EmailMessage | None) -> bool:
    """Whether an automatic answer to this mail is allowed at all (RFC 3834)."""
    if not mail_from or mail_from == "<>":
        return False
    if msg is None:
        return True
    auto = (mail.header(msg, "Auto-Submitted") or "no").split(";")[0].strip().lower()
    if auto != "no":
        return False
    if (mail.header(msg, "Precedence") or "").strip().lower() in _NO_ANSWER_PRECEDENCE:
        return False
    return not any(mail.header(msg, h) is not None for h in ("List-Id", "List-Unsubscribe"))


def compose(
    mlist: MailingList,
    *,
    to: str,
    subject: str,
    body: str,
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    attach: bytes | None = None,
    auto: str = "auto-generated",
) -> EmailMessage:
    """A notice from the list's owner address: plain text, the original attached
    as message/rfc822 when given."""
    msg = EmailMessage(policy=mail.POLICY)
    msg["From"] = addresses.build(mlist.local_part, mlist.domain, Kind.OWNER)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=mlist.domain)
    msg["Auto-Submitted"] = auto  # RFC 3834: answering robots leave it alone
    msg["Precedence"] = "list"
    if reply_to:
        msg["Reply-To"] = reply_to
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    if attach is not None:
        msg.add_attachment(mail.parse(attach))  # message/rfc822, its folding kept
    return msg


def queue(session: Session, mlist: MailingList, msg: EmailMessage, to: Sequence[str]) -> int | None:
    """Store the notice for delivery to `to`; returns its post id (None: nobody to tell).

    The scheduler signs and sends it like any accepted post.
    """
    recipients = list(dict.fromkeys(a for a in to if a))
    if not recipients:
        return None
    post = Post(
        list_id=mlist.id,
        inbound_id=None,
        state=PostState.ACCEPTED,
        audience=Audience.NOTICE,
        sender=addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        subject=(mail.header(msg, "Subject") or "")[:998],
        message_id=(mail.header(msg, "Message-ID") or "")[:998],
        notice_to=recipients,
        prepared=mail.to_bytes(msg),
    )
    session.add(post)
    session.flush()
    return post.id
