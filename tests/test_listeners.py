"""`listserv serve --listeners N`: N processes take the SMTP sessions from the one
port the daemon binds; each accepted post wakes the daemon's scheduler at once; a
listener killed is replaced while the others keep answering."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import aiosmtplib
from click.testing import CliRunner
from conftest import make_list, message
from sink import Sink
from test_crash import SENDER, free_port, serve_args, wait_for_port
from test_workers import children, wait_for_children

from listserv.cli import cli
from listserv.db import Database

MEMBERS = ["ann@one.example", "bob@two.example", "cy@three.example"]
ACCEPTED = re.compile(
    r"listserv\.intake\[(\d+)\]: post \d+ to staff@lists\.example\.org .*: accepted"
)
SETTLED = re.compile(r"listserv\.memory\[(\d+)\]: \d+ objects made at startup kept out")


def _config(tmp_path: Path, db_url: str, sink: Sink, port: int) -> Path:
    config = tmp_path / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nlisteners = 2\n'
        f'[database]\nurl = "{db_url}"\n'
        # the scheduler polls once a minute: only the listeners' wake-ups can make the
        # posts go out within the test's time
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\nreports = false\n'
        "poll_interval = 60\n"
        f'[dkim]\nkeys_dir = "{tmp_path}/dkim"\n[http]\nenabled = false\n'
    )
    return config


async def _start(db_url: str, sink: Sink, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """A list of MEMBERS, and `serve` with two listeners answering on its port."""
    db = Database(db_url)
    make_list(db, members_=MEMBERS, senders=[SENDER])
    db.dispose()
    port = free_port()
    front = subprocess.Popen(
        serve_args(_config(tmp_path, db_url, sink, port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_for_port(port, front)  # type: ignore[arg-type]
    except BaseException:
        front.kill()
        front.communicate()
        raise
    return front, port


async def _post(port: int, n: int) -> str:
    """Send one post over a connection of its own; the reply's text."""
    _, reply = await aiosmtplib.send(
        message(
            f"""
            From: {SENDER}
            To: staff@lists.example.org
            Subject: notice {n}

            Notice number {n}.
            """
        ),
        sender=SENDER,
        recipients=["staff@lists.example.org"],
        hostname="127.0.0.1",
        port=port,
        timeout=30,
    )
    return reply


async def test_listener_processes_share_the_port_and_wake_the_scheduler(
    db_url: str, sink: Sink, tmp_path: Path
) -> None:
    front, port = await _start(db_url, sink, tmp_path)
    try:
        listeners = await wait_for_children(front.pid, 2)
        # each listener alone, the other stopped: both take sessions from the one port,
        # and a listener that hangs holds up nobody
        for stopped in listeners:
            os.kill(stopped, signal.SIGSTOP)
            try:
                replies = await asyncio.gather(*(_post(port, n) for n in range(5)))
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert all("Queued as" in r for r in replies), replies
        replies = await asyncio.gather(*(_post(port, n) for n in range(30)))
        assert all("Queued as" in r for r in replies), replies
        await sink.wait_for_recipients(40 * len(MEMBERS), timeout=60)
    finally:
        front.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(front.communicate, timeout=120)
    assert front.returncode == 0, err[-3000:]
    assert Counter(sink.recipients()) == {m: 40 for m in MEMBERS}
    took = Counter(ACCEPTED.findall(err))
    assert sum(took.values()) == 40, err[-3000:]
    # both listeners took sessions (5 each at least, while the other was stopped);
    # the daemon that binds the port takes none itself
    assert set(took) == {str(pid) for pid in listeners}, (took, listeners, front.pid)
    assert min(took.values()) >= 5, took
    assert not children(front.pid), "listeners left running after the stop"
    # every process froze what it made at startup (memory.settle): no full garbage
    # collection stalls its sessions for 100 ms
    settled = set(SETTLED.findall(err))
    assert settled == {str(pid) for pid in [front.pid, *listeners]}, err[-3000:]


async def test_a_killed_listener_is_replaced_and_the_other_keeps_answering(
    db_url: str, sink: Sink, tmp_path: Path
) -> None:
    front, port = await _start(db_url, sink, tmp_path)
    try:
        first, second = await wait_for_children(front.pid, 2)
        os.kill(first, signal.SIGKILL)
        # the survivor takes every session, while the dead one is not yet replaced
        replies = await asyncio.gather(*(_post(port, n) for n in range(10)))
        assert all("Queued as" in r for r in replies), replies
        await sink.wait_for_recipients(10 * len(MEMBERS), timeout=60)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(kids := [p for p in children(front.pid) if p != first]) < 2:
            assert loop.time() < deadline, "the killed listener was not replaced"
            await asyncio.sleep(0.05)
        assert second in kids
    finally:
        front.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(front.communicate, timeout=120)
    assert front.returncode == 0, err[-3000:]
    assert "SMTP listener 0 exited" in err or "SMTP listener 1 exited" in err
    assert Counter(sink.recipients()) == {m: 10 for m in MEMBERS}


def test_a_bad_listener_count_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--listeners", "0"])
    assert result.exit_code == 2
    assert "--listeners" in result.output and "Traceback" not in result.output
    config = tmp_path / "listserv.toml"
    config.write_text(f'[server]\nlisteners = 0\n[database]\nurl = "sqlite:///{tmp_path}/x.db"\n')
    result = CliRunner().invoke(cli, ["--config", str(config), "serve"])
    assert result.exit_code == 1
    assert "[server] listeners: must be 1..64" in result.output
    assert "Traceback" not in result.output
