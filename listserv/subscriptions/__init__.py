"""Subscribing and unsubscribing by e-mail, with double opt-in, and owners' commands.

Mail to NAME-request@ (commands), NAME-join@ and NAME-leave@ is stored by intake
and read here by the daemon's subscriptions task; joining and leaving go through
a confirmation mailed to the address concerned (``Reply-To:
NAME-confirm+TOKEN@``), whose reply the moderation loop hands to `confirm`.
A list's ``subscription_policy`` says who may join: ``open`` (confirmation),
``approve`` (confirmation, then an owner's approval), ``closed`` (owners and
the CLI only); a ``mandatory`` list refuses every request to leave.

    commands.py    read the commands of a message (Subject, first own lines)
    requests.py    process stored request/join/leave mail, answer it
    confirm.py     confirmation tokens: ask (one pending, hourly limit), carry out
    membership.py  join and leave once decided: rows, audit, welcome and goodbye
    mails.py       compose the mail from listserv/templates/, queue it
    task.py        the daemon's periodic loop
"""

from __future__ import annotations
