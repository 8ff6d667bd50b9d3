"""Post rules: small functions, each `(PostContext) -> Decision | None`, run in order.

None means "no opinion". The moderation issue adds size, content,
recipient-threshold and blackout rules here, and appends them to RULES.
"""

from __future__ import annotations

from collections.abc import Callable

from listserv import mail, replies
from listserv.models import PostingPolicy, Role
from listserv.pipeline.context import PostContext
from listserv.pipeline.decision import Action, Decision

Rule = Callable[[PostContext], Decision | None]

#: the roles allowed to post under each policy (None: anyone)
MAY_POST: dict[PostingPolicy, frozenset[Role] | None] = {
    PostingPolicy.ANNOUNCE: frozenset({Role.SENDER, Role.MODERATOR, Role.OWNER}),
    PostingPolicy.MEMBERS: frozenset({Role.MEMBER, Role.SENDER, Role.MODERATOR, Role.OWNER}),
    PostingPolicy.OPEN: None,
}


def check_loop(ctx: PostContext) -> Decision | None:
    """A post that already went through this list is discarded, silently.

    X-BeenThere is the marker: decoration adds one per list and never strips
    another list's, so a post going round two lists subscribed to each other is
    caught the second time it reaches either (List-Id alone is replaced by each).
    """
    address = ctx.mlist.address.lower()
    if address in (a.lower() for a in mail.addresses(ctx.msg, "X-BeenThere")):
        return Decision(Action.DISCARD, (f"loop: the message already went through {address}",))
    list_id = f"<{ctx.mlist.list_id}>"
    value = mail.header(ctx.msg, "List-Id") or ""
    if list_id.lower() in value.lower():
        return Decision(Action.DISCARD, (f"loop: the message already carries List-Id {list_id}",))
    return None


def check_deliverable(ctx: PostContext) -> Decision | None:
    """A post we could not send out as it is gets a 5xx in the dialogue, not 250-then-dropped.

    Without a header section or a From: address (RFC 5322 3.6: From is required)
    the big mailbox providers refuse the message, so every member would bounce it.
    """
    if not ctx.msg.keys():
        why = "it has no header section"
    elif mail.header(ctx.msg, "From") is None:
        why = "it has no From: header"
    elif not mail.addresses(ctx.msg, "From"):
        why = "its From: header holds no address"
    else:
        return None
    reason = f"cannot distribute this message to {ctx.mlist.address}: {why}"
    return Decision(Action.REJECT, (reason,), replies.UNDELIVERABLE.with_text(reason))


def check_sender_allowed(ctx: PostContext) -> Decision | None:
    """Who may post, by the list's posting policy and the sender's roles."""
    allowed = MAY_POST[ctx.mlist.posting_policy]
    if allowed is None or ctx.roles & allowed:
        return None
    if ctx.mlist.posting_policy is PostingPolicy.ANNOUNCE:
        why = "only its authorized senders may post"
    else:
        why = "only its members may post"
    reason = f"{ctx.sender} may not post to {ctx.mlist.address}: {why}"
    return Decision(Action.REJECT, (reason,), replies.NOT_ALLOWED.with_text(reason))


RULES: tuple[Rule, ...] = (check_loop, check_deliverable, check_sender_allowed)
