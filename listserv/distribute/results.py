"""What happened to one recipient: the value senders produce and the queue records.

It lives apart from both, so the SMTP side never imports the queue and the queue
never imports aiosmtplib.
"""

from __future__ import annotations

from dataclasses import dataclass

from listserv.models import RecipientState


@dataclass(frozen=True, slots=True)
class RecipientResult:
    delivery_id: int
    outcome: RecipientState  # DELIVERED, DEFERRED or FAILED
    code: int | None = None
    detail: str = ""
