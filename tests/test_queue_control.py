"""`listserv queue pause|resume|cancel` and `queue status`: end to end against the real
daemon and sink (the CLI run as the operator runs it, in a subprocess), and the CLI's
one-line errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from conftest import make_list
from sink import Sink
from test_e2e import SENDER, post_state, post_text, send, wait_until
from test_queue import _accepted_post

from listserv.cli import cli
from listserv.db import Database, db_now
from listserv.distribute import batches, throttle
from listserv.distribute.results import RecipientResult
from listserv.errors import InvalidInput
from listserv.models import (
    AuditEntry,
    BatchState,
    Delivery,
    DeliveryBatch,
    Post,
    PostState,
    RecipientState,
)

CLI_CONFIG = """
[database]
url = "{url}"
[dkim]
keys_dir = "{keys}"
"""


def write_config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(CLI_CONFIG.format(url=db_url, keys=tmp_path / "dkim"), encoding="utf-8")
    return path


async def listserv(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `listserv` command in a process of its own, as an operator runs it."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "listserv.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def deliveries(db: Database) -> dict[str, tuple[RecipientState, str]]:
    with db.reading() as s:
        rows = s.execute(sa.select(Delivery.address, Delivery.state, Delivery.detail))
        return {a: (st, detail) for a, st, detail in rows}


def leased(db: Database) -> int:
    with db.reading() as s:
        return int(
            s.scalar(
                sa.select(sa.func.count(DeliveryBatch.id)).where(
                    DeliveryBatch.state == BatchState.LEASED
                )
            )
            or 0
        )


def post_id_of(reply: Any) -> int:
    return int(reply[1].rsplit(" ", 1)[1].split(",")[0])


MANY = [f"m{i:02d}@d{i % 3}.example" for i in range(60)]


async def test_pause_stops_a_post_midway_and_resume_sends_the_rest_exactly_once(
    db: Database, db_url: str, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    make_list(db, members_=MANY, senders=[SENDER])
    sink.delay("DATA", 0.2, times=-1)  # 30 batches over one connection: 6 s
    daemon = await daemon_factory(
        delivery__max_recipients_per_message=2, delivery__max_connections=1
    )
    post_id = post_id_of(await send(daemon.port, post_text()))
    config = write_config(tmp_path, db_url)
    await sink.wait_for_messages(3)
    paused = await listserv(config, "queue", "pause", str(post_id))
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.startswith(f"paused post {post_id} to staff@lists.example.org: ")
    await wait_until(lambda: leased(db) == 0)  # what was in flight came back, recorded
    stopped_at = len(sink.received)
    await asyncio.sleep(1.0)  # another second's worth of batches
    assert len(sink.received) == stopped_at  # nothing more went out
    assert sum(1 for r in sink.recipients()) < len(MANY)
    assert post_state(db) is PostState.SENDING
    sent = Counter(sink.recipients())
    recorded = {a for a, (s, _) in deliveries(db).items() if s is RecipientState.DELIVERED}
    assert recorded == set(sent) and max(sent.values()) == 1
    status = await listserv(config, "queue", "status")
    assert status.returncode == 0, status.stderr
    [row] = [line for line in status.stdout.splitlines() if line.startswith(f"{post_id} ")]
    assert row.split()[2] == "paused"
    resumed = await listserv(config, "queue", "resume", str(post_id))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(MANY) - len(recorded)} recipient(s) to go" in resumed.stdout
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=30)
    assert Counter(sink.recipients()) == Counter(MANY)  # the rest, and nobody twice
    with db.reading() as s:
        actions = [a for (a,) in s.execute(sa.select(AuditEntry.action).order_by(AuditEntry.id))]
    assert actions[-2:] == ["post.pause", "post.resume"]


async def test_pause_stops_a_personalized_batch_between_two_messages(
    db: Database, db_url: str, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    many = [f"p{i:02d}@one.example" for i in range(30)]  # one batch, a message each
    make_list(db, members_=many, senders=[SENDER], delivery_mode="personalized")
    sink.delay("DATA", 0.1, times=-1)
    daemon = await daemon_factory(delivery__max_connections=1)
    post_id = post_id_of(await send(daemon.port, post_text()))
    await sink.wait_for_messages(2)
    with db.session() as s:
        batches.pause(s, post_id, actor="test")
    await wait_until(lambda: leased(db) == 0)
    stopped_at = len(sink.received)
    assert stopped_at < len(many)
    await asyncio.sleep(1.0)
    assert len(sink.received) == stopped_at
    with db.session() as s:
        batches.resume(s, post_id, actor="test")
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=30)
    assert Counter(sink.recipients()) == Counter(many)
    with db.reading() as s:
        attempts = s.scalar(sa.select(DeliveryBatch.attempts))
    assert attempts == 1  # the pause handed the batch back: not a failed attempt


async def test_cancel_fails_the_open_recipients_and_finishes_the_post(
    db: Database, db_url: str, sink: Sink, daemon_factory: Any, tmp_path: Path
) -> None:
    make_list(db, members_=MANY, senders=[SENDER])
    sink.delay("DATA", 0.2, times=-1)  # 30 batches over one connection: 6 s
    daemon = await daemon_factory(
        delivery__max_recipients_per_message=2, delivery__max_connections=1
    )
    post_id = post_id_of(await send(daemon.port, post_text()))
    config = write_config(tmp_path, db_url)
    await sink.wait_for_messages(3)
    refused = await listserv(config, "queue", "cancel", str(post_id))  # no terminal, no --yes
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"Error: not cancelling post {post_id}: no terminal to confirm on; pass --yes"
    )
    cancelled = await listserv(config, "queue", "cancel", str(post_id), "--yes")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"cancelled post {post_id} to staff@lists.example.org: ")
    assert post_state(db) is PostState.CANCELLED

    def settled() -> bool:
        with db.reading() as s:
            return not s.scalar(
                sa.select(sa.func.count(DeliveryBatch.id)).where(
                    DeliveryBatch.state != BatchState.DONE
                )
            )

    await wait_until(settled, timeout=20)  # in-flight batches came back and were retired
    stopped_at = len(sink.received)
    await asyncio.sleep(1.0)
    assert len(sink.received) == stopped_at
    states = deliveries(db)
    sent = Counter(sink.recipients())
    delivered = {a for a, (s, _) in states.items() if s is RecipientState.DELIVERED}
    failed = {a for a, (s, d) in states.items() if s is RecipientState.FAILED}
    assert delivered == set(sent) and max(sent.values()) == 1  # each sent once, recorded
    assert failed == set(MANY) - delivered and failed  # everyone else: failed, nobody lost
    assert {states[a][1] for a in failed} == {states[next(iter(failed))][1]}
    assert states[next(iter(failed))][1].startswith("cancelled by cli:")
    status = await listserv(config, "queue", "status")
    assert f"post {post_id} cancelled: cancelled by cli:" in status.stdout
    [row] = [line for line in status.stdout.splitlines() if line.startswith(f"{post_id} ")]
    assert row.split()[2] == "cancelled"
    data = json.loads((await listserv(config, "queue", "status", "--format", "json")).stdout)
    [shown] = [p for p in data["posts"] if p["post_id"] == post_id]
    assert shown["state"] == "cancelled" and shown["failed"] == len(failed)
    assert shown["delivered"] == len(delivered) and shown["waiting"] == 0
    with db.reading() as s:
        entry = s.scalars(sa.select(AuditEntry).order_by(AuditEntry.id.desc())).first()
        post = s.get(Post, post_id)
    assert entry is not None and entry.action == "post.cancel"
    assert entry.actor.startswith("cli:") and f"post {post_id}:" in entry.detail
    assert post is not None and post.finished_at is not None


# -- the CLI's errors and plain status, without a daemon -----------------------------------


@pytest.fixture
def run(db: Database, db_url: str, tmp_path: Path) -> Any:
    config = write_config(tmp_path, db_url)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config), *args])

    return invoke


def one_error(result: Result, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip() == f"Error: {text}"


def _post(db: Database, state: PostState, **values: Any) -> int:
    address = make_list(db) if not _lists(db) else "staff@lists.example.org"
    post_id = _accepted_post(db, address)
    with db.session() as s:
        s.execute(sa.update(Post).where(Post.id == post_id).values(state=state, **values))
    return post_id


def _lists(db: Database) -> int:
    with db.reading() as s:
        return int(s.scalar(sa.text("SELECT count(*) FROM mailing_lists")) or 0)


def test_control_errors_are_one_line(db: Database, run: Any) -> None:
    one_error(
        run("queue", "pause", "999"),
        "no post 999 to pause (the POST column of `listserv queue status`)",
    )
    held = _post(db, PostState.HELD)
    one_error(
        run("queue", "cancel", str(held), "--yes"),
        f"post {held} is held for moderation, not sending: decide it with"
        f" `listserv held reject {held}` or `listserv held approve {held}`",
    )
    sent = _post(db, PostState.SENT)
    one_error(run("queue", "pause", str(sent)), f"post {sent} is sent: nothing to pause")
    sending = _post(db, PostState.SENDING)
    one_error(run("queue", "resume", str(sending)), f"post {sending} is not paused")
    assert run("queue", "pause", str(sending)).exit_code == 0
    one_error(
        run("queue", "pause", str(sending)),
        f"post {sending} is already paused (`listserv queue resume {sending}` resumes it)",
    )
    assert run("queue", "cancel", str(sending), "--yes").exit_code == 0
    one_error(
        run("queue", "resume", str(sending)), f"post {sending} is cancelled: nothing to resume"
    )
    usage = run("queue", "pause", "abc")
    assert usage.exit_code == 2 and "'abc' is not a valid integer" in usage.output


def test_an_accepted_post_cancelled_before_queueing_is_never_queued(db: Database) -> None:
    post_id = _post(db, PostState.ACCEPTED)
    with db.session() as s:
        done = batches.cancel(s, post_id, actor="ops")
    assert done.failed == 0 and done.in_flight == 0
    with db.reading() as s:
        post = s.get(Post, post_id)
    assert post is not None and post.state is PostState.CANCELLED
    assert post.reason == "cancelled by ops"
    with db.session() as s, pytest.raises(InvalidInput, match="is cancelled: nothing to cancel"):
        batches.cancel(s, post_id, actor="ops")


TSS04 = "4.7.0 [TSS04] Messages deferred"


def test_status_plain_shows_paused_posts_and_throttled_domains(db: Database, run: Any) -> None:
    assert run("queue", "status").stdout == "queue is empty\n"
    post_id = _post(db, PostState.SENDING, paused=True, recipient_count=3)
    with db.session() as s:
        t = throttle.Throttle()
        throttle.observe(
            s,
            t,
            [
                (
                    "yahoo.com",
                    1,
                    [RecipientResult(1, RecipientState.DEFERRED, 421, TSS04)],
                )
            ],
            db_now(s),
        )
    out = run("queue", "status")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["POST", "LIST", "STATE"]
    assert lines[1].split()[:3] == [str(post_id), "staff@lists.example.org", "paused"]
    assert lines[2] == f"domain yahoo.com: slowed to 50% of its rate (answered 421 {TSS04})"
    data = json.loads(run("queue", "status", "--format", "json").stdout)
    assert data["posts"][0]["paused"] is True and data["posts"][0]["recipients"] == 3
    assert data["throttled_domains"] == [
        {
            "domain": "yahoo.com",
            "rate_factor": 0.5,
            "paused_until": None,
            "reason": f"answered 421 {TSS04}",
        }
    ]
    with db.session() as s:
        s.execute(sa.update(Post).where(Post.id == post_id).values(state=PostState.SENT))
    finished = run("queue", "status", "--watch", "--interval", "0.1")  # piped: plain
    assert finished.exit_code == 0 and "paused" not in finished.stdout  # nothing to watch
    assert f"domain yahoo.com: slowed to 50% of its rate (answered 421 {TSS04})" in (
        finished.stdout.splitlines()
    )


def _on_a_terminal(config: Path, *args: str) -> str:
    """`listserv ARGS` with a pseudo-terminal as its stdout (120 columns), its output."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: never returns
        os.execv(
            sys.executable, [sys.executable, "-m", "listserv.cli", "--config", str(config), *args]
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out.decode()


def test_status_on_a_terminal_draws_a_progress_bar_per_post(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    post_id = _post(db, PostState.SENDING, recipient_count=4)
    with db.session() as s:
        batch = DeliveryBatch(post_id=post_id, domain="x.example")
        s.add(batch)
        s.flush()
        for i, state in enumerate([RecipientState.DELIVERED] * 3 + [RecipientState.PENDING]):
            s.add(
                Delivery(batch_id=batch.id, post_id=post_id, address=f"u{i}@x.example", state=state)
            )
    out = _on_a_terminal(write_config(tmp_path, db_url), "queue", "status")
    assert "PROGRESS" in out and "━" in out  # rich's bar
    assert "3/4" in out and "1 waiting" in out
