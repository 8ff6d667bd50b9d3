"""The outcome of the post rules. Decisions are values, not exceptions."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from listserv.replies import Reply


class Action(enum.StrEnum):
    ACCEPT = "accept"
    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reasons: tuple[str, ...] = ()
    #: the SMTP reply for a rejection (550 5.7.1 with the reason)
    reply: Reply | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


ACCEPT = Decision(Action.ACCEPT)
