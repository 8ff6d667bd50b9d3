"""From an accepted post to queued batches: decorate, sign, snapshot the recipients.

Decorating and signing are CPU work: the daemon runs `queue_post` in a thread.
A shared post is rendered and signed once; a personalized post is stored
decorated but unsigned, and `personalize` renders and signs it per recipient.
A post that uses merge fields (`merge`) on a list with `merge_fields` on is sent
personalized even when the list delivers shared: one copy cannot carry each
recipient's values; a post without them stays shared. A list with one-click
unsubscribe in effect (`unsubscribe_links.one_click`) is sent personalized too:
each copy's List-Unsubscribe carries its recipient's own link.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from listserv import addresses, mail, sitesecret, unsubscribe_links
from listserv.addresses import Kind
from listserv.config import Settings
from listserv.db import Database
from listserv.distribute import arc, convert, decorate, dkim, dmarc, merge, posts
from listserv.errors import ListservError
from listserv.models import (
    Audience,
    ContentFilter,
    DeliveryBatch,
    DeliveryMode,
    DmarcMitigateWhen,
    DmarcMitigation,
    InboundMessage,
    MailingList,
    OriginalFromIn,
    Post,
)
from listserv.pipeline import authresults

log = logging.getLogger("listserv.prepare")


@dataclass(frozen=True, slots=True)
class ListView:
    """What rendering needs of a list, as plain values that may cross threads."""

    name: str
    domain: str
    list_id: str
    description: str
    subject_prefix: str
    footer: str
    delivery_mode: DeliveryMode
    #: plain_text_only with content_filter convert: HTML goes out as plain text
    to_plain_text: bool = False
    #: fill $name, $address, $unsubscribe_url per recipient (absent from
    #: snapshots taken before schema 0005: off, as the lists were)
    merge_fields: bool = False
    # -- one-click unsubscribe (absent from older snapshots: off, as they were) --
    #: mailing_lists.id, named by unsubscribe tokens (0: unknown, no links)
    id: int = 0
    #: no opt-out: no List-Unsubscribe, and the footer says why
    mandatory: bool = False
    #: the usable [http] public_base_url when queued ("": no links at all)
    unsubscribe_base: str = ""
    #: each copy's List-Unsubscribe carries its https link, with List-Unsubscribe-Post
    one_click: bool = False
    #: DMARC mitigation (distribute.dmarc): the list's settings, and what this post
    #: got, decided once when it was prepared (absent from older snapshots: none)
    dmarc_mitigation: str = DmarcMitigation.NONE.value
    dmarc_mitigate_only_when: str = DmarcMitigateWhen.REJECT_QUARANTINE.value
    dmarc_original_from_in: str = OriginalFromIn.REPLY_TO.value
    dmarc_action: str = DmarcMitigation.NONE.value
    #: ARC (distribute.arc): the authserv-id whose Authentication-Results each
    #: personalized copy's seal carries, decided once when the post was prepared
    #: ("": not sealed, as posts queued before copies were sealed)
    arc_authserv_id: str = ""

    @classmethod
    def of(cls, mlist: MailingList, unsubscribe_base: str = "") -> ListView:
        """The list as it renders now; `unsubscribe_base` is the usable public base
        URL (unsubscribe_links.usable_base), "" when links cannot be made."""
        one_click = unsubscribe_links.one_click(mlist, unsubscribe_base)
        return cls(
            name=mlist.local_part,
            domain=mlist.domain,
            list_id=mlist.list_id,
            description=mlist.description,
            subject_prefix=mlist.subject_prefix,
            footer=mlist.footer,
            delivery_mode=DeliveryMode.PERSONALIZED if one_click else mlist.delivery_mode,
            to_plain_text=mlist.plain_text_only and mlist.content_filter is ContentFilter.CONVERT,
            merge_fields=mlist.merge_fields,
            id=mlist.id,
            mandatory=mlist.mandatory,
            unsubscribe_base=unsubscribe_base,
            one_click=one_click,
            dmarc_mitigation=mlist.dmarc_mitigation.value,
            dmarc_mitigate_only_when=mlist.dmarc_mitigate_only_when.value,
            dmarc_original_from_in=mlist.dmarc_original_from_in.value,
        )

    def address(self, kind: Kind = Kind.POST) -> str:
        return addresses.build(self.name, self.domain, kind)

    def snapshot(self) -> dict[str, Any]:
        """As stored on a queued post (posts.render), so its batches render as queued."""
        values = dataclasses.asdict(self)
        values["delivery_mode"] = self.delivery_mode.value
        return values

    @classmethod
    def from_snapshot(cls, values: dict[str, Any]) -> ListView:
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in fields}
        kept["delivery_mode"] = DeliveryMode(kept["delivery_mode"])
        return cls(**kept)


def list_headers(view: ListView) -> decorate.ListHeaders:
    return decorate.ListHeaders(
        list_id=view.list_id,
        description=view.description,
        post=view.address(),
        help=view.address(Kind.REQUEST),
        unsubscribe_mailto=view.address(Kind.LEAVE),
        # a personalized template's placeholder, each copy's own token put in its place
        unsubscribe_url=(
            f"{view.unsubscribe_base}{unsubscribe_links.PATH}{TOKEN_PLACEHOLDER}"
            if view.one_click and view.delivery_mode is DeliveryMode.PERSONALIZED
            else None
        ),
        owner=view.address(Kind.OWNER),
        opt_out=not view.mandatory,
    )


def footer_text(view: ListView, recipient: str | None = None) -> str:
    lines = [f"{view.description or view.address()} mailing list"]
    if view.footer:
        lines.append(view.footer)
    if recipient:
        lines.append(f"You are subscribed as {recipient}.")
    if view.mandatory:
        # no opt-out line: the reader is told why this list reaches them anyway
        lines.append("You receive this list because it is mandatory for everyone it serves;")
        lines.append("it cannot be unsubscribed. Questions go to the list owner.")
    else:  # never dropped (foundation review): every optional list says how to leave
        lines.append(f"To unsubscribe, send an e-mail to {view.address(Kind.LEAVE)}")
    lines.append(f"List owner: {view.address(Kind.OWNER)}")
    return "\n".join(lines) + "\n"


def render(
    raw: bytes,
    view: ListView,
    signer: dkim.Signer | None,
    seal: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The message as it leaves: DMARC mitigation, list headers, prefix, footer (shared
    mode), signature, and the ARC `seal` when it arrived signed (shared mode)."""
    msg = mail.parse(raw)
    if view.to_plain_text:
        msg = convert.to_plain_text(msg)
    sealing = seal is not None and arc.wanted(msg)
    msg = dmarc.apply(
        msg,
        DmarcMitigation(view.dmarc_action),
        list_name=view.name,
        list_address=view.address(),
        original_from_in=OriginalFromIn(view.dmarc_original_from_in),
    )
    decorate.strip_signatures(msg)
    decorate.add_list_headers(msg, list_headers(view))
    if view.subject_prefix:
        decorate.add_subject_prefix(msg, view.subject_prefix)
    if view.delivery_mode is DeliveryMode.PERSONALIZED:
        return mail.to_bytes(msg)  # footer and signature per recipient
    msg = decorate.add_footer(msg, footer_text(view))
    data = mail.to_bytes(msg)
    data = signer.sign(data) if signer else data
    return seal(data) if seal is not None and sealing else data


#: Stands for the recipient in a footer rendered once per batch (ASCII letters,
#: digits and '-': the same in 7bit, 8bit, quoted-printable and HTML).
PLACEHOLDER = "LISTSERV-RECIPIENT-7c1e9a"
#: Stands for the recipient's one-click token in a personalized template's
#: List-Unsubscribe (base64url characters: the token's own alphabet).
TOKEN_PLACEHOLDER = "LISTSERV-UNSUBSCRIBE-TOKEN-2b8d41"
#: Signing templates kept per merged post: a header slot has a few variants
#: (charset kept or UTF-8, times the transfer encodings), rarely more than 4.
_MAX_TEMPLATES = 16
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_+@")


def _longest_line_with(data: bytes, token: bytes) -> int | None:
    """The length of the longest line of `data` (as `bytes.splitlines` cuts them) that
    holds `token`, None when none does: found around each `token`, not by cutting a
    10 MB post into 127,000 lines (issue 15: they fragment Python's memory)."""
    longest: int | None = None
    at = data.find(token)
    while at >= 0:
        start = max(data.rfind(b"\r", 0, at), data.rfind(b"\n", 0, at)) + 1
        ends = [end for end in (data.find(b"\r", at), data.find(b"\n", at)) if end >= 0]
        end = min(ends, default=len(data))
        longest = max(longest or 0, end - start)
        at = data.find(token, end)
    return longest


class Personalizer:
    """Renders one post's copies, each with its own footer line, and signs them.

    The footer is rendered once with a placeholder, and a copy is that render
    with the address put in its place, wherever that is exact: the placeholder
    came out verbatim (not base64), the address needs no escaping in text, HTML
    or quoted-printable, and no line grows past 76 characters. Other recipients
    get a full render.

    Fast-path copies are byte-identical up to the placeholder's line, so their
    signing hashes that shared part once per post (`dkim.SigningTemplate`) and
    only the rest per copy; full renders are signed from scratch.

    With `merge_fields` on and a field used in the post, every copy comes from a
    `merge.Merger` instead: the same footer render, serialized once with slots
    for the Subject and the parts holding fields, each slot encoded per copy.
    Its signing shares what comes before the first slot. `names` maps lower-cased
    addresses to display names (a missing one is ""); `unsubscribe` makes the
    `$unsubscribe_url` links (None: left as written).

    On a one-click list (`view.one_click`) every copy's List-Unsubscribe gets the
    recipient's token in place of TOKEN_PLACEHOLDER, found by its whole field line
    (a sender's text cannot start a header line of ours). The header then differs
    per copy, so signing hashes each copy's header section (a few hundred bytes)
    and still shares the body prefix (`dkim.SigningTemplate`).
    """

    def __init__(
        self,
        template: bytes,
        view: ListView,
        names: Mapping[str, str] | None = None,
        unsubscribe: merge.UnsubscribeLinks | None = None,
    ) -> None:
        self.view = view
        self._names: Mapping[str, str] = names or {}
        self._unsubscribe = unsubscribe
        self._token_field: bytes | None = None
        if view.one_click and view.delivery_mode is DeliveryMode.PERSONALIZED:
            if unsubscribe is None:
                raise ValueError("a one-click post needs unsubscribe links to render")
            self._token_field = (
                f"\r\nList-Unsubscribe: <{view.unsubscribe_base}"
                f"{unsubscribe_links.PATH}{TOKEN_PLACEHOLDER}>"
            ).encode("ascii")
        self._base = mail.parse(template)
        footer = footer_text(view, PLACEHOLDER)
        decorated = decorate.add_footer(copy.deepcopy(self._base), footer)
        self._fast = mail.to_bytes(decorated)
        token = PLACEHOLDER.encode()
        self._room = 76 - (_longest_line_with(self._fast, token) or 999)
        self._usable = token in self._fast
        self._merger = (
            merge.Merger.build(decorated, merge.active_fields(unsubscribe is not None), PLACEHOLDER)
            if view.merge_fields
            else None
        )
        # (signer, its template for the shared part), made on first use by the first
        # thread to sign; a race makes two equal ones, and the swap is atomic.
        self._signing: tuple[dkim.Signer, dkim.SigningTemplate | None] | None = None
        # the same for merged copies, one template per distinct start (render_keyed)
        self._merge_signing: tuple[dkim.Signer, dict[bytes, dkim.SigningTemplate | None]] | None = (
            None
        )
        # the ARC sealer of the copies (view.arc_authserv_id), made on first use as above
        self._arc_head = template[: template.find(b"\r\n\r\n") + 4] if view.arc_authserv_id else b""
        self._sealing: tuple[dkim.Signer, arc.Sealer | None] | None = None

    @property
    def merges(self) -> bool:
        """True when the post uses merge fields, so each copy fills them in."""
        return self._merger is not None

    def fits_fast_path(self, recipient: str) -> bool:
        return (
            self._merger is None
            and self._usable
            and set(recipient) <= _SAFE
            and len(recipient) - len(PLACEHOLDER) <= self._room
        )

    def values(self, recipient: str) -> merge.Values:
        """What the merge fields become for `recipient`."""
        links = self._unsubscribe
        return merge.Values(
            name=self._names.get(recipient.lower(), ""),
            address=recipient,
            unsubscribe_url=None if links is None else links.url(recipient),
        )

    def render(self, recipient: str) -> bytes:
        if self._merger is not None:
            return self._with_token(self._merger.render(self.values(recipient)), recipient)
        if self.fits_fast_path(recipient):
            data = self._fast.replace(PLACEHOLDER.encode(), recipient.encode())
            return self._with_token(data, recipient)
        footer = footer_text(self.view, recipient)
        data = mail.to_bytes(decorate.add_footer(copy.deepcopy(self._base), footer))
        return self._with_token(data, recipient)

    def _with_token(self, data: bytes, recipient: str) -> bytes:
        """`data` with the recipient's one-click token in its List-Unsubscribe."""
        field = self._token_field
        if field is None:
            return data
        at = data.find(field, 0, data.find(b"\r\n\r\n") + 2)
        if at < 0:
            raise ValueError("the one-click List-Unsubscribe field is missing from the copy")
        at += len(field) - len(TOKEN_PLACEHOLDER) - 1  # the field ends with "TOKEN>"
        assert self._unsubscribe is not None
        token = self._unsubscribe.token(recipient).encode("ascii")
        return data[:at] + token + data[at + len(TOKEN_PLACEHOLDER) :]

    def signing_template(self, signer: dkim.Signer) -> dkim.SigningTemplate | None:
        """The per-post signing state for the copies' shared part, or None (none shared)."""
        cached = self._signing
        if cached is not None and cached[0] is signer:
            return cached[1]
        if self._merger is not None:
            prefix = self._merger.shared_prefix()
            template = signer.template(prefix, len(prefix))
        elif self._usable:
            template = signer.template(self._fast, self._fast.find(PLACEHOLDER.encode()))
        else:
            template = None
        self._signing = (signer, template)
        return template

    def arc_sealer(self, signer: dkim.Signer) -> arc.Sealer | None:
        """The per-post ARC sealer of the copies, or None: not to be sealed (decided
        when queued, `ListView.arc_authserv_id`), an Ed25519 key, or no seal possible."""
        if not self.view.arc_authserv_id or not arc.can_seal(signer):
            return None
        cached = self._sealing
        if cached is not None and cached[0] is signer:
            return cached[1]
        found = arc.chain(self._arc_head, self.view.arc_authserv_id)
        sealer = None if found is None else arc.Sealer(signer, found)
        self._sealing = (signer, sealer)
        return sealer

    def render_all(self, recipients: list[str], signer: dkim.Signer | None) -> list[bytes]:
        """One message per recipient, each with its own footer line and signature
        (and ARC seal, `arc_sealer`)."""
        if signer is None:
            return [self.render(recipient) for recipient in recipients]
        sealer = self.arc_sealer(signer)
        if self._merger is not None:
            return [self._sign_merged(recipient, signer, sealer) for recipient in recipients]
        template = self.signing_template(signer)
        if sealer is not None:
            return [sealer.sign(self.render(recipient), template) for recipient in recipients]
        sign = signer.sign if template is None else template.sign
        return [sign(self.render(recipient)) for recipient in recipients]

    def _sign_merged(
        self, recipient: str, signer: dkim.Signer, sealer: arc.Sealer | None = None
    ) -> bytes:
        """A merged copy, signed with the template of copies that start as it does:
        a name that does not fit a part's charset changes that part's headers, and
        with all-ASCII parts (decorate writes them us-ascii) that is every non-ASCII
        name, so one template per distinct start, not one per post (10,000 signed
        copies of a 4 KB post, non-ASCII names: 4.07 s with one, 3.49 s so)."""
        assert self._merger is not None
        data, prefix = self._merger.render_keyed(self.values(recipient))
        data = self._with_token(data, recipient)
        cached = self._merge_signing
        if cached is None or cached[0] is not signer:
            cached = self._merge_signing = (signer, {})
        templates = cached[1]
        if prefix not in templates:
            if len(templates) >= _MAX_TEMPLATES:
                return signer.sign(data) if sealer is None else sealer.sign(data)
            templates[prefix] = signer.template(prefix, len(prefix))
        template = templates[prefix]
        if sealer is not None:
            return sealer.sign(data, template)
        return signer.sign(data) if template is None else template.sign(data)


def personalize(
    template: bytes,
    view: ListView,
    recipients: list[str],
    signer: dkim.Signer | None,
    names: Mapping[str, str] | None = None,
) -> list[bytes]:
    """One message per recipient, each with its own footer line and signature."""
    return Personalizer(template, view, names).render_all(recipients, signer)


def merged_template(raw: bytes, view: ListView, audience: Audience) -> bytes | None:
    """The personalized template of a members' post that uses merge fields on a list
    that delivers shared, which therefore goes out personalized; else None."""
    if not (
        view.merge_fields
        and audience is Audience.MEMBERS
        and view.delivery_mode is DeliveryMode.SHARED
    ):
        return None
    personal = dataclasses.replace(view, delivery_mode=DeliveryMode.PERSONALIZED)
    template = render(raw, personal, None)
    # $unsubscribe_url is a field when links can be made (the secret is not needed
    # to tell; the senders make the real links)
    links = (
        unsubscribe_links.UnsubscribeLinks(view.unsubscribe_base, b"", view.id)
        if view.unsubscribe_base and view.id
        else None
    )
    return template if Personalizer(template, personal, unsubscribe=links).merges else None


#: domains already warned about in this process: once each, not once per post
_UNSIGNED_WARNED: set[str] = set()
#: public_base_url values already warned about in this process
_NO_LINKS_WARNED: set[str] = set()


def _warn_no_links(public_base_url: str) -> None:
    problem = unsubscribe_links.base_problem(public_base_url)
    if problem is not None and public_base_url not in _NO_LINKS_WARNED:
        _NO_LINKS_WARNED.add(public_base_url)
        log.warning(
            "no one-click unsubscribe links: %s; lists keep their own delivery mode"
            " and List-Unsubscribe has the mailto only",
            problem,
        )


def signer_for(
    keys_dir: Path, domain: str, selectors: Sequence[str] | None = None
) -> dkim.Signer | None:
    """A signer with `domain`'s active keys (RSA, then Ed25519: two signatures), or with
    the keys `selectors` names, as recorded when a personalized post was queued: a
    rotation while its batches wait changes nothing they send. A recorded key that
    is gone (deleted by hand) is never used: the active keys sign instead."""
    keys: list[dkim.SigningKey] = []
    if selectors:
        try:
            keys = [dkim.find_key(keys_dir, domain, s) for s in selectors]
        except ListservError as exc:
            log.warning(
                "DKIM key recorded for a queued post of %s unusable (%s):"
                " signing with the active key",
                domain,
                exc,
            )
            keys = []
    if not keys:
        keys = dkim.active_keys(keys_dir, domain)
    if not keys:
        if domain not in _UNSIGNED_WARNED:
            _UNSIGNED_WARNED.add(domain)
            log.warning("no DKIM key for %s: sending unsigned (run `listserv dkim keygen`)", domain)
        return None
    _UNSIGNED_WARNED.discard(domain)  # a key now: warn again should it go away
    return dkim.Signer(*keys)


#: posts.render key: the selectors a personalized post's copies are signed with
SELECTORS_KEY = "dkim_selectors"


def signing_selectors(keys_dir: Path, domain: str) -> list[str]:
    """The active selectors of `domain`, recorded with a personalized post at queue time."""
    return [key.selector for key in dkim.active_keys(keys_dir, domain)]


def mitigate(
    view: ListView, raw: bytes, settings: Settings, *, signed: bool, post_id: int = 0
) -> ListView:
    """`view` with this post's DMARC action decided (DNS: call in a thread), once per
    post: the snapshot keeps it, and the stored rendering is what every retry sends."""
    head = mail.parse_headers(raw)
    decision = dmarc.decide(
        dmarc.from_domains(head),
        list_domain=view.domain,
        mitigation=DmarcMitigation(view.dmarc_mitigation),
        when=DmarcMitigateWhen(view.dmarc_mitigate_only_when),
        own_domains=settings.dmarc.own_domains,
        policies=dmarc.policies_for(settings.dns, settings.dmarc),
        signed=signed,
    )
    if decision.action is not DmarcMitigation.NONE:
        log.info(
            "post %d to %s: %s, %s",
            post_id,
            view.address(),
            decision.action.value,
            decision.reason,
        )
    return dataclasses.replace(view, dmarc_action=decision.action.value)


@dataclass(frozen=True, slots=True)
class Queued:
    """What `start_post` did: the post is queued, whole (`done`) or its first chunk,
    and the rest of its snapshot is for `continue_post`."""

    post_id: int
    list_address: str
    mode: DeliveryMode
    batches: int
    recipients: int
    done: bool
    #: lower-cased addresses another post of the same message has (posts.sibling_addresses)
    skip: frozenset[str] = frozenset()


def queue_post(db: Database, settings: Settings, post_id: int, *, worker: str) -> int | None:
    """Prepare one accepted post and snapshot all its recipients; returns the batch
    count (None: another worker queued it first, or it failed). The daemon's
    scheduler runs `start_post` and `continue_post` instead, one chunk at a time."""
    queued = start_post(db, settings, post_id, worker=worker)
    if queued is None:
        return None
    batches = queued.batches
    while not queued.done:
        chunk = continue_post(db, settings, post_id, worker=worker, skip=queued.skip)
        if chunk.lost:
            break
        batches += chunk.batches
        queued = dataclasses.replace(queued, done=chunk.done)
    return batches


def start_post(db: Database, settings: Settings, post_id: int, *, worker: str) -> Queued | None:
    """Prepare one accepted post and queue it: notices and forwards to the owners
    whole, a members' post with its first chunk of recipients (the rest by
    `continue_post`). Committed before it returns, so its first batches can go out.

    None when another worker queued it first, or when it failed. A post that
    cannot be prepared is marked failed with the reason, shown by `queue status`
    and logged in one line: kept for the operator, never dropped.
    """
    with db.reading() as session:
        post = session.get(Post, post_id)
        if post is None:
            return None
        mlist = session.get(MailingList, post.list_id)
        if post.audience is Audience.NOTICE:
            raw = post.prepared  # written by the server: sign it, nothing more
        else:  # the bytes alone: an ORM object would keep them after `del raw`
            raw = session.scalar(
                sa.select(InboundMessage.raw).where(InboundMessage.id == post.inbound_id)
            )
        if mlist is None or raw is None:
            return None  # deleted meanwhile, with its list
        base = unsubscribe_links.usable_base(settings.http.public_base_url)
        view = ListView.of(mlist, base)
        audience = post.audience
        if not base and mlist.one_click_unsubscribe and not mlist.mandatory:
            _warn_no_links(settings.http.public_base_url)
    try:
        if audience is Audience.OWNERS:
            prepared = raw  # forwarded as it came: its own signatures stay valid
        elif audience is Audience.NOTICE:
            signer = signer_for(settings.keys_dir, view.domain)
            prepared = signer.sign(raw) if signer else raw
        else:
            signer = signer_for(settings.keys_dir, view.domain)
            view = mitigate(view, raw, settings, signed=signer is not None, post_id=post_id)
            if arc.can_seal(signer) and arc.wanted(mail.parse_headers(raw)):
                # recorded: a personalized post's copies are sealed as it was decided now
                view = dataclasses.replace(view, arc_authserv_id=authresults.authserv_id(settings))
            if (merged := merged_template(raw, view, audience)) is not None:
                prepared = merged
                view = dataclasses.replace(view, delivery_mode=DeliveryMode.PERSONALIZED)
            else:
                seal = arc.sealer(signer, authresults.authserv_id(settings))
                prepared = render(raw, view, signer, seal)
        snapshot = view.snapshot()
        if audience is Audience.MEMBERS and view.delivery_mode is DeliveryMode.PERSONALIZED:
            snapshot[SELECTORS_KEY] = signing_selectors(settings.keys_dir, view.domain)
    except Exception as exc:
        reason = f"could not be prepared: {' '.join(str(exc).split()) or type(exc).__name__}"
        log.error("post %d to %s: failed, %s", post_id, view.address(), reason)
        log.debug("post %d: preparation traceback", post_id, exc_info=True)
        with db.session() as session:
            posts.fail_post(session, post_id, reason)
        return None
    del raw  # a large post is held once here, not twice (issue 15: memory)
    mode = view.delivery_mode if audience is Audience.MEMBERS else DeliveryMode.SHARED
    settings_d = settings.delivery
    with db.session() as session:
        if view.unsubscribe_base and audience is Audience.MEMBERS:
            sitesecret.get(session, sitesecret.UNSUBSCRIBE)  # made now: senders only read it
        if audience is Audience.MEMBERS:
            started = posts.start_snapshot(
                session,
                post_id,
                worker=worker,
                lease=timedelta(seconds=settings_d.lease_seconds),
                prepared=prepared,
                envelope_from=view.address(Kind.BOUNCES),
                delivery_mode=mode,
                render=snapshot,
            )
            if started is None:
                return None
            skip = frozenset(posts.sibling_addresses(session, post_id))
            queued = Queued(post_id, view.address(), mode, 0, 0, False, skip)
        else:
            locked = posts.lock_accepted_post(session, post_id)
            if locked is None:
                return None
            rcpts: list[str]
            if audience is Audience.NOTICE:
                rcpts = list(dict.fromkeys(locked.notice_to or []))
            else:
                rcpts = posts.recipients(session, locked.list_id, audience)
            batches = posts.enqueue(
                session,
                locked,
                prepared=prepared,
                envelope_from=view.address(Kind.BOUNCES),
                delivery_mode=mode,
                render=snapshot,
                addresses=rcpts,
                max_per_batch=settings_d.max_recipients_per_message,
                mix_domains=settings_d.mix_domains,
            )
            queued = Queued(post_id, view.address(), mode, batches, locked.recipient_count, True)
    if audience is Audience.MEMBERS:
        # The first chunk in a transaction of its own: on SQLite each holds the write
        # lock that mail waiting for its 250 needs; together they held it 12-40 ms
        # (issue 15). Committed, the snapshot is ours and resumes from its cursor.
        try:
            chunk = continue_post(db, settings, post_id, worker=worker, skip=queued.skip)
        except Exception:
            log.exception("post %d: first recipients not queued yet (will retry)", post_id)
            return queued
        if chunk.lost:  # cancelled or deleted meanwhile
            return None
        queued = dataclasses.replace(
            queued, batches=chunk.batches, recipients=chunk.recipients, done=chunk.done
        )
    if audience is Audience.OWNERS and not queued.recipients:
        log.warning("post %d: %s has no owners to forward to (kept)", post_id, view.address())
    if queued.done:
        log_queued(queued)
    return queued


def continue_post(
    db: Database, settings: Settings, post_id: int, *, worker: str, skip: frozenset[str]
) -> posts.Chunk:
    """The next chunk of a members' post's snapshot, committed (queue bookkeeping:
    not waiting for the disk, as a lost chunk is written again from the cursor)."""
    with db.session(durable=False) as session:
        return posts.snapshot_chunk(
            session,
            post_id,
            worker=worker,
            lease=timedelta(seconds=settings.delivery.lease_seconds),
            max_per_batch=settings.delivery.max_recipients_per_message,
            mix_domains=settings.delivery.mix_domains,
            rows=settings.delivery.snapshot_chunk,
            skip=skip,
        )


def log_queued(queued: Queued) -> None:
    log.info(
        "post %d to %s: queued %d recipients in %d batches (%s)",
        queued.post_id,
        queued.list_address,
        queued.recipients,
        queued.batches,
        queued.mode.value,
    )


def resumed(session: Session, post_id: int) -> Queued:
    """An open snapshot taken over (posts.adopt_snapshot), as `continue_post` goes on
    with it: what it has written so far, and what the message's other posts have."""
    post = session.get_one(Post, post_id)
    mlist = session.get_one(MailingList, post.list_id)
    batches = session.scalar(
        sa.select(sa.func.count(DeliveryBatch.id)).where(DeliveryBatch.post_id == post_id)
    )
    return Queued(
        post_id,
        ListView.of(mlist).address(),
        post.delivery_mode or mlist.delivery_mode,
        int(batches or 0),
        post.recipient_count,
        False,
        frozenset(posts.sibling_addresses(session, post_id)),
    )
