"""Site secrets and recorded unsubscriptions (the storage both one-click, e-mail
commands, sync and bounces build on)."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from conftest import make_list

from listserv import lists, members, sitesecret
from listserv.db import Database
from listserv.models import AuditEntry, Member, Role, SiteSecret, Unsubscription


def test_a_site_secret_is_made_once_and_then_always_the_same(db: Database) -> None:
    with db.session() as session:
        first = sitesecret.get(session, sitesecret.UNSUBSCRIBE)
    with db.session() as session:
        again = sitesecret.get(session, sitesecret.UNSUBSCRIBE)
        other = sitesecret.get(session, sitesecret.VERP)
    assert first == again
    assert len(first) == sitesecret.SECRET_BYTES
    assert other != first  # each purpose has its own key


def test_two_threads_making_the_same_secret_agree(db: Database) -> None:
    seen: list[bytes] = []
    barrier = threading.Barrier(2)

    def make() -> None:
        barrier.wait()
        with db.session() as session:
            seen.append(sitesecret.get(session, "race"))

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and seen[0] == seen[1]
    with db.reading() as session:
        assert session.scalar(sa.select(sa.func.count()).where(SiteSecret.name == "race")) == 1


def test_unsubscribe_removes_only_the_member_row_and_records_it_once(db: Database) -> None:
    address = make_list(db, members_=["Ann@Example.org", "bob@example.org"])
    with db.session() as session:
        mlist = lists.get(session, address)
        members.add(session, mlist, ["ann@example.org"], role=Role.SENDER)
        assert members.unsubscribe(session, mlist, "ANN@example.org", via="one-click") is True
        # idempotent: a second click changes nothing and is not a member any more
        assert members.unsubscribe(session, mlist, "ann@example.org", via="email") is False
    with db.reading() as session:
        mlist = lists.get(session, address)
        rows = session.execute(
            sa.select(Member.address, Member.role).where(Member.list_id == mlist.id)
        ).all()
        assert ("ann@example.org", Role.SENDER) in [(a.lower(), r) for a, r in rows]
        assert all(not (a.lower() == "ann@example.org" and r is Role.MEMBER) for a, r in rows)
        records = session.scalars(sa.select(Unsubscription)).all()
        assert [(r.address, r.via) for r in records] == [("ann@example.org", "one-click")]
        assert members.unsubscribed(session, mlist) == {"ann@example.org"}
        actions = session.scalars(sa.select(AuditEntry.action)).all()
        assert actions.count("members.unsubscribe") == 1


def test_subscribing_again_forgets_the_unsubscription(db: Database) -> None:
    address = make_list(db, members_=["ann@example.org"])
    with db.session() as session:
        mlist = lists.get(session, address)
        members.unsubscribe(session, mlist, "ann@example.org", via="email")
        members.forget_unsubscription(session, mlist, "Ann@example.org")
    with db.reading() as session:
        assert members.unsubscribed(session, lists.get(session, address)) == set()


def test_members_remember_where_they_came_from(db: Database) -> None:
    address = make_list(db, members_=["ann@example.org"])
    with db.session() as session:
        mlist = lists.get(session, address)
        members.add(session, mlist, ["bob@example.org"], source="sync:hr")
    with db.reading() as session:
        sources = dict(session.execute(sa.select(Member.address, Member.source)).all())
    assert sources["ann@example.org"] == "manual"
    assert sources["bob@example.org"] == "sync:hr"
