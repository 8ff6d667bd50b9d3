"""SMTP replies we send, each with its RFC 3463 enhanced status code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


RCPT_OK = Reply(250, "2.1.5", "OK")
QUEUED = Reply(250, "2.0.0", "Queued")
NO_SUCH_LIST = Reply(550, "5.1.1", "No such list here")
RELAY_DENIED = Reply(550, "5.1.1", "Relaying denied: we only accept mail for our lists")
NOT_ALLOWED = Reply(550, "5.7.1", "You are not allowed to post to this list")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long: at most 1000 characters (RFC 5321 4.5.3.1.6)")
TOO_BIG = Reply(552, "5.3.4", "Message too big for this list server")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
