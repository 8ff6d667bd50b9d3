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


MAIL_OK = Reply(250, "2.1.0", "OK")
RCPT_OK = Reply(250, "2.1.5", "OK")
#: "Queued as N": N is the post id that `listserv queue status` shows
QUEUED = Reply(250, "2.0.0", "Queued")
#: mail that makes no post (commands, bounces): "Stored as N for processing", N the inbound id
STORED = Reply(250, "2.0.0", "Stored")
NO_SUCH_LIST = Reply(550, "5.1.1", "No such list here")
RELAY_DENIED = Reply(550, "5.1.1", "Relaying denied: we only accept mail for our lists")
NOT_ALLOWED = Reply(550, "5.7.1", "You are not allowed to post to this list")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long: at most 1000 characters (RFC 5321 4.5.3.1.6)")
TOO_BIG = Reply(552, "5.3.4", "Message too big for this list server")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
# Permanent: a retry of the same bytes can never succeed, so a 4xx would only make
# the sending MTA try again for days (RFC 3463: X.1.7 sender, X.1.3 recipient syntax).
BAD_SENDER = Reply(553, "5.1.7", "Sender address is not valid UTF-8")
BAD_RECIPIENT = Reply(553, "5.1.3", "Recipient address is not valid UTF-8")
#: RFC 5321 4.5.3.1.10: the client sends the rest in another transaction
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients in one transaction")
#: a post that cannot go out as it is (no header section, no From: address)
UNDELIVERABLE = Reply(550, "5.6.0", "This message cannot be distributed as it is")

# 421: we close the connection after saying it (RFC 5321 3.8); the client tries again.
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Too many commands in one session, closing")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout receiving the message, closing")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached, closing")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
