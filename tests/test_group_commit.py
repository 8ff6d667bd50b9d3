"""Group commit (smtp_in/commit.py): concurrent sessions share one durable commit,
a bad message fails alone, and a daemon killed with SIGKILL has every message it
answered 250 for."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import aiosmtplib
import pytest
import sqlalchemy as sa
from conftest import make_list, message
from sqlalchemy.orm import Session
from test_crash import free_port, serve, wait_for_port

from listserv.db import Database, insert_ids
from listserv.models import AuditEntry, InboundMessage, Post
from listserv.smtp_in import intake
from listserv.smtp_in.commit import GroupCommit

SENDER = "boss@example.org"
LIST = "staff@lists.example.org"


class Writer:
    """write_many for the tests: one audit row per item; the first call waits until
    `others` more items are queued, so the second commit must take them all at once."""

    def __init__(self, others: int) -> None:
        self.others = others
        self.calls: list[list[str]] = []
        self.committer: GroupCommit[str, int] | None = None

    def __call__(self, session: Session, items: Sequence[str]) -> list[int]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            assert self.committer is not None
            while len(self.committer._pending) < self.others:  # state, not a clock
                time.sleep(0.001)
        ids: list[int] = []
        for item in items:
            if item == "bad":
                raise ValueError("a message that cannot be stored")
            ids.append(
                session.execute(
                    sa.insert(AuditEntry).returning(AuditEntry.id),
                    {"actor": item, "action": "test", "detail": ""},
                ).scalar_one()
            )
        return ids


def run_all(committer: GroupCommit[str, int], items: list[str]) -> dict[str, int | Exception]:
    """The first item alone, then the others while its commit is held open."""
    results: dict[str, int | Exception] = {}

    def one(item: str) -> None:
        try:
            results[item] = committer.run(item)
        except Exception as exc:
            results[item] = exc

    first = threading.Thread(target=one, args=(items[0],))
    first.start()
    while not getattr(committer.write_many, "calls", None):
        time.sleep(0.001)
    rest = [threading.Thread(target=one, args=(item,)) for item in items[1:]]
    for thread in rest:
        thread.start()
    for thread in [first, *rest]:
        thread.join()
    return results


def stored(db: Database) -> dict[str, int]:
    with db.reading() as session:
        rows = session.execute(
            sa.select(AuditEntry.actor, AuditEntry.id).where(AuditEntry.action == "test")
        )
        return {actor: id_ for actor, id_ in rows}


def test_messages_waiting_share_one_commit(db: Database) -> None:
    items = [f"m{i}" for i in range(12)]
    writer = Writer(others=len(items) - 1)
    committer = GroupCommit(db, writer)
    writer.committer = committer
    results = run_all(committer, items)
    assert committer.commits == 2
    assert committer.items == len(items)
    assert sorted(writer.calls[1]) == sorted(items[1:])  # one transaction for all waiting
    assert stored(db) == results  # each caller got its own row's id, and it is there


def test_a_message_that_fails_fails_alone(db: Database) -> None:
    items = ["first", "a", "bad", "b", "c"]
    writer = Writer(others=len(items) - 1)
    committer = GroupCommit(db, writer)
    writer.committer = committer
    results = run_all(committer, items)
    assert isinstance(results.pop("bad"), ValueError)
    assert stored(db) == results
    assert set(results) == {"first", "a", "b", "c"}


def test_the_group_limit_holds(db: Database) -> None:
    items = [f"m{i}" for i in range(9)]
    writer = Writer(others=len(items) - 1)
    committer = GroupCommit(db, writer, max_group=3)
    writer.committer = committer
    run_all(committer, items)
    assert [len(call) for call in writer.calls] == [1, 3, 3, 2]
    assert len(stored(db)) == len(items)


def test_intake_with_a_committer_stores_every_post_of_concurrent_sessions(
    db: Database,
) -> None:
    make_list(db, senders=[SENDER])
    committer = intake.committer(db)
    outcomes: list[intake.Outcome] = []

    def post(i: int) -> None:
        raw = message(
            f"""
            From: {SENDER}
            To: {LIST}
            Subject: news {i}
            Message-ID: <n{i}@example.org>

            Number {i}.
            """
        )
        envelope = intake.Envelope(mail_from=SENDER, rcpt_tos=(LIST,), content=raw)
        outcomes.append(intake.receive(db, envelope, committer=committer))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert committer.items == 16
    assert all(o.reply.code == 250 for o in outcomes)
    ids = [o.accepted_posts[0] for o in outcomes]
    assert len(set(ids)) == 16
    with db.reading() as session:
        posts = {p.id: p for p in session.scalars(sa.select(Post))}
        assert set(posts) == set(ids)
        for outcome in outcomes:
            post = posts[outcome.accepted_posts[0]]
            assert post.inbound_id == outcome.inbound_ids[0]
            number = post.subject.split()[-1]
            raw = session.get_one(InboundMessage, post.inbound_id).raw
            assert f"Number {number}.".encode() in raw
            assert str(outcome.reply).endswith(f"Queued as {post.id}")
        details = session.scalars(
            sa.select(AuditEntry.detail).where(AuditEntry.action == "post.accept")
        ).all()
        assert sorted(int(d.split(":")[0].split()[1]) for d in details) == sorted(ids)


@pytest.mark.parametrize("clients", [12])
async def test_sigkill_never_loses_a_message_answered_250(
    db_url: str, tmp_path: Path, clients: int
) -> None:
    db = Database(db_url)
    make_list(db, senders=[SENDER])
    db.dispose()
    port = free_port()
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[database]\nurl = "{db_url}"\n'
        # nothing listens there: delivery fails and retries, intake goes on
        f'[delivery]\nhost = "127.0.0.1"\nport = {free_port()}\nreports = false\n'
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )
    daemon = serve(config)
    queued: list[int] = []
    enough = asyncio.Event()

    async def client(n: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20)
        await smtp.connect()
        for i in range(1000):
            raw = message(
                f"""
                From: {SENDER}
                To: {LIST}
                Subject: c{n} p{i}

                Body.
                """
            )
            try:
                _, reply = await smtp.sendmail(SENDER, [LIST], raw)
            except (aiosmtplib.SMTPException, OSError):
                return  # the daemon is gone
            queued.append(int(reply.rsplit(" ", 1)[1]))
            if len(queued) >= clients * 5:
                enough.set()

    try:
        await wait_for_port(port, daemon)
        tasks = [asyncio.create_task(client(n)) for n in range(clients)]
        await asyncio.wait_for(enough.wait(), 60)
        os.kill(daemon.pid, signal.SIGKILL)  # while the clients keep sending
        await asyncio.gather(*tasks)
    finally:
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait()
        assert daemon.stderr is not None
        daemon.stderr.close()
    db = Database(db_url)
    try:
        with db.reading() as session:
            kept = set(session.scalars(sa.select(Post.id)))
    finally:
        db.dispose()
    assert len(queued) >= clients * 5
    assert set(queued) <= kept  # every 250 is on disk


@pytest.mark.parametrize("count", [1, 7, 400])
def test_insert_ids_returns_each_rows_id_in_the_rows_order(db: Database, count: int) -> None:
    """db.insert_ids sends SQLite one multi-row INSERT and sorts the ids it
    returns: right only while SQLite inserts the rows in the order written, each
    with a larger id than the last, even after the newest rows were deleted."""

    def row(name: str) -> dict[str, object]:
        return {"mail_from": name, "rcpt_tos": [], "kind": "post", "peer": "", "raw": b""}

    with db.session() as session:
        first = insert_ids(session, InboundMessage, [row(f"old{i}") for i in range(5)])
        session.execute(sa.delete(InboundMessage).where(InboundMessage.id.in_(first[2:])))
    names = [f"m{(i * 7919) % count}-{i}" for i in range(count)]  # not in sorted order
    with db.session() as session:
        ids = insert_ids(session, InboundMessage, [row(n) for n in names])
    assert len(set(ids)) == count and min(ids) > max(first)
    with db.reading() as session:
        found = dict(session.execute(sa.select(InboundMessage.id, InboundMessage.mail_from)).all())
    assert [found[i] for i in ids] == names
