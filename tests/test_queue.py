"""The delivery queue's storage verbs on real databases: claims, fencing, results,
liveness, ids. SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from conftest import make_list

from listserv import config, lists, members
from listserv.db import Database
from listserv.distribute import batches, posts, status
from listserv.distribute.batches import ClaimedBatch, End, Report
from listserv.distribute.liveness import Liveness
from listserv.distribute.results import RecipientResult
from listserv.models import (
    BatchState,
    Delivery,
    DeliveryBatch,
    DeliveryMode,
    InboundMessage,
    MailingList,
    Member,
    Post,
    PostState,
    RecipientState,
    Role,
)

POLICY = config.DeliverySettings(retry_initial=60, retry_factor=2, retry_give_up_after=3600)
MINUTE = timedelta(minutes=1)


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
        post = posts.lock_accepted_post(s, post_id)
        assert post is not None
        rcpts = posts.recipients(s, post.list_id)
        posts.enqueue(
            s,
            post,
            prepared=b"msg",
            envelope_from="b@x.org",
            delivery_mode=DeliveryMode.SHARED,
            render=None,
            addresses=rcpts,
            max_per_batch=per_batch,
        )
    return post_id


def _claim(
    db: Database, worker: str, lease: timedelta = MINUTE, limit: int = 1
) -> list[ClaimedBatch]:
    with db.session() as s:
        return batches.claim_batches(s, worker=worker, lease=lease, limit=limit)


def _record(db: Database, worker: str, *reports: Report) -> list[BatchState | None]:
    with db.session() as s:
        return batches.record(s, reports, worker=worker, policy=POLICY)


def _delivered(batch: ClaimedBatch) -> list[RecipientResult]:
    return [
        RecipientResult(rid, RecipientState.DELIVERED, 250, "ok") for rid, _ in batch.recipients
    ]


def _done(batch: ClaimedBatch, results: list[RecipientResult]) -> Report:
    return Report(batch, results, End.DONE, batches.open_after(batch, results))


def _delivery_states(db: Database) -> dict[str, RecipientState]:
    with db.reading() as s:
        return {a: st for a, st in s.execute(sa.select(Delivery.address, Delivery.state))}


def test_snapshot_groups_by_domain_with_a_size_limit(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 10, per_batch=3)
    with db.reading() as s:
        rows = s.execute(
            sa.select(DeliveryBatch.domain, sa.func.count(Delivery.id))
            .join(Delivery, Delivery.batch_id == DeliveryBatch.id)
            .group_by(DeliveryBatch.id, DeliveryBatch.domain)
            .order_by(DeliveryBatch.id)
        ).all()
        post = s.get(Post, post_id)
    assert [tuple(b) for b in rows] == [
        ("d0.example", 3),
        ("d0.example", 2),
        ("d1.example", 3),
        ("d1.example", 2),
    ]
    assert post is not None and post.state is PostState.SENDING and post.recipient_count == 10
    assert post.delivery_mode is DeliveryMode.SHARED and post.queued_at is not None
    with db.session() as s:
        assert posts.lock_accepted_post(s, post_id) is None  # queued once only


def test_concurrent_claims_never_share_a_batch(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 60, per_batch=2)  # 30 batches
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        while got := _claim(db, f"w{n}"):
            with lock:
                claimed.extend(b.id for b in got)

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
    [first] = _claim(db, "a", lease=timedelta(seconds=-1))
    assert first.attempts == 1
    [again] = _claim(db, "b", lease=timedelta(minutes=5))
    assert again.id == first.id and again.attempts == 2 and again.token != first.token
    assert _claim(db, "c") == []


def test_a_stale_claim_cannot_record_renew_or_hand_back(db: Database) -> None:
    """Worker a's lease ran out and b took the batch over: whatever a still does is
    dropped, and b's results stand."""
    address = make_list(db)
    post_id = _queue(db, address, 2, per_batch=10)  # d0: u0 ; d1: u1
    [stale] = _claim(db, "a", lease=timedelta(seconds=-1))
    [fresh] = _claim(db, "b")
    assert fresh.id == stale.id
    failed = [
        RecipientResult(rid, RecipientState.FAILED, 550, "a says no") for rid, _ in stale.recipients
    ]
    assert _record(db, "a", _done(stale, failed)) == [None]
    assert _record(db, "a", Report(stale, (), End.HANDED_BACK)) == [None]
    with db.session() as s:
        assert batches.renew_leases(s, [stale], worker="a", lease=MINUTE) == set()
        assert batches.renew_leases(s, [fresh], worker="b", lease=MINUTE) == {fresh.id}
    assert set(_delivery_states(db).values()) == {RecipientState.PENDING}
    assert _record(db, "b", _done(fresh, _delivered(fresh))) == [BatchState.DONE]
    states = _delivery_states(db)
    done_address = fresh.recipients[0][1]
    assert states[done_address] is RecipientState.DELIVERED
    with db.reading() as s:
        assert s.get(Post, post_id).state is PostState.SENDING  # type: ignore[union-attr]


def test_the_same_worker_reclaiming_a_batch_fences_its_own_old_claim(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 1)
    [old] = _claim(db, "a", lease=timedelta(seconds=-1))
    [new] = _claim(db, "a")
    assert _record(db, "a", _done(old, _delivered(old))) == [None]
    assert _record(db, "a", _done(new, _delivered(new))) == [BatchState.DONE]


def test_progress_is_recorded_while_the_batch_stays_leased(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 4, per_batch=10)  # d0: u0, u2 ; d1: u1, u3
    [batch] = _claim(db, "w")
    first, second = _delivered(batch)
    assert _record(db, "w", Report(batch, [first])) == [BatchState.LEASED]
    assert list(_delivery_states(db).values()).count(RecipientState.DELIVERED) == 1
    assert _claim(db, "x", lease=MINUTE) != [batch]  # still leased to w
    report = Report(batch, [second], End.DONE, batches.open_after(batch, [first, second]))
    assert _record(db, "w", report) == [BatchState.DONE]


def test_a_batch_handed_back_keeps_its_results_and_its_attempt(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 4, per_batch=10)
    [batch] = _claim(db, "w")
    first = _delivered(batch)[0]
    assert _record(db, "w", Report(batch, [first], End.HANDED_BACK)) == [BatchState.PENDING]
    [again] = [b for b in _claim(db, "v", limit=5) if b.id == batch.id]
    assert again.attempts == 1  # the stop was not an attempt
    assert [rid for rid, _ in again.recipients] == [batch.recipients[1][0]]


def test_results_retry_and_finish(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 3, per_batch=10)  # d0: u0,u2 ; d1: u1
    done_states = []
    for _ in range(2):
        [batch] = _claim(db, "w")
        results = []
        for rid, addr in batch.recipients:
            if addr == "u2@d0.example":
                results.append(RecipientResult(rid, RecipientState.DEFERRED, 451, "later"))
            else:
                results.append(RecipientResult(rid, RecipientState.DELIVERED, 250, "ok"))
        done_states.extend(_record(db, "w", _done(batch, results)))
    assert sorted(s.value for s in done_states if s) == ["done", "pending"]
    with db.reading() as s:
        st = {p.post_id: p for p in status.status(s)}[post_id]
        assert st.counts == {"delivered": 2, "deferred": 1}
        assert st.next_attempt_at is not None
        assert s.get(Post, post_id).state is PostState.SENDING  # type: ignore[union-attr]
    assert _claim(db, "w") == []  # not due yet
    # too old: the retry gives up and the post is finished
    with db.session() as s:
        old = datetime.now(UTC) - timedelta(hours=2)
        s.execute(sa.update(DeliveryBatch).values(created_at=old, next_attempt_at=old))
    [batch] = _claim(db, "w")
    assert [a for _, a in batch.recipients] == ["u2@d0.example"]
    rid = batch.recipients[0][0]
    later = [RecipientResult(rid, RecipientState.DEFERRED, 451, "still later")]
    assert _record(db, "w", _done(batch, later)) == [BatchState.DONE]
    with db.reading() as s:
        post = s.get(Post, post_id)
        failed = s.scalar(sa.select(Delivery).where(Delivery.address == "u2@d0.example"))
    assert post is not None and post.state is PostState.SENT and post.finished_at is not None
    assert failed is not None and failed.state is RecipientState.FAILED
    assert failed.detail.startswith("gave up after 2 attempts")


def test_bulk_claim_and_record_finish_the_post(db: Database) -> None:
    address = make_list(db)
    post_id = _queue(db, address, 9, per_batch=2)  # d0: 5 -> 3 batches, d1: 4 -> 2 batches
    first = _claim(db, "w", limit=3)
    rest = _claim(db, "w", limit=10)
    assert len(first) == 3 and len(rest) == 2
    assert {b.id for b in first}.isdisjoint(b.id for b in rest)
    assert sum(len(b.recipients) for b in first + rest) == 9
    reports = [_done(b, _delivered(b)) for b in first + rest]
    assert _record(db, "w", *reports) == [BatchState.DONE] * 5
    with db.reading() as s:
        post = s.get(Post, post_id)
        assert post is not None and post.state is PostState.SENT
        assert set(s.scalars(sa.select(Delivery.state))) == {RecipientState.DELIVERED}


def test_renewed_lease_is_not_claimable_by_others(db: Database) -> None:
    address = make_list(db)
    _queue(db, address, 1)
    [batch] = _claim(db, "a", lease=timedelta(seconds=-1))
    with db.session() as s:
        assert batches.renew_leases(s, [batch], worker="a", lease=timedelta(minutes=5)) == {
            batch.id
        }
        assert batches.renew_leases(s, [batch], worker="b", lease=timedelta(minutes=5)) == set()
    assert _claim(db, "b") == []


HOLDER = """
import sys
from listserv.db import Database
from listserv.distribute.liveness import Liveness
live = Liveness(Database(sys.argv[1]))
live.hold(sys.argv[2])
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_killed_workers_leases_are_freed_at_once_even_while_it_is_a_zombie(
    db: Database, db_url: str
) -> None:
    address = make_list(db)
    _queue(db, address, 2, per_batch=10)
    worker = "otherhost:4242:dead"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url, worker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        me = Liveness(db)
        me.hold("thishost:1:me")
        assert len(_claim(db, worker, lease=timedelta(hours=1), limit=5)) == 2
        with db.session() as s:
            assert batches.release_dead_leases(s, alive=me.alive, me="thishost:1:me") == 0
        os.kill(child.pid, signal.SIGKILL)  # not reaped: it stays a zombie meanwhile
        deadline = time.monotonic() + 10  # the lease itself runs for an hour
        while me.alive(worker):
            assert time.monotonic() < deadline, "a dead worker still looks alive"
            time.sleep(0.02)
        assert Path(f"/proc/{child.pid}").exists()  # still a zombie
        with db.session() as s:
            assert batches.release_dead_leases(s, alive=me.alive, me="thishost:1:me") == 2
        assert len(_claim(db, "thishost:1:me", limit=5)) == 2
        me.close()


def test_post_ids_are_never_reused_after_a_list_is_deleted(db: Database) -> None:
    first_list = make_list(db, "confidential@lists.example.org")
    other = make_list(db, "other@lists.example.org")
    deleted = _accepted_post(db, first_list)
    with db.session() as s:
        lists.delete(s, lists.get(s, first_list), force=True)
    with db.reading() as s:
        assert s.get(Post, deleted) is None
    assert _accepted_post(db, other) > deleted


def test_every_table_keeps_autoincrement_ids_after_all_migrations(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    db.upgrade()
    with db.engine.connect() as conn:
        tables = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table'"
            " AND name NOT IN ('alembic_version', 'sqlite_sequence')"
        ).all()
    db.dispose()
    assert tables
    assert [name for name, sql in tables if "AUTOINCREMENT" not in sql] == []


def test_upgrade_from_0001_keeps_every_row_and_stops_reusing_ids(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    cfg = db._alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO mailing_lists (id, local_part, domain, posting_policy, delivery_mode,"
            " subject_prefix, description, footer, created_at) VALUES"
            " (1, 'a', 'l.example', 'members', 'personalized', '', '', '', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO inbound_messages (id, received_at, mail_from, rcpt_tos, kind, state,"
            " peer, raw) VALUES (1, '2026-01-01', 'x@e.org', '[]', 'post', 'done', '', x'00')"
        )
        for pid in (1, 2):
            conn.exec_driver_sql(
                "INSERT INTO posts (id, list_id, inbound_id, state, audience, reason, sender,"
                " subject, message_id, envelope_from, prepared, recipient_count, created_at)"
                f" VALUES ({pid}, 1, 1, 'sending', 'members', '', 'x', '', '', 'b@l.example',"
                " x'00', 1, '2026-01-01')"
            )
        conn.exec_driver_sql(
            "INSERT INTO delivery_batches (id, post_id, domain, state, attempts,"
            " next_attempt_at, last_error, created_at)"
            " VALUES (1, 1, 'e.org', 'pending', 0, '2026-01-01', '', '2026-01-01')"
        )
        conn.exec_driver_sql(
            "INSERT INTO deliveries (id, batch_id, post_id, address, state, detail)"
            " VALUES (1, 1, 1, 'm@e.org', 'pending', '')"
        )
        conn.exec_driver_sql("DELETE FROM posts WHERE id = 2")
    db.dispose()
    db = Database(f"sqlite:///{path}")
    before, after = db.upgrade()
    assert (before, after) == ("0001", db.head_revision())
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count(Delivery.id))) == 1
        assert s.scalar(sa.select(sa.func.count(DeliveryBatch.id))) == 1
        mlist = s.get(MailingList, 1)
        assert mlist is not None
        ids = []
        for _ in range(2):
            new = Post(list_id=1, inbound_id=1, state=PostState.ACCEPTED, sender="y")
            s.add(new)
            s.flush()
            ids.append(new.id)
            s.delete(new)
            s.flush()
        assert ids[1] > ids[0] > 1  # a deleted id is not handed out again
        queued = posts.queued_post(s, 1)
    assert queued is not None and queued.delivery_mode is DeliveryMode.PERSONALIZED
    db.dispose()


def test_mixed_domain_batches_are_filled_across_domains_in_domain_order(db: Database) -> None:
    address = make_list(db)
    addrs = [f"u{i}@d{i % 3}.example" for i in range(7)]  # d0: 3, d1: 2, d2: 2
    with db.session() as s:
        members.add(s, lists.get(s, address), addrs)
    post_id = _accepted_post(db, address)
    with db.session() as s:
        post = posts.lock_accepted_post(s, post_id)
        assert post is not None
        n = posts.enqueue(
            s,
            post,
            prepared=b"msg",
            envelope_from="b@x.org",
            delivery_mode=DeliveryMode.SHARED,
            render=None,
            addresses=posts.recipients(s, post.list_id),
            max_per_batch=4,
            mix_domains=True,
        )
    assert n == 2
    with db.reading() as s:
        rows = s.execute(
            sa.select(Delivery.batch_id, Delivery.address).order_by(Delivery.batch_id, Delivery.id)
        ).all()
    first = [a for b, a in rows if b == rows[0][0]]
    second = [a for b, a in rows if b != rows[0][0]]
    assert [a.split("@")[1] for a in first] == ["d0.example"] * 3 + ["d1.example"]
    assert [a.split("@")[1] for a in second] == ["d1.example", "d2.example", "d2.example"]


def test_the_recipient_stream_is_in_domain_order_with_each_address_once(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        mlist = lists.get(s, address)
        members.add(s, mlist, ["b@z.example", "a@y.example", "c@z.example", "b@y.example"])
        # a case variant stored behind the CLI's back must still go out once
        s.add(Member(list_id=mlist.id, address="B@z.example", role=Role.MEMBER))
    with db.reading() as s:
        got = list(posts.recipient_stream(s, lists.get(s, address).id))
    assert [a.lower() for a in got] == ["a@y.example", "b@y.example", "b@z.example", "c@z.example"]
