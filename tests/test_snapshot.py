"""The recipients of a members' post are snapshotted in committed chunks: batches go
out while it runs, a crash or a second daemon neither loses nor repeats anyone.
SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from datetime import timedelta
from pathlib import Path

import aiosmtplib
import pytest
import sqlalchemy as sa
from conftest import make_list, message, settings_for
from sink import Sink
from test_crash import free_port, serve, wait_for_port, wait_until_sent
from test_queue import POLICY, _accepted_post, _delivered, _done

from listserv import lists, members
from listserv.db import Database
from listserv.distribute import batches, dispatcher, posts, prepare, scheduler, status
from listserv.models import Delivery, DeliveryBatch, DeliveryMode, Post, PostState

LEASE = timedelta(minutes=5)
SENDER = "boss@example.org"


def _start(db: Database, post_id: int, worker: str = "w1") -> bool:
    with db.session() as s:
        return (
            posts.start_snapshot(
                s,
                post_id,
                worker=worker,
                lease=LEASE,
                prepared=b"msg",
                envelope_from="staff-bounces@lists.example.org",
                delivery_mode=DeliveryMode.SHARED,
                render=None,
            )
            is not None
        )


def _chunk(
    db: Database, post_id: int, worker: str = "w1", rows: int = 4, per_batch: int = 2
) -> posts.Chunk:
    with db.session() as s:
        return posts.snapshot_chunk(
            s, post_id, worker=worker, lease=LEASE, max_per_batch=per_batch, rows=rows
        )


def _addresses(db: Database, post_id: int) -> list[str]:
    with db.reading() as s:
        return list(s.scalars(sa.select(Delivery.address).where(Delivery.post_id == post_id)))


def _post(db: Database, post_id: int) -> Post:
    with db.reading() as s:
        return s.get_one(Post, post_id)


def _list_with(db: Database, addresses: list[str]) -> tuple[str, int]:
    address = make_list(db, members_=addresses)
    return address, _accepted_post(db, address)


MEMBERS = [f"u{i:02d}@d{i % 3}.example" for i in range(15)]


def test_batches_are_claimable_after_the_first_chunk(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id)
    first = _chunk(db, post_id)
    assert not first.done and first.batches >= 1
    with db.session() as s:
        claimed = batches.claim_batches(s, worker="sender", lease=LEASE, limit=50)
    assert [b.post_id for b in claimed] == [post_id] * first.batches
    # all that is written so far is delivered: the post is not finished, the total not final
    with db.session() as s:
        batches.record(
            s, [_done(b, _delivered(b)) for b in claimed], worker="sender", policy=POLICY
        )
    post = _post(db, post_id)
    assert post.state is PostState.SENDING and post.snapshotting
    with db.reading() as s:
        (row,) = [p for p in status.status(s) if p.post_id == post_id]
    assert row.snapshotting and row.recipients == first.recipients < len(MEMBERS)
    while not (chunk := _chunk(db, post_id)).done:
        assert not chunk.lost
    assert sorted(_addresses(db, post_id)) == sorted(MEMBERS)
    assert _post(db, post_id).state is PostState.SENDING  # the rest is still to send


def test_the_last_chunk_finishes_a_post_whose_batches_all_went_out(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS[:5])
    assert _start(db, post_id)
    rounds = 0
    while True:
        chunk = _chunk(db, post_id, rows=2, per_batch=1)
        with db.session() as s:
            got = batches.claim_batches(s, worker="sender", lease=LEASE, limit=50)
            batches.record(
                s, [_done(b, _delivered(b)) for b in got], worker="sender", policy=POLICY
            )
        rounds += 1
        if chunk.done:
            break
        assert _post(db, post_id).state is PostState.SENDING
    assert rounds > 2
    post = _post(db, post_id)
    assert post.state is PostState.SENT and post.recipient_count == 5 and not post.snapshotting


def test_chunks_end_on_batch_boundaries_and_write_everyone_once(db: Database) -> None:
    addrs = [f"m{i:03d}@big.example" for i in range(23)] + ["Solo@one.example", "solo@ONE.example"]
    _, post_id = _list_with(db, addrs)
    assert _start(db, post_id)
    while not _chunk(db, post_id, rows=7, per_batch=5).done:
        pass
    with db.reading() as s:
        sizes = [
            n
            for (n,) in s.execute(
                sa.select(sa.func.count(Delivery.id))
                .join(DeliveryBatch, DeliveryBatch.id == Delivery.batch_id)
                .where(DeliveryBatch.post_id == post_id)
                .group_by(DeliveryBatch.id)
                .order_by(DeliveryBatch.id)
            )
        ]
    assert sizes == [5, 5, 5, 5, 3, 1]  # as one transaction would cut them
    got = Counter(a.lower() for a in _addresses(db, post_id))
    assert set(got) == {a.lower() for a in addrs} and max(got.values()) == 1


def test_a_chunk_that_ends_on_a_full_batch_writes_it(db: Database) -> None:
    """A full last group cannot grow: it is written, not read again by the next
    chunk (chunks of 1,000 with batches of 500 wrote 500 a chunk)."""
    addrs = [f"m{i:03d}@big.example" for i in range(12)]
    _, post_id = _list_with(db, addrs)
    assert _start(db, post_id)
    chunks = []
    while not (chunk := _chunk(db, post_id, rows=4, per_batch=2)).done:
        chunks.append(chunk.recipients)
    chunks.append(chunk.recipients)
    assert chunks[:3] == [4, 4, 4] and sum(chunks) == 12  # the last one may find no more
    assert sorted(_addresses(db, post_id)) == addrs


def test_a_chunk_rolled_back_by_a_crash_is_written_again_from_the_cursor(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id)
    _chunk(db, post_id)

    class Crash(Exception):
        pass

    with pytest.raises(Crash), db.session() as s:  # the process dies before the commit
        posts.snapshot_chunk(s, post_id, worker="w1", lease=LEASE, max_per_batch=2, rows=4)
        raise Crash
    while not _chunk(db, post_id).done:
        pass
    got = Counter(_addresses(db, post_id))
    assert set(got) == set(MEMBERS) and max(got.values()) == 1


def test_a_second_worker_neither_starts_nor_writes_a_claimed_snapshot(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id, "w1")
    assert not _start(db, post_id, "w2")  # no longer accepted
    assert _chunk(db, post_id, "w2").lost
    with db.session() as s:  # w1 lives and its claim runs: not taken over
        assert not posts.adopt_snapshot(s, post_id, worker="w2", lease=LEASE, alive=lambda w: True)
    _chunk(db, post_id, "w1")
    with db.session() as s:  # w1 died (its liveness lock is free): taken over
        assert posts.open_snapshots(s, but="w2") == [post_id]
        assert posts.adopt_snapshot(s, post_id, worker="w2", lease=LEASE, alive=lambda w: False)
    assert _chunk(db, post_id, "w1").lost  # had it lived on, it could not write any more
    while not _chunk(db, post_id, "w2").done:
        pass
    got = Counter(_addresses(db, post_id))
    assert set(got) == set(MEMBERS) and max(got.values()) == 1


def test_a_snapshot_let_go_at_a_stop_is_resumed_by_anyone(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id, "w1")
    _chunk(db, post_id, "w1")
    with db.session() as s:
        assert posts.release_snapshots(s, worker="w1") == 1
    with db.session() as s:  # alive, but it let go
        assert posts.adopt_snapshot(s, post_id, worker="w2", lease=LEASE, alive=lambda w: True)
    while not _chunk(db, post_id, "w2").done:
        pass
    assert sorted(_addresses(db, post_id)) == sorted(MEMBERS)


def test_members_changed_between_chunks_are_never_written_twice(db: Database) -> None:
    address, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id)
    _chunk(db, post_id)  # d0's first members
    with db.session() as s:
        mlist = lists.get(s, address)
        members.add(s, mlist, ["a-early@d0.example", "z-late@d2.example"])
        members.remove(s, mlist, ["u14@d2.example"])
    while not _chunk(db, post_id).done:
        pass
    got = Counter(_addresses(db, post_id))
    assert max(got.values()) == 1
    assert "z-late@d2.example" in got and "u14@d2.example" not in got  # the cursor had not passed
    assert set(got) - {"z-late@d2.example", "a-early@d0.example"} == set(MEMBERS) - {
        "u14@d2.example"
    }
    assert _post(db, post_id).recipient_count == len(got)


def test_a_cancel_stops_the_snapshot(db: Database) -> None:
    _, post_id = _list_with(db, MEMBERS)
    assert _start(db, post_id)
    _chunk(db, post_id)
    with db.session() as s:
        batches.cancel(s, post_id, actor="admin")
    assert _chunk(db, post_id).lost
    post = _post(db, post_id)
    assert post.state is PostState.CANCELLED and not post.snapshotting


def test_a_post_to_two_lists_waits_for_the_other_snapshot(db: Database) -> None:
    from listserv.models import InboundMessage

    one = make_list(db, "one@lists.example.org", members_=MEMBERS)
    two = make_list(db, "two@lists.example.org", members_=[*MEMBERS[:5], "x@d9.example"])
    with db.session() as s:
        inbound = InboundMessage(
            mail_from="x@example.org", rcpt_tos=[one, two], kind="post", raw=b"x"
        )
        s.add(inbound)
        s.flush()
        ids = []
        for address in (one, two):
            p = Post(
                list_id=lists.get(s, address).id,
                inbound_id=inbound.id,
                state=PostState.ACCEPTED,
                sender="x",
            )
            s.add(p)
            s.flush()
            ids.append(p.id)
    first, second = ids
    assert _start(db, first)
    _chunk(db, first)
    with db.reading() as s:
        assert posts.accepted_posts(s) == []  # the second waits
    assert not _start(db, second, "w2")
    while not _chunk(db, first).done:
        pass
    with db.reading() as s:
        assert posts.accepted_posts(s) == [second]
    assert _start(db, second, "w2")
    with db.session() as s:
        skip = posts.sibling_addresses(s, second)
        chunk = posts.snapshot_chunk(
            s, second, worker="w2", lease=LEASE, max_per_batch=5, rows=100, skip=skip
        )
    assert chunk.done and _addresses(db, second) == ["x@d9.example"]


# -- a real daemon killed with SIGKILL during the snapshot ---------------------------------

BIG = [f"k{i:04d}@d{i % 7}.example" for i in range(1500)]


async def test_sigkill_during_the_snapshot_delivers_everyone_once_after_a_restart(
    db: Database, db_url: str, sink: Sink, tmp_path: Path
) -> None:
    make_list(db, members_=BIG, senders=[SENDER])
    port = free_port()
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\nmax_connections = 2\n'
        "max_recipients_per_message = 10\npoll_interval = 0.1\nretry_initial = 0.2\n"
        "snapshot_chunk = 10\nreports = false\n"
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )

    def progress() -> tuple[bool, int]:
        with db.reading() as s:
            row = s.execute(sa.select(Post.snapshotting, Post.recipient_count)).one_or_none()
        return (False, 0) if row is None else (bool(row[0]), int(row[1]))

    first = serve(config)
    try:
        await wait_for_port(port, first)
        await aiosmtplib.send(
            message(
                f"""
                From: {SENDER}
                To: staff@lists.example.org
                Subject: a big one

                For all of you.
                """
            ),
            sender=SENDER,
            recipients=["staff@lists.example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=10,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await asyncio.to_thread(progress))[1] < 300:
            assert loop.time() < deadline, "the snapshot did not start"
            await asyncio.sleep(0.01)
        await sink.wait_for_recipients(1, timeout=20)  # batches went out during the snapshot
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert first.stderr is not None
        first.stderr.close()
    snapshotting, written = await asyncio.to_thread(progress)
    assert snapshotting and written < len(BIG), "the kill came too late to prove anything"

    second = serve(config)
    try:
        await sink.wait_for_recipients(len(BIG), timeout=60)
        await wait_until_sent(db_url, timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(second.communicate, timeout=30)
    assert second.returncode == 0, err.decode()
    with db.reading() as s:
        rows = Counter(s.scalars(sa.select(Delivery.address)))
        post = s.scalars(sa.select(Post)).one()
    assert set(rows) == set(BIG) and max(rows.values()) == 1  # snapshotted once each
    assert post.recipient_count == len(BIG) and not post.snapshotting
    counts = Counter(sink.recipients())
    assert set(counts) == set(BIG)
    # at-least-once: only the batches leased at the kill (2 connections, 10 each) come twice
    assert sum(counts.values()) - len(BIG) <= dispatcher.LEASED_PER_CONNECTION * 2 * 10


_FAIL_BATCHES = {
    "sqlite": [
        "CREATE TABLE fail_batches (x INTEGER)",
        "CREATE TRIGGER fail_batch BEFORE INSERT ON delivery_batches"
        " WHEN EXISTS (SELECT 1 FROM fail_batches)"
        " BEGIN SELECT RAISE(ABORT, 'no room for batches'); END",
    ],
    "postgresql": [
        "CREATE TABLE fail_batches (x INTEGER)",
        "CREATE FUNCTION fail_batch() RETURNS trigger AS $$ BEGIN"
        " IF EXISTS (SELECT 1 FROM fail_batches) THEN RAISE EXCEPTION 'no room for batches';"
        " END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_batch BEFORE INSERT ON delivery_batches"
        " FOR EACH ROW EXECUTE FUNCTION fail_batch()",
    ],
}


def test_a_post_whose_first_chunk_fails_is_started_and_its_snapshot_goes_on(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    # start_post writes the post's start and its first chunk in two transactions (each
    # holds SQLite's write lock for less): the start stands when the chunk fails
    _, post_id = _list_with(db, MEMBERS)
    with db.session() as s:
        for statement in _FAIL_BATCHES[s.get_bind().dialect.name]:
            s.execute(sa.text(statement))
        s.execute(sa.text("INSERT INTO fail_batches VALUES (1)"))
    settings = settings_for(db_url, free_port(), tmp_path, delivery__snapshot_chunk=4)
    queued = prepare.start_post(db, settings, post_id, worker="w1")
    assert queued is not None and not queued.done and queued.batches == 0
    post = _post(db, post_id)
    assert post.state is PostState.SENDING and post.snapshotting
    assert post.snapshot_owner == "w1" and post.snapshot_after is None
    assert _addresses(db, post_id) == []

    with db.session() as s:
        s.execute(sa.text("DELETE FROM fail_batches"))
    while not (
        chunk := prepare.continue_post(db, settings, post_id, worker="w1", skip=queued.skip)
    ).done:
        assert not chunk.lost
    assert sorted(_addresses(db, post_id)) == sorted(MEMBERS)
    assert _post(db, post_id).recipient_count == len(MEMBERS)


async def test_a_backlog_of_new_posts_does_not_hold_up_an_open_snapshot(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # while a snapshot is open the scheduler starts new posts for START_SLICE at most
    # before its next chunk; with no slice, the first chunk was followed by every post of
    # the backlog (20 a round, each about 10 ms, far more under load) before the second
    monkeypatch.setattr(scheduler, "START_SLICE", 0.0)  # one new post, then a chunk
    _, big = _list_with(db, MEMBERS)
    small = make_list(db, "small@lists.example.org", members_=["s@d0.example"])
    smalls = [_accepted_post(db, small) for _ in range(8)]
    settings = settings_for(db_url, free_port(), tmp_path, delivery__snapshot_chunk=3)
    stop, wake = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        scheduler.run(db, settings, wake=wake, stop=stop, on_queued=lambda: None, worker="w1")
    )
    try:
        for _ in range(500):
            with db.reading() as s:
                states = s.execute(sa.select(Post.state, Post.snapshotting)).all()
            if all(state is PostState.SENDING and not snap for state, snap in states):
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    with db.reading() as s:
        rows = s.execute(sa.select(Delivery.id, Delivery.post_id)).all()
    assert sorted(p for _, p in rows) == sorted([big] * len(MEMBERS) + smalls)
    last_of_big = max(i for i, p in rows if p == big)
    # the big post's 15 members, three a chunk, were all written before the last small
    # posts of the backlog were started
    assert sum(1 for i, p in rows if p != big and i > last_of_big) >= 2
