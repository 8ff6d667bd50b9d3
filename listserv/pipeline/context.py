"""What the post rules look at: one typed value instead of a loose dict."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

from listserv.models import MailingList, Role


@dataclass(frozen=True, slots=True)
class PostContext:
    mlist: MailingList
    msg: EmailMessage
    size: int
    mail_from: str
    #: who the post is from: the From: addresses, then the envelope sender
    senders: tuple[str, ...]
    #: every role those addresses hold on the list
    roles: frozenset[Role]

    @property
    def sender(self) -> str:
        return self.senders[0] if self.senders else "<>"
