"""A daemon killed with SIGKILL while batches are pending delivers them after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiosmtplib
import sqlalchemy as sa
from conftest import make_list, message
from sink import Sink

from listserv.db import Database
from listserv.models import Post, PostState

MEMBERS = [f"m{i}@d{i % 4}.example" for i in range(12)]
SENDER = "boss@example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert proc.poll() is None, "daemon exited early"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"daemon not listening on {port}")


async def wait_until_sent(db_url: str, timeout: float = 30) -> None:
    db = Database(db_url)

    def sent() -> bool:
        with db.reading() as s:
            return s.scalar(sa.select(Post.state)) is PostState.SENT

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await asyncio.to_thread(sent):
            assert loop.time() < deadline, "post not sent in time"
            await asyncio.sleep(0.05)
    finally:
        db.dispose()


def serve_args(config: Path) -> list[str]:
    return [sys.executable, "-m", "listserv.cli", "--config", str(config), "serve"]


def serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        serve_args(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_sigkill_with_pending_batches_loses_nothing(
    db_url: str, sink: Sink, tmp_path: Path
) -> None:
    db = Database(db_url)
    make_list(db, members_=MEMBERS, senders=[SENDER])
    db.dispose()
    port = free_port()
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\nmax_connections = 1\n'
        "reports = false\n"
        "max_recipients_per_message = 1\npoll_interval = 0.1\nretry_initial = 0.2\n"
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )
    # Every DATA reply takes a while: batches pile up behind the single connection.
    sink.delay("DATA", 0.3, times=-1)
    first = serve(config)
    try:
        await wait_for_port(port, first)
        await aiosmtplib.send(
            message(
                f"""
                From: {SENDER}
                To: staff@lists.example.org
                Subject: before the crash

                Still there?
                """
            ),
            sender=SENDER,
            recipients=["staff@lists.example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=10,
        )
        await sink.wait_for_messages(2, timeout=20)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert first.stderr is not None
        first.stderr.close()
    delivered_before = len(sink.recipients())
    assert delivered_before < len(MEMBERS), "the crash came too late to prove anything"

    second = serve(config)
    try:
        await sink.wait_for_recipients(len(MEMBERS), timeout=30)
        await wait_until_sent(db_url)
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(second.communicate, timeout=30)
    assert second.returncode == 0, err.decode()
    counts = Counter(sink.recipients())
    assert set(counts) == set(MEMBERS)
    # at-least-once: only the batch in flight at the kill may arrive twice
    assert sum(counts.values()) - len(MEMBERS) <= 1


async def test_sigkill_in_a_personalized_batch_resumes_at_once_and_resends_almost_nothing(
    db_url: str, sink: Sink, tmp_path: Path
) -> None:
    """The killed daemon is not reaped before the restart (a zombie, as under a slow
    supervisor): its leases must still be freed at once, not after lease_seconds, and
    progress recorded per round means only the message in flight is sent twice."""
    many = [f"p{i:02d}@one.example" for i in range(40)]  # one batch of 40
    db = Database(db_url)
    make_list(db, members_=many, senders=[SENDER], delivery_mode="personalized")
    db.dispose()
    port = free_port()
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\nmax_connections = 1\n'
        "reports = false\n"
        "poll_interval = 0.1\nretry_initial = 0.2\nlease_seconds = 300\n"
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )
    sink.delay("DATA", 0.05, times=-1)
    first = serve(config)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for_port(port, first)
        await aiosmtplib.send(
            message(
                f"""
                From: {SENDER}
                To: staff@lists.example.org
                Subject: personal

                For each of you.
                """
            ),
            sender=SENDER,
            recipients=["staff@lists.example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=10,
        )
        await sink.wait_for_messages(10, timeout=20)
        os.kill(first.pid, signal.SIGKILL)
        second = serve(config)  # at once: the first is not reaped yet
        delivered_before = len(sink.recipients())
        assert delivered_before < len(many), "the crash came too late to prove anything"
        await sink.wait_for_recipients(len(many), timeout=60)  # a stalled lease: 300 s
        await wait_until_sent(db_url)
    finally:
        first.kill()
        first.wait()
        assert first.stderr is not None
        first.stderr.close()
        if second is not None:
            second.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(second.communicate, timeout=30)
    assert second is not None and second.returncode == 0, err.decode()
    counts = Counter(sink.recipients())
    assert set(counts) == set(many)
    assert sum(counts.values()) - len(many) <= 2  # the message in flight, at most
