"""Post rules: small functions, each `(PostContext) -> Decision | None`, run in order.

None means "no opinion". Reject and discard end the run; hold reasons accumulate
so a moderator sees every reason at once (decide.py). Reasons are written for
people: they reach the poster in the 550 text and the moderator in the hold.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from urllib.parse import urlsplit

from listserv import config, mail, replies
from listserv.distribute import convert
from listserv.models import (
    ContentFilter,
    LinkPolicy,
    MailingList,
    ModerationAction,
    NonmemberAction,
    PostingPolicy,
)
from listserv.pipeline.context import PostContext, nonmember_action
from listserv.pipeline.decision import Action, Decision

log = logging.getLogger("listserv.rules")

Rule = Callable[[PostContext], Decision | None]


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
    elif "From" not in ctx.msg:  # by name: no header parse just to see it is there
        why = "it has no From: header"
    elif not mail.addresses(ctx.msg, "From"):
        why = "its From: header holds no address"
    else:
        return None
    reason = f"cannot distribute this message to {ctx.mlist.address}: {why}"
    return Decision(Action.REJECT, (reason,), replies.UNDELIVERABLE.with_text(reason))


def check_authenticated(ctx: PostContext) -> Decision | None:
    """With require_authenticated_sender, an allowed poster's mail must prove its domain.

    Held rather than refused: a forwarder can break DKIM on a real member's post,
    and a moderator can tell; a stranger's post goes on to the nonmember action.
    """
    poster = ctx.poster
    if not poster.unauthenticated:
        return None
    domains = sorted({a.rpartition("@")[2].lower() for a in poster.addresses})
    return Decision(
        Action.HOLD,
        (f"sender not authenticated: no DKIM or DMARC pass for {', '.join(domains)}",),
    )


def check_sender_allowed(ctx: PostContext) -> Decision | None:
    """Who may post: every From: address (or a standing-in Sender:) by policy and roles;
    an address's own moderation action overrides the list's default for it."""
    poster = ctx.poster
    address = ctx.mlist.address
    if poster.authorized or poster.unauthenticated:
        return _own_action(poster.action, poster.name, address)
    denied = [a for a in ctx.from_addresses if not ctx.may_post(a)] or list(poster.addresses)
    if ctx.mlist.posting_policy is PostingPolicy.ANNOUNCE:
        why = "only its authorized senders may post"
    else:
        why = "only its members may post"
    reason = f"{', '.join(denied) or '<>'} may not post to {address}: {why}"
    action = nonmember_action(ctx.mlist)
    if action is NonmemberAction.HOLD:
        return Decision(Action.HOLD, (reason,))
    if action is NonmemberAction.DISCARD:
        return Decision(Action.DISCARD, (reason,))
    return Decision(Action.REJECT, (reason,), replies.NOT_ALLOWED.with_text(reason))


def _own_action(action: ModerationAction | None, who: str, address: str) -> Decision | None:
    if action is None or action is ModerationAction.ACCEPT:
        return None
    if action is ModerationAction.HOLD:
        return Decision(Action.HOLD, (f"{who} is moderated on {address}: posts need approval",))
    reason = f"{who} may not post to {address}: the list refuses posts from this address"
    if action is ModerationAction.DISCARD:
        return Decision(Action.DISCARD, (reason,))
    return Decision(Action.REJECT, (reason,), replies.NOT_ALLOWED.with_text(reason))


def check_size(ctx: PostContext) -> Decision | None:
    """The list's own size limit (0: the server's, which aiosmtpd enforces at DATA)."""
    limit_kb = ctx.mlist.max_message_kb
    if not limit_kb or ctx.size <= limit_kb * 1024:
        return None
    reason = (
        f"message too big for {ctx.mlist.address}: {math.ceil(ctx.size / 1024)} KB,"
        f" the list accepts at most {limit_kb} KB"
    )
    return Decision(Action.REJECT, (reason,), replies.TOO_BIG.with_text(reason))


def check_content(ctx: PostContext) -> Decision | None:
    """Plain text only (or converted), attachments, and the allowed MIME types."""
    mlist, msg = ctx.mlist, ctx.msg
    address = mlist.address
    if mlist.plain_text_only and not _is_plain(msg):
        converts = mlist.content_filter is ContentFilter.CONVERT
        if not (converts and convert.plain_text(msg) is not None):
            hint = "; HTML-only and multipart/alternative posts are converted" if converts else ""
            kind = msg.get_content_type()
            return _refuse_content(f"{address} accepts plain text only, not {kind}{hint}")
    if not mlist.allow_attachments:
        for part in _leaves(msg):
            name = _attachment(part)
            if name is not None:
                return _refuse_content(f"{address} accepts no attachments ({name})")
    allowed = _allowed_types(mlist)
    if allowed:
        for part in _leaves(msg):
            kind = part.get_content_type()
            if not any(_type_matches(kind, pattern) for pattern in allowed):
                return _refuse_content(
                    f"{address} does not accept {kind} parts; allowed: {', '.join(allowed)}"
                )
    return None


def _allowed_types(mlist: MailingList) -> list[str]:
    return [t.strip().lower() for t in mlist.allowed_mime_types.split(",") if t.strip()]


def _refuse_content(reason: str) -> Decision:
    return Decision(Action.REJECT, (reason,), replies.UNDELIVERABLE.with_text(reason))


def _is_plain(msg: EmailMessage) -> bool:
    return not msg.is_multipart() and msg.get_content_type() == "text/plain"


def _leaves(msg: EmailMessage) -> Iterator[EmailMessage]:
    for part in msg.walk():
        if not part.is_multipart():
            yield part


def _attachment(part: EmailMessage) -> str | None:
    """The part's file name (or its type) when it is an attachment, else None."""
    try:
        disposition = part.get_content_disposition()
        filename = part.get_filename()
    except Exception:  # the modern header parser's errors (STYLE.md: email package)
        raw = mail.header(part, "Content-Disposition") or ""
        disposition = "attachment" if "attachment" in raw.lower() else None
        filename = "a file" if "filename" in raw.lower() else None
    if disposition == "attachment" or filename:
        return filename or part.get_content_type()
    return None


def _type_matches(kind: str, pattern: str) -> bool:
    if pattern.endswith("/*"):
        return kind.startswith(pattern[:-1])
    return kind == pattern


def check_recipients(ctx: PostContext) -> Decision | None:
    """A post to more recipients than the list's threshold waits for approval,
    whoever sends it, unless the poster is an emergency sender."""
    threshold = ctx.mlist.approval_threshold
    if not threshold or ctx.recipients <= threshold or ctx.emergency:
        return None
    return Decision(
        Action.HOLD, (f"needs approval: {ctx.recipients} recipients > threshold {threshold}",)
    )


def check_blackout(ctx: PostContext) -> Decision | None:
    """Posts received inside a site-wide or list blackout window are held (the
    days counted in [policy] timezone), unless the poster is an emergency sender."""
    if ctx.emergency:
        return None
    local = ctx.now.astimezone(ctx.policy.zone())
    today = (local.month, local.day)
    scoped = [(w, "site-wide") for w in ctx.policy.windows()]
    try:
        scoped += [(w, "list") for w in config.parse_windows(ctx.mlist.blackout)]
    except ValueError as exc:  # `lists set` validates; only a hand-edited row gets here
        log.warning("%s: blackout setting ignored: %s", ctx.mlist.address, exc)
    for window, scope in scoped:
        if _inside(today, window):
            return Decision(
                Action.HOLD,
                (
                    f"blackout: received on {local:%m-%d} ({ctx.policy.timezone}),"
                    f" inside the {scope} window {config.format_window(window)}",
                ),
            )
    return None


def _inside(day: config.MonthDay, window: config.Window) -> bool:
    start, end = window
    if start <= end:
        return start <= day <= end
    return day >= start or day <= end  # wraps the year end


def check_links(ctx: PostContext) -> Decision | None:
    """With external_links = hold, links to hosts outside the allowlist hold the post
    (a host there allows its subdomains)."""
    if ctx.mlist.external_links is not LinkPolicy.HOLD:
        return None
    allowed = [h.strip().lower() for h in ctx.mlist.link_allowlist.split(",") if h.strip()]
    outside = sorted(
        {host for host in link_hosts(ctx.msg) if not any(_within(host, a) for a in allowed)}
    )
    if not outside:
        return None
    return Decision(
        Action.HOLD, (f"links to hosts outside the list's allowlist: {', '.join(outside)}",)
    )


def link_hosts(msg: EmailMessage) -> set[str]:
    """The hosts of every http(s) link in the text and HTML parts."""
    urls: list[str] = []
    for part in _leaves(msg):
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        text = _text_of(part)
        urls += convert.html_links(text) if kind == "text/html" else convert.URL.findall(text)
    hosts: set[str] = set()
    for url in urls:
        host = _host(url)
        if host:
            hosts.add(host)
    return hosts


def _text_of(part: EmailMessage) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, AssertionError, KeyError):
        pass
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def _host(url: str) -> str | None:
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https", "") or not host:
        return None
    host = host.rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _within(host: str, allowed: str) -> bool:
    return host == allowed or host.endswith("." + allowed)


RULES: tuple[Rule, ...] = (
    check_loop,
    check_deliverable,
    check_authenticated,
    check_sender_allowed,
    check_size,
    check_content,
    check_recipients,
    check_blackout,
    check_links,
)


def reads_body(mlist: MailingList) -> bool:
    """Whether a rule looks past the header section of posts to `mlist`
    (check_content, check_links); if none does, intake parses the header section
    alone (issue 15: a large multipart body parsed for nothing fragments memory)."""
    return (
        mlist.plain_text_only
        or not mlist.allow_attachments
        or bool(_allowed_types(mlist))
        or mlist.external_links is LinkPolicy.HOLD
    )
