"""The nouns, as typed SQLAlchemy 2.0 models.

Only portable column types are used, so the same models and migrations serve
SQLite and PostgreSQL. Enums are stored by value as strings; datetimes are
stored in UTC and always come back timezone-aware.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class email_domain(GenericFunction[str]):  # an SQL function, named as in SQL
    """The part of an address after its '@', in SQL: `split_part` on PostgreSQL,
    `substr`/`instr` on SQLite. One construct, so the snapshot's queries and its
    index (`ix_members_snapshot`) are the same expression and the index is used."""

    type = sa.String()
    inherit_cache = True


@compiles(email_domain, "postgresql")
def _email_domain_pg(element: email_domain, compiler: SQLCompiler, **kw: Any) -> str:
    return f"split_part({compiler.process(element.clauses, **kw)}, '@', 2)"


@compiles(email_domain)
def _email_domain_sqlite(element: email_domain, compiler: SQLCompiler, **kw: Any) -> str:
    address = compiler.process(element.clauses, **kw)
    return f"substr({address}, instr({address}, '@') + 1)"


class PostingPolicy(enum.StrEnum):
    ANNOUNCE = "announce"  # senders, moderators and owners only
    MEMBERS = "members"  # and members
    OPEN = "open"  # anyone


class DeliveryMode(enum.StrEnum):
    SHARED = "shared"  # one signed message per batch
    PERSONALIZED = "personalized"  # one rendered, signed message per recipient


class Role(enum.StrEnum):
    MEMBER = "member"
    OWNER = "owner"
    MODERATOR = "moderator"
    SENDER = "sender"  # authorized sender: may post to an announce list


class DeliveryStatus(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"


class InboundState(enum.StrEnum):
    PENDING = "pending"  # stored, not yet handled (commands, bounces: later stages)
    DONE = "done"
    FAILED = "failed"


class PostState(enum.StrEnum):
    HELD = "held"
    ACCEPTED = "accepted"  # decided, waiting to be prepared and queued
    SENDING = "sending"  # batches queued
    SENT = "sent"  # every recipient delivered or failed for good
    REJECTED = "rejected"
    DISCARDED = "discarded"
    FAILED = "failed"  # could not be prepared; kept for the operator
    #: `queue cancel`: open recipients failed "cancelled by <actor>", nothing more sent
    CANCELLED = "cancelled"


class Audience(enum.StrEnum):
    MEMBERS = "members"  # a post: decorated, signed, to the members
    OWNERS = "owners"  # mail to NAME-owner@: forwarded unchanged to the owners
    NOTICE = "notice"  # mail the server writes (holds, decisions): to posts.notice_to


class NonmemberAction(enum.StrEnum):
    """What happens to a post from someone the posting policy does not allow."""

    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"


class ModerationAction(enum.StrEnum):
    """A member's or sender's own action, overriding the list's default."""

    ACCEPT = "accept"
    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"


class ContentFilter(enum.StrEnum):
    REJECT = "reject"  # plain_text_only: anything but text/plain is rejected
    CONVERT = "convert"  # plain_text_only: HTML-only and alternative posts go out as text


class LinkPolicy(enum.StrEnum):
    ALLOW = "allow"
    HOLD = "hold"  # links to hosts outside link_allowlist hold the post


class TokenKind(enum.StrEnum):
    MODERATION = "moderation"  # decides a held post by reply to NAME-confirm+TOKEN@
    SUBSCRIBE = "subscribe"  # confirms a subscription request (double opt-in)
    UNSUBSCRIBE = "unsubscribe"  # confirms an unsubscription asked for by e-mail
    APPROVAL = "approval"  # an owner approves a confirmed subscription (policy approve)
    REENABLE = "reenable"  # a member disabled for bounces turns delivery back on


class SubscriptionPolicy(enum.StrEnum):
    OPEN = "open"  # anyone, after confirming by reply (double opt-in)
    APPROVE = "approve"  # confirmed, then approved by an owner
    CLOSED = "closed"  # no self-subscription: the CLI and sync only


class DmarcMitigation(enum.StrEnum):
    """What a post from a domain whose DMARC policy it would fail becomes (distribute/dmarc.py)."""

    MUNGE_FROM = "munge_from"  # From: "Jane Doe via staff" <staff@...>, Jane in Reply-To/Cc
    WRAP_MESSAGE = "wrap_message"  # a message from the list with the post attached
    NONE = "none"  # sent as it is (receivers may reject or junk it)


class DmarcMitigateWhen(enum.StrEnum):
    REJECT_QUARANTINE = "reject_quarantine"  # the From domain publishes p=reject/quarantine
    ALWAYS = "always"  # every post (but the site's own aligned domains)


class OriginalFromIn(enum.StrEnum):
    """Where a munged post's original From: address goes, so replies can reach the author."""

    REPLY_TO = "reply_to"
    CC = "cc"


class BounceKind(enum.StrEnum):
    PERMANENT = "permanent"
    TEMPORARY = "temporary"


class BatchState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    LEASED = "leased"  # claimed by a worker until lease_expires_at
    DONE = "done"


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # 4xx: tried again later
    FAILED = "failed"  # 5xx, or gave up


def _enum(cls: type[enum.Enum], length: int = 16) -> sa.Enum:
    return sa.Enum(
        cls,
        native_enum=False,
        create_constraint=True,
        length=length,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


IntPK = Annotated[int, mapped_column(primary_key=True)]
CreatedAt = Annotated[datetime, mapped_column(UTCDateTime, default=utcnow)]
Address = Annotated[str, mapped_column(sa.String(320))]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map: dict[Any, Any] = {  # noqa: RUF012
        datetime: UTCDateTime,
        PostingPolicy: _enum(PostingPolicy),
        DeliveryMode: _enum(DeliveryMode),
        Role: _enum(Role),
        DeliveryStatus: _enum(DeliveryStatus),
        InboundState: _enum(InboundState),
        PostState: _enum(PostState),
        Audience: _enum(Audience),
        NonmemberAction: _enum(NonmemberAction),
        ModerationAction: _enum(ModerationAction),
        ContentFilter: _enum(ContentFilter),
        LinkPolicy: _enum(LinkPolicy),
        TokenKind: _enum(TokenKind),
        SubscriptionPolicy: _enum(SubscriptionPolicy),
        BounceKind: _enum(BounceKind),
        BatchState: _enum(BatchState),
        RecipientState: _enum(RecipientState),
        DmarcMitigation: _enum(DmarcMitigation),
        DmarcMitigateWhen: _enum(DmarcMitigateWhen, length=24),
        OriginalFromIn: _enum(OriginalFromIn),
    }


#: SQLite reuses the largest rowid after a delete unless the table is AUTOINCREMENT: a
#: deleted post's id came back for the next post and a cache keyed by it sent the
#: deleted list's post to another list (foundation review). PostgreSQL never reuses.
NO_REUSE = {"sqlite_autoincrement": True}


class MailingList(Base):
    __tablename__ = "mailing_lists"
    __table_args__ = (sa.UniqueConstraint("local_part", "domain"), NO_REUSE)

    id: Mapped[IntPK]
    local_part: Mapped[str] = mapped_column(sa.String(64))
    domain: Mapped[str] = mapped_column(sa.String(255))
    posting_policy: Mapped[PostingPolicy] = mapped_column(default=PostingPolicy.MEMBERS)
    delivery_mode: Mapped[DeliveryMode] = mapped_column(default=DeliveryMode.SHARED)
    subject_prefix: Mapped[str] = mapped_column(sa.String(100), default="")
    description: Mapped[str] = mapped_column(sa.String(255), default="")
    footer: Mapped[str] = mapped_column(sa.Text, default="")
    # -- posting policy and moderation (the moderation issue) --
    #: None: by the posting policy (hold on members lists, reject on announce lists)
    nonmember_action: Mapped[NonmemberAction | None] = mapped_column(default=None)
    require_authenticated_sender: Mapped[bool] = mapped_column(default=False)
    max_message_kb: Mapped[int] = mapped_column(default=0)  # 0: the server's limit
    plain_text_only: Mapped[bool] = mapped_column(default=False)
    content_filter: Mapped[ContentFilter] = mapped_column(default=ContentFilter.REJECT)
    allow_attachments: Mapped[bool] = mapped_column(default=True)
    allowed_mime_types: Mapped[str] = mapped_column(sa.Text, default="")  # comma-separated
    approval_threshold: Mapped[int] = mapped_column(default=0)  # 0: no threshold
    blackout: Mapped[str] = mapped_column(sa.Text, default="")  # "07-01..07-31,12-24..01-06"
    external_links: Mapped[LinkPolicy] = mapped_column(default=LinkPolicy.ALLOW)
    link_allowlist: Mapped[str] = mapped_column(sa.Text, default="")  # comma-separated hosts
    hold_expiry_days: Mapped[int] = mapped_column(default=14)
    #: personalized copies fill $name, $address, $unsubscribe_url (distribute.merge)
    merge_fields: Mapped[bool] = mapped_column(default=False)
    # -- subscriptions (the subscriptions issue) --
    subscription_policy: Mapped[SubscriptionPolicy] = mapped_column(
        default=SubscriptionPolicy.OPEN, server_default=SubscriptionPolicy.OPEN.value
    )
    #: RFC 8058 List-Unsubscribe-Post on every copy (so one signed copy per recipient)
    one_click_unsubscribe: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    #: nobody may leave (crisis notices to all staff): no opt-out, no one-click header
    mandatory: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # -- delivery reports (reports.py) --
    #: the poster gets a report when a post's last batch is done
    delivery_reports: Mapped[bool] = mapped_column(default=True, server_default=sa.true())
    #: the owners get a copy of every delivery report
    report_to_owners: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    #: hours after the report in which bounces are counted for a follow-up (0: none)
    report_window_hours: Mapped[int] = mapped_column(default=24, server_default="24")
    # -- deliverability (the deliverability issue) --
    dmarc_mitigation: Mapped[DmarcMitigation] = mapped_column(
        default=DmarcMitigation.MUNGE_FROM, server_default=DmarcMitigation.MUNGE_FROM.value
    )
    dmarc_mitigate_only_when: Mapped[DmarcMitigateWhen] = mapped_column(
        default=DmarcMitigateWhen.REJECT_QUARANTINE,
        server_default=DmarcMitigateWhen.REJECT_QUARANTINE.value,
    )
    dmarc_original_from_in: Mapped[OriginalFromIn] = mapped_column(
        default=OriginalFromIn.REPLY_TO, server_default=OriginalFromIn.REPLY_TO.value
    )
    last_reminder_at: Mapped[datetime | None] = mapped_column(default=None)
    # -- bounces (the bounces issue; bounces/score.py) --
    #: a member whose score reaches this has delivery disabled
    bounce_score_threshold: Mapped[float] = mapped_column(sa.Float, default=5.0, server_default="5")
    #: days: a bounce older than this restarts the count
    bounce_info_stale_after: Mapped[int] = mapped_column(default=7, server_default="7")
    #: "you are disabled" notices (the first at disabling) before the member is unsubscribed
    bounce_you_are_disabled_warnings: Mapped[int] = mapped_column(default=3, server_default="3")
    #: days between two of those notices
    bounce_you_are_disabled_warnings_interval: Mapped[int] = mapped_column(
        default=7, server_default="7"
    )
    #: what a temporary bounce (a delay) adds to the score; a permanent one adds 1
    bounce_temporary_weight: Mapped[float] = mapped_column(
        sa.Float, default=0.5, server_default="0.5"
    )
    created_at: Mapped[CreatedAt]

    @property
    def address(self) -> str:
        return f"{self.local_part}@{self.domain}"

    @property
    def list_id(self) -> str:
        """RFC 2919 list identifier: the address with '@' turned into '.'."""
        return f"{self.local_part}.{self.domain}"


class Member(Base):
    __tablename__ = "members"
    __table_args__ = (
        sa.UniqueConstraint("list_id", "address", "role"),
        sa.Index("ix_members_list_role", "list_id", "role"),
        #: the bounce task finds the members disabled for bounces without a scan
        sa.Index("ix_members_disabled_reason", "disabled_reason"),
        # the snapshot reads a list's members in domain order a chunk at a time,
        # after a cursor (distribute/posts.py): without it every chunk sorts the list
        sa.Index(
            "ix_members_snapshot",
            "list_id",
            "role",
            sa.func.lower(email_domain(sa.literal_column("address"))),
            sa.func.lower(sa.literal_column("address")),
        ),
        # who may post, unsubscribe, bounce scoring: one address on a list, in any case.
        # Without it each lookup read every member of the list: 14 ms a post at 100,000.
        # `address` makes it a covering index for SQLite, which otherwise prefers the
        # unique index above (it covers role and id) and reads the list through it.
        sa.Index(
            "ix_members_address",
            "list_id",
            sa.func.lower(sa.literal_column("address")),
            "role",
            "address",
        ),
        NO_REUSE,
    )

    id: Mapped[IntPK]
    list_id: Mapped[int] = mapped_column(sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"))
    address: Mapped[Address]
    display_name: Mapped[str] = mapped_column(sa.String(255), default="")
    role: Mapped[Role] = mapped_column(default=Role.MEMBER)
    delivery_status: Mapped[DeliveryStatus] = mapped_column(default=DeliveryStatus.ENABLED)
    #: overrides the list's action for this address's posts (None: the list decides)
    moderation_action: Mapped[ModerationAction | None] = mapped_column(default=None)
    #: a sender whose posts pass the approval threshold and blackouts
    emergency: Mapped[bool] = mapped_column(default=False)
    #: where the row came from: "manual" (CLI), "import", "subscribe" (by e-mail),
    #: "owner" (an owner's command) or "sync:NAME"; a sync removes only its own rows
    source: Mapped[str] = mapped_column(sa.String(64), default="manual", server_default="manual")
    # -- bounces (the bounces issue) --
    bounce_score: Mapped[float] = mapped_column(sa.Float, default=0.0, server_default="0")
    last_bounce_at: Mapped[datetime | None] = mapped_column(default=None)
    #: "you are disabled" warnings sent since delivery was disabled for bounces
    bounce_warnings_sent: Mapped[int] = mapped_column(default=0, server_default="0")
    last_warning_at: Mapped[datetime | None] = mapped_column(default=None)
    #: why delivery_status is disabled: "bounce", "owner", "member" ("" when enabled)
    disabled_reason: Mapped[str] = mapped_column(sa.String(16), default="", server_default="")
    created_at: Mapped[CreatedAt]


class Unsubscription(Base):
    """Someone left a list (any path): a later sync from an outside source must not
    add them back. Subscribing again oneself (confirmed) removes the row."""

    __tablename__ = "unsubscriptions"
    __table_args__ = (sa.UniqueConstraint("list_id", "address"), NO_REUSE)

    id: Mapped[IntPK]
    list_id: Mapped[int] = mapped_column(sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"))
    address: Mapped[Address]  # normalized, lower case
    #: "email" (confirmed command or -leave), "one-click", "owner", "cli", "bounce", "sync"
    via: Mapped[str] = mapped_column(sa.String(16))
    actor: Mapped[str] = mapped_column(sa.String(320), default="")
    at: Mapped[CreatedAt]


class BounceEvent(Base):
    """One bounce attributed to one address of one list (scored in bounces/)."""

    __tablename__ = "bounce_events"
    __table_args__ = (
        sa.Index("ix_bounce_events_member", "list_id", "address"),
        sa.Index("ix_bounce_events_post", "post_id"),
        NO_REUSE,
    )

    id: Mapped[IntPK]
    list_id: Mapped[int] = mapped_column(sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"))
    address: Mapped[Address]  # normalized, lower case
    #: the post that bounced, when known (VERP, or a DSN naming its Message-ID)
    post_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("posts.id", ondelete="SET NULL"), default=None
    )
    #: the stored bounce message, when it came by mail (None: an SMTP reply in delivery)
    inbound_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("inbound_messages.id", ondelete="SET NULL"), default=None
    )
    kind: Mapped[BounceKind]
    #: "smtp" (our own delivery), "verp", "dsn", "heuristic"
    source: Mapped[str] = mapped_column(sa.String(16))
    status: Mapped[str] = mapped_column(sa.String(16), default="")  # 5.1.1, 550, ...
    detail: Mapped[str] = mapped_column(sa.Text, default="")
    at: Mapped[CreatedAt]


class SiteSecret(Base):
    """Secrets every process and host of one installation shares (sitesecret.py):
    kept in the database so N hosts on one database agree without copying files."""

    __tablename__ = "site_secrets"
    __table_args__ = (sa.UniqueConstraint("name"), NO_REUSE)

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(sa.String(64))
    value: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[CreatedAt]


class InboundMessage(Base):
    """Raw mail as it arrived: the record, kept before we answer 250."""

    __tablename__ = "inbound_messages"
    __table_args__ = (NO_REUSE,)

    id: Mapped[IntPK]
    received_at: Mapped[CreatedAt]
    mail_from: Mapped[Address]
    rcpt_tos: Mapped[list[str]] = mapped_column(sa.JSON)
    kind: Mapped[str] = mapped_column(sa.String(16))  # post, request, join, leave, owner, ...
    state: Mapped[InboundState] = mapped_column(default=InboundState.PENDING)
    peer: Mapped[str] = mapped_column(sa.String(100), default="")
    raw: Mapped[bytes] = mapped_column(sa.LargeBinary)


class Post(Base):
    __tablename__ = "posts"
    __table_args__ = (
        sa.Index("ix_posts_state", "state"),
        sa.Index("ix_posts_report", "state", "reported_at"),
        sa.Index("ix_posts_followup", "followup_due_at"),
        NO_REUSE,
    )

    id: Mapped[IntPK]
    list_id: Mapped[int] = mapped_column(sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"))
    #: None for notices the server writes itself
    inbound_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("inbound_messages.id", ondelete="CASCADE"), default=None
    )
    state: Mapped[PostState]
    audience: Mapped[Audience] = mapped_column(default=Audience.MEMBERS)
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    sender: Mapped[Address]
    subject: Mapped[str] = mapped_column(sa.Text, default="")
    message_id: Mapped[str] = mapped_column(sa.Text, default="")
    envelope_from: Mapped[Address] = mapped_column(default="")
    prepared: Mapped[bytes | None] = mapped_column(sa.LargeBinary, default=None)
    recipient_count: Mapped[int] = mapped_column(default=0)
    #: how it was rendered when queued (mode and list values): a setting changed while
    #: batches wait must not change what they send (foundation review)
    delivery_mode: Mapped[DeliveryMode | None] = mapped_column(default=None)
    render: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    #: a notice's recipients (audience notice)
    notice_to: Mapped[list[str] | None] = mapped_column(sa.JSON, default=None)
    #: an approved post is not queued before this time ("approve at ...")
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    decided_by: Mapped[str] = mapped_column(sa.String(320), default="")
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[CreatedAt]
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    #: `queue pause`: its batches are not claimed (those in flight finish) until resumed
    paused: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    # -- delivery reports (reports.py) --
    #: when the delivery report was queued, or found not owed (a notice, reports off,
    #: nobody to tell): set once, by a conditional UPDATE, with the notices it queues
    reported_at: Mapped[datetime | None] = mapped_column(default=None)
    #: the report window's end: bounces until then make a follow-up (None: none owed)
    followup_due_at: Mapped[datetime | None] = mapped_column(default=None)
    #: when a follow-up report was queued (None: none, or no bounce in the window)
    followup_sent_at: Mapped[datetime | None] = mapped_column(default=None)
    # -- the recipients' snapshot, written in committed chunks (distribute/posts.py) --
    #: true while it is being written: batches written so far go out, the post is not
    #: finished and `recipient_count` is not final
    snapshotting: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    #: the last member address (lower-cased) the snapshot has written: where it resumes
    snapshot_after: Mapped[str | None] = mapped_column(sa.String(320), default=None)
    #: the worker writing it, and until when (database clock) it may: a claim
    snapshot_owner: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    snapshot_expires_at: Mapped[datetime | None] = mapped_column(default=None)


class DeliveryBatch(Base):
    """Recipients of one post at one domain, sent in one SMTP transaction."""

    __tablename__ = "delivery_batches"
    __table_args__ = (
        sa.Index("ix_delivery_batches_due", "state", "next_attempt_at"),
        sa.Index("ix_delivery_batches_post", "post_id", "state"),
        NO_REUSE,
    )

    id: Mapped[IntPK]
    post_id: Mapped[int] = mapped_column(sa.ForeignKey("posts.id", ondelete="CASCADE"))
    domain: Mapped[str] = mapped_column(sa.String(255))
    state: Mapped[BatchState] = mapped_column(default=BatchState.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    #: new for every claim: completing, renewing or releasing needs owner and token
    claim_token: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    last_error: Mapped[str] = mapped_column(sa.Text, default="")
    created_at: Mapped[CreatedAt]


class Delivery(Base):
    """One recipient of one post, with its latest outcome."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.Index("ix_deliveries_batch", "batch_id", "state"),
        sa.Index("ix_deliveries_post", "post_id", "state"),
        NO_REUSE,
    )

    id: Mapped[IntPK]
    batch_id: Mapped[int] = mapped_column(sa.ForeignKey("delivery_batches.id", ondelete="CASCADE"))
    post_id: Mapped[int] = mapped_column(sa.ForeignKey("posts.id", ondelete="CASCADE"))
    address: Mapped[Address]
    state: Mapped[RecipientState] = mapped_column(default=RecipientState.PENDING)
    code: Mapped[int | None] = mapped_column(default=None)
    detail: Mapped[str] = mapped_column(sa.Text, default="")
    updated_at: Mapped[datetime | None] = mapped_column(default=None)


class ThrottleBucket(Base):
    """Shared state of one throttle key (distribute/throttle.py): a token bucket, the
    adaptive rate factor and a pause. The row keyed ``*messages`` always exists: every
    transaction that reads or writes buckets locks it first, so the rows never race."""

    __tablename__ = "throttle_buckets"
    __table_args__ = (sa.UniqueConstraint("key"), NO_REUSE)

    id: Mapped[IntPK]
    #: "*messages", "*recipients", or a destination domain (a provider's, for aliases)
    key: Mapped[str] = mapped_column(sa.String(255))
    #: tokens at `updated_at` (negative: a batch bigger than the bucket was let through)
    tokens: Mapped[float] = mapped_column(sa.Float, default=0.0)
    updated_at: Mapped[datetime]
    #: share of the configured rate in force (1: full; halved on 421/451 or drops)
    factor: Mapped[float] = mapped_column(sa.Float, default=1.0)
    #: when `factor` last changed: additive steps back are counted from it
    changed_at: Mapped[datetime | None] = mapped_column(default=None)
    #: no batch for the domain is claimed before this (it refused most of a batch)
    paused_until: Mapped[datetime | None] = mapped_column(default=None)
    #: the reply that caused the last slow-down or pause, for `queue status`
    note: Mapped[str] = mapped_column(sa.Text, default="")


class Token(Base):
    """A secret mailed to someone (in NAME-confirm+TOKEN@): only its hash is stored."""

    __tablename__ = "tokens"
    __table_args__ = (sa.UniqueConstraint("digest"), NO_REUSE)

    id: Mapped[IntPK]
    digest: Mapped[str] = mapped_column(sa.String(64))  # sha256 hex of the token
    kind: Mapped[TokenKind]
    list_id: Mapped[int] = mapped_column(sa.ForeignKey("mailing_lists.id", ondelete="CASCADE"))
    post_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("posts.id", ondelete="CASCADE"), default=None
    )
    address: Mapped[Address] = mapped_column(default="")  # whom it was sent to
    payload: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    created_at: Mapped[CreatedAt]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEntry(Base):
    """Who changed what, from the CLI or by e-mail."""

    __tablename__ = "audit_log"
    __table_args__ = (NO_REUSE,)

    id: Mapped[IntPK]
    at: Mapped[CreatedAt]
    actor: Mapped[str] = mapped_column(sa.String(320))
    action: Mapped[str] = mapped_column(sa.String(64))
    list_address: Mapped[str] = mapped_column(sa.String(320), default="")
    detail: Mapped[str] = mapped_column(sa.Text, default="")
