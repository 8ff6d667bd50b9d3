"""`listserv serve --workers 2`: two delivery processes share one post; one killed
mid-way is replaced, and every recipient is delivered."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import aiosmtplib
import sqlalchemy as sa
from conftest import make_list, message
from sink import Sink
from test_crash import SENDER, free_port, serve_args, wait_for_port, wait_until_sent

from listserv.config import DeliverySettings
from listserv.db import Database
from listserv.distribute import dispatcher
from listserv.models import DeliveryBatch

MANY = [f"user{i:05d}@d{i % 20}.example" for i in range(20000)]
BATCH_LINE = re.compile(r"listserv\.dispatcher\[(\d+)\]: post \d+ batch \d+ .*batch done")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


async def wait_for_children(pid: int, n: int, timeout: float = 30) -> list[int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(kids := children(pid)) < n:
        assert loop.time() < deadline, f"{len(kids)} of {n} workers started"
        await asyncio.sleep(0.05)
    return kids


async def wait_for_lease_owners(db_url: str, pids: set[int], timeout: float) -> set[int]:
    """Wait until each of these worker processes has held a batch's lease; returns
    the pids seen. A worker's id is host:pid:tag (liveness.worker_id)."""
    db = Database(db_url)
    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not pids <= seen:
            assert asyncio.get_running_loop().time() < deadline, f"only {seen} of {pids} leased"
            with db.reading() as session:
                owners = session.scalars(
                    sa.select(DeliveryBatch.lease_owner)
                    .where(DeliveryBatch.lease_owner.is_not(None))
                    .distinct()
                )
                seen |= {int(owner.split(":")[1]) for owner in owners if owner}
            await asyncio.sleep(0.01)
    finally:
        db.dispose()
    return seen & pids


async def test_two_workers_share_a_post_and_a_killed_one_loses_nothing(
    db_url: str, sink: Sink, tmp_path: Path
) -> None:
    db = Database(db_url)
    make_list(db, members_=MANY, senders=[SENDER])
    db.dispose()
    port = free_port()
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\nreports = false\n'
        "poll_interval = 0.1\nretry_initial = 0.2\nmax_recipients_per_message = 250\n"
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )
    sink.delay("DATA", 0.05, times=-1)  # 80 transactions: long enough to kill one mid-way
    front = subprocess.Popen(
        [*serve_args(config), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_for_port(port, front)  # type: ignore[arg-type]
        first, second = await wait_for_children(front.pid, 2)
        await aiosmtplib.send(
            message(
                f"""
                From: {SENDER}
                To: staff@lists.example.org
                Subject: to everyone

                Hello all.
                """
            ),
            sender=SENDER,
            recipients=["staff@lists.example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=10,
        )
        # both workers have leased batches (a worker logs a batch only once its round
        # records it: the first could be killed before it logged any) and some went out
        took_part = await wait_for_lease_owners(db_url, {first, second}, timeout=60)
        await sink.wait_for_messages(10, timeout=60)
        os.kill(first, signal.SIGKILL)
        await sink.wait_for_recipients(len(MANY), timeout=120)
        await wait_until_sent(db_url, timeout=60)
        replacement = [pid for pid in children(front.pid) if pid not in (first, second)]
    finally:
        front.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(front.communicate, timeout=120)
    assert front.returncode == 0, err[-3000:]
    counts = Counter(sink.recipients())
    assert set(counts) == set(MANY)
    # at-least-once: only the batches the killed worker held (4 connections) may come twice
    held = dispatcher.LEASED_PER_CONNECTION * DeliverySettings().max_connections * 250
    assert sum(counts.values()) - len(MANY) <= held
    assert took_part == {first, second}
    pids = Counter(BATCH_LINE.findall(err))
    assert str(second) in pids, pids  # the survivor sent batches, its own and the dead one's
    assert replacement, "the killed worker was not replaced"
    assert "delivery worker 0 exited" in err or "delivery worker 1 exited" in err
