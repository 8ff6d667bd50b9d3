"""Storage verbs on real databases: SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_list

from listserv import config, lists, members
from listserv.db import Database
from listserv.distribute import queue
from listserv.distribute.queue import RecipientResult
from listserv.errors import AlreadyExists, DatabaseError, InvalidAddress, InvalidInput
from listserv.models import (
    Base,
    BatchState,
    Delivery,
    DeliveryBatch,
    InboundMessage,
    Post,
    PostState,
    RecipientState,
    Role,
)

POLICY = config.DeliverySettings(retry_initial=60, retry_factor=2, retry_give_up_after=3600)


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert db.current_revision() == db.head_revision()


def test_upgrade_is_idempotent(db: Database) -> None:
    head = db.head_revision()
    assert db.upgrade() == (head, head)


def test_uninitialized_database_is_a_clear_error(tmp_path: object) -> None:
    fresh = Database(f"sqlite:///{tmp_path}/none.db")
    with pytest.raises(DatabaseError, match="not initialized: run `listserv init`"):
        fresh.check_ready()


def test_list_names_and_duplicates(db: Database) -> None:
    make_list(db, "Staff@Lists.Example.org")
    with db.session() as s:
        assert lists.get(s, "staff@lists.example.org").subject_prefix == "[staff]"
        with pytest.raises(AlreadyExists):
            lists.create(s, "STAFF@lists.example.org")
        for bad in ("staff-request@lists.example.org", "no at sign", "a b@x.org", "x@localhost"):
            with pytest.raises(InvalidAddress):
                lists.create(s, bad)


def test_settings_are_validated(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        lists.set_setting(s, mlist, "policy", "open")
        assert mlist.posting_policy.value == "open"
        with pytest.raises(InvalidInput, match="not one of"):
            lists.set_setting(s, mlist, "posting_policy", "everyone")
        with pytest.raises(InvalidInput, match="unknown setting"):
            lists.set_setting(s, mlist, "colour", "blue")


def test_members_roles_and_case_insensitive_lookup(db: Database) -> None:
    address = make_list(db, members_=["Ann@One.Example"], senders=["boss@example.org"])
    with db.session() as s:
        mlist = lists.get(s, address)
        added, skipped = members.add(s, mlist, ["ann@one.example", "new@one.example"])
        assert added == ["new@one.example"] and skipped == ["ann@one.example"]
        assert members.roles_of(s, mlist, ["ANN@one.example"]) == {Role.MEMBER}
        assert members.roles_of(s, mlist, ["boss@EXAMPLE.org"]) == {Role.SENDER}
        assert members.roles_of(s, mlist, ["owner@example.org"]) == {Role.OWNER}
        removed, missing = members.remove(s, mlist, ["ann@one.example", "zed@one.example"])
        assert removed == ["ann@one.example"] and missing == ["zed@one.example"]


def test_csv_import_reports_rows_and_is_all_or_nothing_on_fatal_errors(db: Database) -> None:
    address = make_list(db, members_=["dup@one.example"])
    data = (
        b"address,name,role\n"
        b"a@one.example,Ann,member\n"
        b"dup@one.example,,\n"
        b"bad@@x,Bad,member\n"
        b"c@two.example,Cat,chief\n"
        b"a@one.example,Ann again,member\n"
        b"s@two.example,,sender\n"
    )
    with db.session() as s:
        report = members.import_csv(s, lists.get(s, address), data)
    assert report.added == 2
    assert [line for line, _ in report.skipped] == [3, 6]
    assert [line for line, _ in report.invalid] == [4, 5]
    with db.session() as s, pytest.raises(InvalidInput, match="address"):
        members.import_csv(s, lists.get(s, address), b"email,name\nx@one.example,X\n")
    with db.reading() as s:
        assert len(members.roster(s, lists.get(s, address))) == 1 + 2 + 1  # owner counted


def test_large_import_is_bulk(db: Database) -> None:
    address = make_list(db)
    rows = "".join(f"user{i}@d{i % 50}.example,User {i},member\n" for i in range(20000))
    with db.session() as s:
        report = members.import_csv(
            s, lists.get(s, address), ("address,name,role\n" + rows).encode()
        )
    assert report.added == 20000
    with db.reading() as s:
        assert len(queue.recipients(s, lists.get(s, address).id)) == 20000


def _accepted_post(db: Database, address: str) -> int:
    with db.session() as s:
        mlist = lists.get(s, address)
        inbound = InboundMessage(
            mail_from="x@example.org", rcpt_tos=[address], kind="post", raw=b"x"
        )
        s.add(inbound)
        s.flush()
        post = Post(list_id=mlist.id, inbound_id=inbound.id, state=PostState.ACCEPTED, sender="x")
        s.add(post)
        s.flush()
        return post.id


def _queue(db: Database, address: str, n: int, per_batch: int = 3) -> int:
    addrs = [f"u{i}@d{i % 2}.example" for i in range(n)]
    with db.session() as s:
        members.add(s, lists.get(s, address), addrs)
    post_id = _accepted_post(db, address)
    with db.session() as s:
        post = queue.lock_accepted_post(s, post_id)
        assert post is not None
        rcpts = queue.recipients(s, post.list_id)
        queue.enqueue(
            s,
            post,
            prepared=b"msg",
            envelope_from="b@x.org",
            addresses=rcpts,
            max_per_batch=per_batch,
        )
    return post_id


def test_snapshot_groups_by_domain_with_a_size_limit(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 10, per_batch=3)
    with db.reading() as s:
        batches = s.execute(
            sa.select(DeliveryBatch.domain, sa.func.count(Delivery.id))
            .join(Delivery, Delivery.batch_id == DeliveryBatch.id)
            .group_by(DeliveryBatch.id, DeliveryBatch.domain)
            .order_by(DeliveryBatch.id)
        ).all()
        post = s.get(Post, post_id)
    assert [tuple(b) for b in batches] == [
        ("d0.example", 3),
        ("d0.example", 2),
        ("d1.example", 3),
        ("d1.example", 2),
    ]
    assert post is not None and post.state is PostState.SENDING and post.recipient_count == 10
    with db.session() as s:
        assert queue.lock_accepted_post(s, post_id) is None  # queued once only


def test_concurrent_claims_never_share_a_batch(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 60, per_batch=2)  # 30 batches
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        while True:
            with db.session() as s:
                batch = queue.claim_batch(s, worker=f"w{n}", lease=timedelta(minutes=5))
            if batch is None:
                return
            with lock:
                claimed.append(batch.id)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 30
    assert len(set(claimed)) == 30


def test_expired_lease_is_claimable_again_and_live_one_is_not(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 1)
    with db.session() as s:
        first = queue.claim_batch(s, worker="a", lease=timedelta(seconds=-1))
    assert first is not None and first.attempts == 1
    with db.session() as s:
        again = queue.claim_batch(s, worker="b", lease=timedelta(minutes=5))
    assert again is not None and again.id == first.id and again.attempts == 2
    with db.session() as s:
        assert queue.claim_batch(s, worker="c", lease=timedelta(minutes=5)) is None


def test_dead_local_worker_leases_are_released(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 1)
    dead = queue.worker_id(0).rsplit(":", 2)[0] + ":999999999:0"  # no such pid
    with db.session() as s:
        assert queue.claim_batch(s, worker=dead, lease=timedelta(hours=1)) is not None
    with db.session() as s:
        assert queue.release_dead_local_leases(s) == 1
    with db.session() as s:
        assert queue.claim_batch(s, worker="x", lease=timedelta(minutes=1)) is not None


def test_results_retry_and_finish(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 3, per_batch=10)  # d0: u0,u2 ; d1: u1
    done_states = []
    for _ in range(2):
        with db.session() as s:
            batch = queue.claim_batch(s, worker="w", lease=timedelta(minutes=1))
        assert batch is not None
        results = []
        for rid, addr in batch.recipients:
            if addr == "u2@d0.example":
                results.append(RecipientResult(rid, RecipientState.DEFERRED, 451, "later"))
            else:
                results.append(RecipientResult(rid, RecipientState.DELIVERED, 250, "ok"))
        with db.session() as s:
            done_states.append(queue.complete_batch(s, batch, results, POLICY))
    assert sorted(done_states) == [BatchState.DONE, BatchState.PENDING]
    with db.reading() as s:
        status = {p.post_id: p for p in queue.status(s)}[post_id]
        assert status.counts == {"delivered": 2, "deferred": 1}
        assert status.next_attempt_at is not None
        assert s.get(Post, post_id).state is PostState.SENDING  # type: ignore[union-attr]
    # not due yet
    with db.session() as s:
        assert queue.claim_batch(s, worker="w", lease=timedelta(minutes=1)) is None
    # too old: the retry gives up and the post is finished
    with db.session() as s:
        old = queue.utcnow() - timedelta(hours=2)
        s.execute(sa.update(DeliveryBatch).values(created_at=old, next_attempt_at=old))
    with db.session() as s:
        batch = queue.claim_batch(s, worker="w", lease=timedelta(minutes=1))
        assert batch is not None and [a for _, a in batch.recipients] == ["u2@d0.example"]
    with db.session() as s:
        rid = batch.recipients[0][0]
        state = queue.complete_batch(
            s, batch, [RecipientResult(rid, RecipientState.DEFERRED, 451, "still later")], POLICY
        )
    assert state is BatchState.DONE
    with db.reading() as s:
        post = s.get(Post, post_id)
        failed = s.scalar(sa.select(Delivery).where(Delivery.address == "u2@d0.example"))
    assert post is not None and post.state is PostState.SENT and post.finished_at is not None
    assert failed is not None and failed.state is RecipientState.FAILED
    assert failed.detail.startswith("gave up after 2 attempts")


def test_bulk_claim_and_record_finish_the_post(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 9, per_batch=2)  # d0: 5 -> 3 batches, d1: 4 -> 2 batches
    with db.session() as s:
        first = queue.claim_batches(s, worker="w", lease=timedelta(minutes=1), limit=3)
        rest = queue.claim_batches(s, worker="w", lease=timedelta(minutes=1), limit=10)
    assert len(first) == 3 and len(rest) == 2
    assert {b.id for b in first}.isdisjoint(b.id for b in rest)
    assert sum(len(b.recipients) for b in first + rest) == 9
    finished = [
        (b, [RecipientResult(rid, RecipientState.DELIVERED, 250, "ok") for rid, _ in b.recipients])
        for b in first + rest
    ]
    with db.session() as s:
        assert queue.complete_batches(s, finished, POLICY) == [BatchState.DONE] * 5
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None and post.state is PostState.SENT
        assert set(s.scalars(sa.select(Delivery.state))) == {RecipientState.DELIVERED}


def test_renewed_lease_is_not_claimable_by_others(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 1)
    with db.session() as s:
        batch = queue.claim_batch(s, worker="a", lease=timedelta(seconds=-1))
    assert batch is not None
    with db.session() as s:
        assert queue.renew_leases(s, [batch.id], worker="a", lease=timedelta(minutes=5)) == 1
        assert queue.renew_leases(s, [batch.id], worker="b", lease=timedelta(minutes=5)) == 0
    with db.session() as s:
        assert queue.claim_batch(s, worker="b", lease=timedelta(minutes=5)) is None
