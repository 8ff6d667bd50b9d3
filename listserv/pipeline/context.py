"""What the post rules look at: one typed value instead of a loose dict.

Who the poster is, is settled here, once, for every rule: each From: address
must be allowed to post, or a Sender: header naming someone allowed stands in
for them (a secretary posting for a principal). The envelope sender is never
part of it: anyone can write any MAIL FROM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage

from listserv.config import PolicySettings
from listserv.models import MailingList, ModerationAction, NonmemberAction, PostingPolicy, Role

#: the roles allowed to post under each policy (None: anyone)
MAY_POST: dict[PostingPolicy, frozenset[Role] | None] = {
    PostingPolicy.ANNOUNCE: frozenset({Role.SENDER, Role.MODERATOR, Role.OWNER}),
    PostingPolicy.MEMBERS: frozenset({Role.MEMBER, Role.SENDER, Role.MODERATOR, Role.OWNER}),
    PostingPolicy.OPEN: None,
}


def nonmember_action(mlist: MailingList) -> NonmemberAction:
    """The list's action for posters its policy does not allow; unset, by the policy:
    an announce list refuses strangers outright, a members list holds them (a member
    writing from another address is common, and a moderator can let it through)."""
    if mlist.nonmember_action is not None:
        return mlist.nonmember_action
    if mlist.posting_policy is PostingPolicy.ANNOUNCE:
        return NonmemberAction.REJECT
    return NonmemberAction.HOLD


#: own actions from the mildest to the strictest: several From: addresses get the strictest
SEVERITY = (
    ModerationAction.ACCEPT,
    ModerationAction.HOLD,
    ModerationAction.REJECT,
    ModerationAction.DISCARD,
)


@dataclass(frozen=True, slots=True)
class Standing:
    """What one address is on the list (every role it holds, and its rows' flags)."""

    roles: frozenset[Role] = frozenset()
    #: its own moderation action (the strictest of its rows), None: the list decides
    action: ModerationAction | None = None
    #: an emergency sender: passes the approval threshold and blackouts
    emergency: bool = False


NOBODY = Standing()


@dataclass(frozen=True, slots=True)
class Poster:
    """Who speaks for the post, as the rules judge it."""

    #: the From: addresses, or the Sender: address standing in for them
    addresses: tuple[str, ...]
    #: every one of them may post, by roles that count (authenticated when required)
    authorized: bool
    #: they would be authorized if their mail were authenticated
    unauthenticated: bool
    #: the Sender: header stands in for From:
    via_sender: bool
    #: the strictest own action among them
    action: ModerationAction | None
    #: every one of them is an authorized emergency sender
    emergency: bool

    @property
    def name(self) -> str:
        return ", ".join(self.addresses) or "<>"


@dataclass(frozen=True, slots=True)
class PostContext:
    mlist: MailingList
    msg: EmailMessage
    size: int
    mail_from: str
    #: the normalized From: addresses, in header order
    from_addresses: tuple[str, ...]
    #: the normalized Sender: address, if there is one
    sender_address: str | None
    #: roles, own action and emergency flag of each address above, by lower-cased address
    standing: Mapping[str, Standing]
    #: active recipients (members with delivery enabled); a post to several lists
    #: counts the union of their recipients; 0 when no list of the post has an
    #: approval_threshold (the count scans every member, so it is only made when needed)
    recipients: int
    #: when the post was received (aware)
    now: datetime
    policy: PolicySettings = field(default_factory=PolicySettings)
    #: From/Sender domains whose mail is authenticated (DKIM aligned or trusted DMARC pass)
    authenticated: frozenset[str] = frozenset()

    def of(self, address: str) -> Standing:
        return self.standing.get(address.lower(), NOBODY)

    def trusted(self, address: str) -> bool:
        """Whether the list may believe the address is who sent the mail."""
        if not self.mlist.require_authenticated_sender:
            return True
        domain = address.rpartition("@")[2].lower()
        return domain in {d.lower() for d in self.authenticated}

    def may_post(self, address: str, *, trusting: bool = False) -> bool:
        """The policy allows this address (by roles that count; `trusting`: all of them)."""
        allowed = MAY_POST[self.mlist.posting_policy]
        if allowed is None:
            return True
        if not (trusting or self.trusted(address)):
            return False
        return bool(self.of(address).roles & allowed)

    @property
    def poster(self) -> Poster:
        froms = self.from_addresses
        if froms and all(self.may_post(a) for a in froms):
            return self._poster(froms, authorized=True, via_sender=False)
        sender = self.sender_address
        if sender is not None and self.may_post(sender):
            return self._poster((sender,), authorized=True, via_sender=True)
        claimed = bool(froms) and all(self.may_post(a, trusting=True) for a in froms)
        if not claimed and sender is not None and self.may_post(sender, trusting=True):
            return self._poster((sender,), authorized=False, via_sender=True, claimed=True)
        return self._poster(froms, authorized=False, via_sender=False, claimed=claimed)

    def _poster(
        self,
        addresses: tuple[str, ...],
        *,
        authorized: bool,
        via_sender: bool,
        claimed: bool = False,
    ) -> Poster:
        standings = [self.of(a) for a in addresses]
        actions = [s.action for s in standings if s.action is not None]
        return Poster(
            addresses=addresses,
            authorized=authorized,
            unauthenticated=claimed and not authorized,
            via_sender=via_sender,
            action=max(actions, key=SEVERITY.index) if actions else None,
            emergency=authorized
            and bool(addresses)
            and all(
                s.emergency and self.trusted(a) for a, s in zip(addresses, standings, strict=True)
            ),
        )

    @property
    def emergency(self) -> bool:
        """The poster is an authorized emergency sender."""
        return self.poster.emergency

    @property
    def sender(self) -> str:
        """Whom the post is from, for the record and the logs."""
        poster = self.poster
        if poster.addresses:
            return poster.addresses[0]
        return self.mail_from or "<>"
