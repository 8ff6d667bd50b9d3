#!/usr/bin/env python3
"""Fan-out benchmark: one post to a list of N members, through the real daemon.

Creates a list of N members spread over many domains (imported with
`listserv members import`, which is timed too), starts a counting SMTP sink
and `listserv serve` in their own processes, posts one message over SMTP,
and prints:

- recipients/second from the 250 reply to our post to the last recipient
  accepted at the sink;
- the daemon's peak RSS (VmHWM);
- the CPU seconds its processes used from the post on, per member: steadier than
  wall time when other work shares the machine;
- for comparison, a bare aiosmtplib loop (same sink, same recipients,
  500 per transaction, same connection count) measured in the same run;
- in personalized mode, messages/s (signed with --dkim) and, as the yardstick
  for one message per recipient, the unsigned one-recipient bare loop of the
  same run (one message per recipient, same connection count).

It asserts nothing; it prints figures. Everything runs on 127.0.0.1.

    python scripts/bench_fanout.py --members 10000 [--mode shared|personalized|one-click]
        [--workers K]

--mode one-click sets `[http] public_base_url`, so the list (shared by its own
setting) goes out one copy per recipient with its one-click List-Unsubscribe;
shared and personalized leave it unset, so one-click is not in effect.

The post goes out once the daemon and its workers hold their liveness locks, so
a worker's start-up (a second or two of imports) is not timed as delivery.

With --workers K the daemon delivers in K processes (`serve --workers K`), the
peak RSS is given per process, and the bare loop runs in K processes too, so
the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loopback_dns() -> str:
    """Start an empty DNS server on 127.0.0.1 (tests/dnsserver.py) for the daemon's
    `[dns] nameservers`: DMARC and SPF look-ups answer NXDOMAIN at once, and no
    benchmark ever asks a resolver off this machine. Returns its HOST:PORT."""
    sys.path.insert(0, str(ROOT))
    from tests.dnsserver import DnsServer

    return DnsServer().start().address


SINK = ROOT / "tests" / "sink.py"
LISTSERV = [sys.executable, "-m", "listserv.cli"]
LIST = "all@lists.example.org"
SENDER = "president@example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout}s")


def wait_daemons_ready(db_url: str, count: int, timeout: float = 60.0) -> None:
    """Wait until `count` daemons (the front and each delivery worker) hold their
    liveness lock, which each takes once it has started: a worker process spends a
    second or two importing before it can deliver, and a post sent right after
    `serve` started would otherwise time that start-up as delivery."""
    sys.path.insert(0, str(ROOT))
    from listserv.db import Database

    db = Database(db_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            path = db.sqlite_path
            if path is not None:
                locks = path.with_name(path.name + ".workers")
                held = len(list(locks.glob("*.lock"))) if locks.exists() else 0
            else:
                import sqlalchemy as sa

                with db.reading() as session:
                    held = int(
                        session.scalar(
                            sa.text(
                                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                " AND classid = 19539 AND granted"  # 0x4C53, liveness.py
                            )
                        )
                        or 0
                    )
            if held >= count:
                return
            time.sleep(0.05)
        print(f"(warning: only {held} of {count} daemons ready after {timeout:g} s)")
    finally:
        db.dispose()


class SinkProcess:
    """A counting SMTP sink in its own process (so it does not share our CPU).

    kind "python" is tests/sink.py, which reports the time of the last
    recipient; kind "smtp-sink" is Postfix's C sink (much faster), for which the
    end is the post's finished_at in the database.
    """

    def __init__(self, workdir: Path, kind: str = "python") -> None:
        self.kind = kind
        if kind == "smtp-sink":
            self.port = free_port()
            self.proc = subprocess.Popen(
                ["smtp-sink", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"],
                start_new_session=True,
            )
            wait_port(self.port, self.proc)
            return
        ready = workdir / f"sink-{time.monotonic_ns()}.port"
        self.proc = subprocess.Popen(
            [sys.executable, str(SINK), "--port", "0", "--ready-file", str(ready)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the sink did not start")
            time.sleep(0.02)
        self.port = int(ready.read_text())

    def finish(self) -> dict[str, float]:
        if self.kind == "smtp-sink":
            self.proc.terminate()
            self.proc.wait(timeout=30)
            return {}
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return dict(json.loads(out.decode().strip().splitlines()[-1]))


class ScratchSchema:
    """A PostgreSQL schema of our own for one run, so the benchmark leaves no tables behind."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url

        self.name = f"listserv_bench_{os.getpid()}"
        self.engine = sa.create_engine(url)
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {self.name}"))
        scoped = make_url(url).update_query_dict({"options": f"-csearch_path={self.name}"})
        self.url = scoped.render_as_string(hide_password=False)

    def drop(self) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {self.name} CASCADE"))
        self.engine.dispose()


def run(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, env=env, capture_output=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        sys.stderr.write(result.stderr.decode())
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return result  # type: ignore[no-any-return]


def post_message(size: int) -> bytes:
    body = ("All staff: the building is closed on Friday. " * 200)[:size]
    lines = [body[i : i + 70] for i in range(0, len(body), 70)]
    text = (
        f"From: President <{SENDER}>\r\nTo: {LIST}\r\nSubject: Closure\r\n"
        "Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + "\r\n".join(lines) + "\r\n"
    )
    return text.encode()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_loops(
    port: int,
    rcpts: list[str],
    message: bytes,
    connections: int,
    processes: int,
    per_message: int = 500,
) -> float:
    """The bare loop in `processes` processes, each with its share of the recipients."""
    if processes <= 1:
        return asyncio.run(bare_loop(port, rcpts, message, connections, per_message))
    import multiprocessing

    shares = [rcpts[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("fork")
    start = time.perf_counter()
    with ctx.Pool(processes) as pool:
        pool.starmap(
            _bare_share, [(port, share, message, connections, per_message) for share in shares]
        )
    return time.perf_counter() - start


def _bare_share(
    port: int, rcpts: list[str], message: bytes, connections: int, per_message: int
) -> float:
    return asyncio.run(bare_loop(port, rcpts, message, connections, per_message))


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the delivery workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


async def bare_loop(
    port: int, rcpts: list[str], message: bytes, connections: int, per_message: int = 500
) -> float:
    """The yardstick: aiosmtplib alone, `per_message` recipients per transaction."""
    import aiosmtplib

    chunks = [rcpts[i : i + per_message] for i in range(0, len(rcpts), per_message)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        while not queue.empty():
            chunk = queue.get_nowait()
            await smtp.sendmail(SENDER, chunk, message)
        await smtp.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10000)
    parser.add_argument("--mode", choices=("shared", "personalized", "one-click"), default="shared")
    parser.add_argument("--domains", type=int, default=200, help="spread members over this many")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--workers", type=int, default=0, help="delivery processes (serve --workers K)"
    )
    parser.add_argument(
        "--mix-domains", action="store_true", help="[delivery] mix_domains: batches across domains"
    )
    parser.add_argument("--batch", type=int, default=500, help="max recipients per transaction")
    parser.add_argument("--size", type=int, default=4000, help="body size in bytes")
    parser.add_argument(
        "--database", default="", help="SQLAlchemy URL (default: SQLite in a temp dir)"
    )
    parser.add_argument("--dkim", action="store_true", help="sign with a 2048-bit key")
    parser.add_argument(
        "--sink",
        choices=("auto", "python", "smtp-sink"),
        default="auto",
        help="auto: Postfix smtp-sink when installed, else tests/sink.py",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare aiosmtplib loop")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="listserv-bench-"))
    kind = args.sink
    if kind == "auto":
        kind = "smtp-sink" if shutil.which("smtp-sink") else "python"
    smtp_port = free_port()
    db_url = args.database or f"sqlite:///{work}/bench.db"
    scratch = ScratchSchema(db_url) if db_url.startswith("postgresql") else None
    if scratch is not None:
        db_url = scratch.url
    sink = SinkProcess(work, kind)
    config = work / "listserv.toml"
    # one-click links need a public base URL; none: lists keep their own mode
    public = 'public_base_url = "https://lists.example.org"\n' if args.mode == "one-click" else ""
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {smtp_port}\nhostname = "lists.example.org"\n'
        f'[database]\nurl = "{db_url}"\n'
        f'[delivery]\nhost = "127.0.0.1"\nport = {sink.port}\n'
        f"max_connections = {args.connections}\nmax_recipients_per_message = {args.batch}\n"
        "poll_interval = 0.5\n"
        "reports = false\n"  # the poster's delivery report is not part of the fan-out
        f"mix_domains = {'true' if args.mix_domains else 'false'}\n"
        f'[dkim]\nkeys_dir = "{work}/dkim"\n'
        f"[http]\nenabled = false\n{public}"
        f'[dns]\nnameservers = ["{loopback_dns()}"]\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    env = dict(os.environ, LISTSERV_CONFIG=str(config))
    daemon: subprocess.Popen[bytes] | None = None
    try:
        run([*LISTSERV, "init"], env)
        mode = "shared" if args.mode == "one-click" else args.mode
        run([*LISTSERV, "lists", "create", LIST, "--policy", "announce", "--mode", mode], env)
        run([*LISTSERV, "members", "add", LIST, SENDER, "--role", "sender"], env)
        if args.dkim:
            run([*LISTSERV, "dkim", "keygen", "lists.example.org", "--selector", "bench"], env)
        rcpts = [f"member{i}@d{i % args.domains}.example" for i in range(args.members)]
        csv_path = work / "members.csv"
        csv_path.write_text("address,name,role\n" + "".join(f"{a},,member\n" for a in rcpts))
        started = time.perf_counter()
        run([*LISTSERV, "members", "import", LIST, str(csv_path)], env)
        import_s = time.perf_counter() - started

        serve = [*LISTSERV, "serve"] + (["--workers", str(args.workers)] if args.workers else [])
        daemon = subprocess.Popen(serve, env=env)
        wait_port(smtp_port, daemon)
        while args.workers and len(process_tree(daemon.pid)) < args.workers + 1:
            time.sleep(0.05)
        wait_daemons_ready(db_url, args.workers + 1 if args.workers else 1)
        message = post_message(args.size)
        cpu_before = {pid: cpu_seconds(pid) for pid in process_tree(daemon.pid)}
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
            client.ehlo()
            client.mail(SENDER)
            client.rcpt(LIST)
            code, reply = client.data(message)
            accepted_at = time.time()  # right after the 250 to DATA
        if code != 250:
            raise SystemExit(f"the post was refused: {code} {reply.decode()}")
        post_id = int(reply.decode().rsplit(" ", 1)[1])  # "2.0.0 Queued as N": the post id
        sys.path.insert(0, str(ROOT))
        import sqlalchemy as sa

        from listserv.db import Database
        from listserv.models import Post, PostState

        db = Database(db_url)
        deadline = time.monotonic() + 600
        while True:
            with db.reading() as session:
                post = session.scalar(sa.select(Post).where(Post.id == post_id))
                state = post.state if post else None
                finished = post.finished_at if post else None
            if state in (PostState.SENT, PostState.FAILED) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        rss = [peak_rss_mib(pid) for pid in process_tree(daemon.pid)]
        cpu = [cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in process_tree(daemon.pid)]
        counts = sink.finish()
        db.dispose()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        if sink.proc.poll() is None:
            sink.proc.kill()
        if scratch is not None:
            scratch.drop()

    if kind == "python":
        end = float(counts["last"])
        arrived = f"{counts['recipients']} recipients in {counts['messages']} messages"
    else:
        assert finished is not None, "the post did not finish"
        end = finished.timestamp()
        arrived = "(smtp-sink: not counted; the end is the post's finished_at)"
    elapsed = end - accepted_at
    print(f"members:            {args.members} over {args.domains} domains, mode {args.mode}")
    print(f"import:             {import_s:.2f} s ({args.members / import_s:,.0f} members/s)")
    print(f"post state:         {state}")
    print(f"sink:               {kind}")
    print(f"received at sink:   {arrived}")
    if kind == "python":  # issue 15: the first recipient within 2 s of the 250
        print(f"250 -> first rcpt:  {float(counts['first']) - accepted_at:.2f} s")
    print(f"250 -> last rcpt:   {elapsed:.2f} s")
    print(f"throughput:         {args.members / elapsed:,.0f} recipients/s")
    print(f"daemon peak RSS:    {', '.join(f'{r:.1f}' for r in rss)} MiB (per process)")
    print(
        f"daemon CPU:         {sum(cpu):.2f} s from the post on"
        f" ({', '.join(f'{c:.2f}' for c in cpu)}; {sum(cpu) / args.members * 1e6:.0f} us a member)"
    )
    if args.mode != "shared":
        signed = "signed " if args.dkim else ""
        print(f"messages:           {args.members / elapsed:,.0f} {signed}messages/s")
    if not args.no_baseline:
        procs = max(1, args.workers)
        base_sink = SinkProcess(work, kind)
        seconds = bare_loops(base_sink.port, rcpts, message, args.connections, procs)
        base_sink.finish()
        print(
            f"bare aiosmtplib:    {seconds:.2f} s ({args.members / seconds:,.0f} recipients/s, "
            f"{procs} process(es) x {args.connections} connections, 500 per transaction);"
            f" listserv reaches {seconds / elapsed:.2f} x of it"
        )
        if args.mode != "shared":
            base_sink = SinkProcess(work, kind)
            seconds = bare_loops(base_sink.port, rcpts, message, args.connections, procs, 1)
            base_sink.finish()
            print(
                f"bare, 1 rcpt/msg:   {seconds:.2f} s ({args.members / seconds:,.0f} unsigned "
                f"messages/s, {procs} process(es) x {args.connections} connections);"
                " listserv reaches "
                f"{seconds / elapsed:.2f} x of it"
            )
    if args.keep:
        print(f"work directory:     {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
