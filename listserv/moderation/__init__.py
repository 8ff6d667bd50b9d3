"""Held posts and their moderation, by e-mail reply or from the CLI.

A post the rules hold (state ``held``) is announced once by the daemon's
moderation task (`task.py`): its sender is told it waits, and every moderator
and owner gets a notice with the original attached and ``Reply-To:
NAME-confirm+TOKEN@``. A reply there (stored by intake as ``confirm`` mail) is
read by `replies.py`; its verdict, or one from ``listserv held``, is carried out
by `holds.decide`, the one function that approves, rejects and discards.
Holds nobody decides expire after the list's ``hold_expiry_days``; moderators
get at most one reminder a day per list.

    verdicts.py  parse "approve", "approve at WHEN", "reject [reason]", "discard"
    holds.py     storage verbs: list, show, announce, decide, expire, remind
    replies.py   process stored confirm mail: check token, sender, verdict
    task.py      the daemon's periodic loop
"""

from __future__ import annotations
