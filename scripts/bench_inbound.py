#!/usr/bin/env python3
"""Inbound benchmark: posts accepted per second and the time to the 250, at several
client concurrencies, optionally while a big fan-out is going out.

Starts a counting sink and `listserv serve` (SQLite in a scratch directory, or
--database), creates a 200-member list (for the fairness check), the list the
rounds post to (--round-members) and, with --fanout N, a list of N members and
posts to it throughout: a new one as soon as the last has gone out, from before
each round until its end, so that every round runs while a fan-out is being
sent (one alone takes a few seconds here, a round up to ten). For each
concurrency C in --clients, C clients each send --posts posts over their own
SMTP connection. It prints, per C, accepted posts/s, p50 and p99 from the start
of a transaction to its 250, how many fan-out recipients went out during the
round, and, with a fan-out, when a 200-member post sent during it finished. It
asserts nothing. Everything runs on 127.0.0.1.

Two kinds of rounds. Back to back (closed loop), each client sends its next post
as soon as the last one got its 250: that measures the most the daemon takes,
and its latency is queueing by construction (C clients at X posts/s wait about
C/X seconds each, Little's law). Offered (open loop, --rate R at
--rate-clients C): the C clients together send R posts/s on a fixed schedule,
as independent senders do, and each post is timed from when it was due: that
measures the time to the 250 at a given load.

    python scripts/bench_inbound.py --clients 1,10,100 --posts 20 --fanout 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench_fanout import (
    LISTSERV,
    SinkProcess,
    free_port,
    loopback_dns,
    post_message,
    run,
    wait_daemons_ready,
    wait_port,
)

SMALL = "small@lists.example.org"
ROUNDS = "rounds@lists.example.org"
BIG = "big@lists.example.org"
SENDER = "president@example.org"


async def one_client(
    port: int,
    posts: int,
    message: bytes,
    latencies: list[float],
    interval: float = 0.0,
    phase: float = 0.0,
) -> None:
    """Send `posts` posts over one connection: back to back (`interval` 0), or one
    every `interval` seconds from `phase` on, each timed from when it was due, so a
    slow answer counts against every post it delayed (no coordinated omission)."""
    import aiosmtplib

    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
    await smtp.connect()
    begin = time.perf_counter() + phase
    try:
        for i in range(posts):
            due = begin + i * interval
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = due if interval else time.perf_counter()
            await smtp.sendmail(SENDER, [ROUNDS], message)
            latencies.append(time.perf_counter() - started)
    finally:
        await smtp.quit()


async def round_of(
    port: int, clients: int, posts: int, message: bytes, rate: float = 0.0
) -> tuple[float, list[float]]:
    """Closed loop (rate 0): every client sends as soon as its last post got its
    answer. Open loop: `rate` posts/s offered in all, each client sending one post
    every clients/rate seconds, the clients' starts spread evenly over one interval."""
    latencies: list[float] = []
    interval = clients / rate if rate else 0.0
    started = time.perf_counter()
    await asyncio.gather(
        *(
            one_client(port, posts, message, latencies, interval, interval * i / clients)
            for i in range(clients)
        )
    )
    return time.perf_counter() - started, sorted(latencies)


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p * (len(values) - 1)))]


def fairness(port: int, db_url: str, message: bytes) -> float:
    """Seconds from the 250 of a post to the 200-member list until it is sent."""
    import smtplib

    from listserv.db import Database
    from listserv.models import Post, PostState

    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt(SMALL)
        _, reply = client.data(message)
        accepted = time.time()
    post_id = int(reply.decode().rsplit(" ", 1)[1])
    db = Database(db_url)
    try:
        while True:
            with db.reading() as session:
                post = session.get(Post, post_id)
                if post is not None and post.state is PostState.SENT and post.finished_at:
                    return post.finished_at.timestamp() - accepted
            time.sleep(0.02)
    finally:
        db.dispose()


class FanoutLoop:
    """Keeps a fan-out going out: posts to the big list, waits until that post has
    been sent, posts again, until stopped."""

    def __init__(self, port: int, db_url: str, message: bytes) -> None:
        self.port, self.db_url, self.message = port, db_url, message
        self.posts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops posting (the fan-out going out goes on, unwatched)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import smtplib

        from listserv.db import Database
        from listserv.models import Post, PostState

        db = Database(self.db_url)
        try:
            while not self._stop.is_set():
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                    client.ehlo()
                    client.mail(SENDER)
                    client.rcpt(BIG)
                    _, reply = client.data(self.message)
                post_id = int(reply.decode().rsplit(" ", 1)[1])
                self.posts.append(post_id)
                while not self._stop.is_set():
                    with db.reading() as session:
                        post = session.get(Post, post_id)
                        if post is not None and post.state is PostState.SENT:
                            break
                    time.sleep(0.05)
        finally:
            db.dispose()

    def recipients_sent(self) -> int:
        """Recipients of all the fan-outs so far that have been sent (or failed)."""
        import sqlalchemy as sa

        from listserv.db import Database
        from listserv.models import Delivery, RecipientState

        posts = list(self.posts)
        if not posts:
            return 0
        db = Database(self.db_url)
        try:
            with db.reading() as session:
                query = (
                    sa.select(sa.func.count())
                    .select_from(Delivery)
                    .where(Delivery.post_id.in_(posts), Delivery.state != RecipientState.PENDING)
                )
                return int(session.scalar(query) or 0)
        finally:
            db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,10,100", help="comma-separated concurrencies")
    parser.add_argument("--posts", type=int, default=20, help="posts per client")
    parser.add_argument(
        "--fanout", type=int, default=0, help="members of a big post sent meanwhile"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="posts/s offered in all in the open-loop rounds (0: none)",
    )
    parser.add_argument(
        "--rate-clients", default="100", help="comma-separated concurrencies of the open loop"
    )
    parser.add_argument(
        "--round-members",
        type=int,
        default=200,
        help="members of the list the rounds post to (200 posts/s to 200 members is"
        " 40,000 recipients/s to deliver, more than 2 cores send)",
    )
    parser.add_argument("--workers", type=int, default=0, help="serve --workers K")
    parser.add_argument("--listeners", type=int, default=1, help="serve --listeners K")
    parser.add_argument(
        "--database",
        default="",
        help="an empty database's URL: the run creates its lists there (default: SQLite)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="listserv-inbound-"))
    kind = "smtp-sink" if shutil.which("smtp-sink") else "python"
    sink = SinkProcess(work, kind)
    smtp_port = free_port()
    db_url = args.database or f"sqlite:///{work}/bench.db"
    config = work / "listserv.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {smtp_port}\nhostname = "lists.example.org"\n'
        "max_connections = 500\nmax_connections_per_ip = 500\n"
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\npoll_interval = 0.5\n'
        "reports = false\n"
        f'[dkim]\nkeys_dir = "{work}/dkim"\n[http]\nenabled = false\n'
        f'[dns]\nnameservers = ["{loopback_dns()}"]\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    env = dict(os.environ, LISTSERV_CONFIG=str(config))
    daemon: subprocess.Popen[bytes] | None = None
    try:
        run([*LISTSERV, "init"], env)
        for address in (SMALL, BIG, ROUNDS):
            run([*LISTSERV, "lists", "create", address, "--policy", "announce"], env)
            run([*LISTSERV, "members", "add", address, SENDER, "--role", "sender"], env)
        small_csv = work / "small.csv"
        small_csv.write_text(
            "address,name,role\n" + "".join(f"s{i}@d{i % 20}.example,,member\n" for i in range(200))
        )
        run([*LISTSERV, "members", "import", SMALL, str(small_csv)], env)
        rounds_csv = work / "rounds.csv"
        rounds_csv.write_text(
            "address,name,role\n"
            + "".join(f"r{i}@d{i % 20}.example,,member\n" for i in range(args.round_members))
        )
        run([*LISTSERV, "members", "import", ROUNDS, str(rounds_csv)], env)
        if args.fanout:
            csv_path = work / "members.csv"
            csv_path.write_text(
                "address,name,role\n"
                + "".join(f"member{i}@d{i % 200}.example,,member\n" for i in range(args.fanout))
            )
            run([*LISTSERV, "members", "import", BIG, str(csv_path)], env)
        serve = [*LISTSERV, "serve", "--listeners", str(args.listeners)]
        serve += ["--workers", str(args.workers)] if args.workers else []
        daemon = subprocess.Popen(serve, env=env)
        wait_port(smtp_port, daemon)
        # every process started (each holds its liveness lock), then a moment to bind
        wait_daemons_ready(db_url, 1 + args.workers + (args.listeners if args.listeners > 1 else 0))
        time.sleep(1.0)
        message = post_message(2000)
        fanout: FanoutLoop | None = None
        if args.fanout:
            fanout = FanoutLoop(smtp_port, db_url, message)
            fanout.start()
            print(f"fan-out:            {args.fanout} members, posted again as each goes out")
            time.sleep(0.5)
            print(
                f"fairness:           {fairness(smtp_port, db_url, message):.2f} s from the 250"
                " of a 200-member post to its last recipient, during the fan-out"
            )
        rounds = [(int(c), 0.0) for c in args.clients.split(",") if c]
        if args.rate:
            rounds += [(int(c), args.rate) for c in args.rate_clients.split(",") if c]
        for clients, rate in rounds:
            before = fanout.recipients_sent() if fanout else 0
            seconds, latencies = asyncio.run(
                round_of(smtp_port, clients, args.posts, message, rate)
            )
            during = fanout.recipients_sent() - before if fanout else 0
            total = clients * args.posts
            how = f"offered {rate:.0f}/s" if rate else "back to back"
            print(
                f"{clients:>4} clients, {how:>14}: {total / seconds:7.1f} posts/s,"
                f" p50 {percentile(latencies, 0.5) * 1000:6.1f} ms,"
                f" p99 {percentile(latencies, 0.99) * 1000:6.1f} ms to the 250"
                + (f"; {during / seconds:,.0f} fan-out recipients/s meanwhile" if fanout else "")
            )
        if fanout is not None:
            fanout.stop()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
        sink.finish()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
