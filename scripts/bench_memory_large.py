#!/usr/bin/env python3
"""Memory benchmark: N large posts sent at once through the real daemon.

Creates a list of M members, starts a sink and `listserv serve` in their own
processes, sends N posts of S bytes over N concurrent SMTP sessions, and samples
the daemon's resident memory (every process of it, summed) until every post is
sent and for a while after. Prints the RSS before, the peak while the posts were
taken in and sent, right after the last was sent, and at the end of the settle
time: the last figure is what "large posts do not stay in memory after they are
sent" (issue 15) is about.

It asserts nothing; it prints figures. Everything runs on 127.0.0.1.

    python scripts/bench_memory_large.py --posts 8 --size 9900000 [--members 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fanout import (  # a sibling script
    LIST,
    LISTSERV,
    ROOT,
    SENDER,
    ScratchSchema,
    SinkProcess,
    free_port,
    loopback_dns,
    process_tree,
    run,
    wait_port,
)


def large_post(size: int, n: int) -> bytes:
    line = f"Post {n}: the annual report, every figure of it, line after line.".ljust(76)
    lines = [line] * (size // 78 + 1)
    head = (
        f"From: President <{SENDER}>\r\nTo: {LIST}\r\nSubject: Report {n}\r\n"
        f"Message-ID: <large-{n}@example.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return (head + "\r\n".join(lines) + "\r\n").encode()[:size]


def rss_mib(pid: int) -> float:
    """The resident memory of `pid` and its children, in MiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=8, help="posts sent at once")
    parser.add_argument("--size", type=int, default=9_900_000, help="bytes per post")
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--mode", choices=("shared", "personalized"), default="shared")
    parser.add_argument("--workers", type=int, default=0, help="serve --workers K")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds watched after")
    parser.add_argument("--database", default="", help="SQLAlchemy URL (default: SQLite)")
    parser.add_argument(
        "--sink", choices=("auto", "python", "smtp-sink"), default="auto", help="as bench_fanout"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="listserv-bench-mem-"))
    kind = args.sink
    if kind == "auto":
        kind = "smtp-sink" if shutil.which("smtp-sink") else "python"
    smtp_port = free_port()
    db_url = args.database or f"sqlite:///{work}/bench.db"
    scratch = ScratchSchema(db_url) if db_url.startswith("postgresql") else None
    if scratch is not None:
        db_url = scratch.url
    sink = SinkProcess(work, kind)
    limit = max(args.size + 1_000_000, 10 * 1024 * 1024)
    config = work / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {smtp_port}\nhostname = "lists.example.org"\n'
        f"max_message_size = {limit}\n"
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\npoll_interval = 0.5\n'
        "reports = false\n"
        f'[dkim]\nkeys_dir = "{work}/dkim"\n'
        "[http]\nenabled = false\n"
        f'[dns]\nnameservers = ["{loopback_dns()}"]\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    env = dict(os.environ, LISTSERV_CONFIG=str(config))
    daemon: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, float]] = []
    try:
        run([*LISTSERV, "init"], env)
        run([*LISTSERV, "lists", "create", LIST, "--policy", "announce", "--mode", args.mode], env)
        run([*LISTSERV, "members", "add", LIST, SENDER, "--role", "sender"], env)
        rcpts = [f"member{i}@d{i % args.domains}.example" for i in range(args.members)]
        run([*LISTSERV, "members", "add", LIST, *rcpts], env)
        serve = [*LISTSERV, "serve"] + (["--workers", str(args.workers)] if args.workers else [])
        daemon = subprocess.Popen(serve, env=env)
        wait_port(smtp_port, daemon)
        while args.workers and len(process_tree(daemon.pid)) < args.workers + 1:
            time.sleep(0.05)
        time.sleep(1.0)
        before = rss_mib(daemon.pid)
        messages = [large_post(args.size, n) for n in range(args.posts)]
        replies: list[str] = []

        def send(message: bytes) -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=300) as client:
                client.sendmail(SENDER, [LIST], message)
                replies.append("250")

        started = time.monotonic()
        senders = [threading.Thread(target=send, args=(m,)) for m in messages]
        for t in senders:
            t.start()
        del messages

        sys.path.insert(0, str(ROOT))
        import sqlalchemy as sa

        from listserv.db import Database
        from listserv.models import Post, PostState

        db = Database(db_url)
        done_at: float | None = None
        deadline = started + 900
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - started, rss_mib(daemon.pid)))
            if done_at is None and all(not t.is_alive() for t in senders):
                with db.reading() as session:
                    states = list(session.scalars(sa.select(Post.state)))
                if len(states) == args.posts and all(s is PostState.SENT for s in states):
                    done_at = time.monotonic() - started
            if done_at is not None and time.monotonic() - started >= done_at + args.settle:
                break
            time.sleep(0.1)
        db.dispose()
        sink.finish()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        if sink.proc.poll() is None:
            sink.proc.kill()
        if scratch is not None:
            scratch.drop()
        shutil.rmtree(work, ignore_errors=True)

    if done_at is None:
        raise SystemExit("the posts were not all sent in time")
    peak = max(r for _, r in samples)
    at_done = next(r for t, r in samples if t >= done_at)
    print(f"posts:              {args.posts} x {args.size:,} bytes, {len(replies)} accepted")
    print(f"members:            {args.members} over {args.domains} domains, mode {args.mode}")
    print(f"all sent after:     {done_at:.1f} s")
    print(f"daemon RSS before:  {before:.0f} MiB (all processes)")
    print(f"peak while sending: {peak:.0f} MiB")
    print(f"when all were sent: {at_done:.0f} MiB")
    print(f"{args.settle:.0f} s later:        {samples[-1][1]:.0f} MiB")


if __name__ == "__main__":
    main()
