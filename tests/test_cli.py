"""The `listserv` command, run for real: click's CliRunner on a SQLite file, and subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import null_dns_address

from listserv.cli import cli
from listserv.errors import NotFound

LIST = "staff@lists.example.org"
CLI = (sys.executable, "-m", "listserv.cli")
Run = Callable[..., Result]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No LISTSERV_* variables or config/listserv.toml from the developer's environment."""
    for name in list(os.environ):
        if name.startswith("LISTSERV_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "listserv.toml"
    text = f"""
        [database]
        url = "sqlite:///{tmp_path}/db.sqlite"
        [dkim]
        keys_dir = "{tmp_path}/dkim"
        [dns]
        nameservers = ["{null_dns_address()}"]
    """
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra), encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def run_raw(config_file: Path) -> Run:
    """`listserv --config <tmp> ARGS...` in-process, without `init`."""

    def run(*args: str, input: str | bytes | None = None) -> Result:
        return CliRunner().invoke(cli, ["--config", str(config_file), *args], input=input)

    return run


@pytest.fixture
def run(run_raw: Run) -> Run:
    """The same, on an initialized database."""
    assert run_raw("init").exit_code == 0
    return run_raw


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


def assert_error(result: Result, *fragments: str, code: int = 1) -> str:
    """Exit `code`, no traceback, exactly one `Error:` line (the only stderr line for code 1)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if code == 1:
        assert result.stderr.strip() == errors[0]
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def message(text: str) -> bytes:
    """Inline test message text to CRLF bytes."""
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode("utf-8")


# -- init --------------------------------------------------------------------------------


def test_init_creates_the_schema_then_leaves_it_alone(run_raw: Run, tmp_path: Path) -> None:
    first = ok(run_raw("init"))
    assert re.fullmatch(r"database sqlite:///\S+/db\.sqlite: created at revision \w+\n", first)
    assert (tmp_path / "db.sqlite").exists()
    second = ok(run_raw("init"))
    assert second.endswith(f"already at revision {first.split()[-1]}\n")


def test_commands_before_init_say_to_run_init(run_raw: Run, tmp_path: Path) -> None:
    assert_error(run_raw("lists", "list"), "not initialized", "listserv init")
    assert not (tmp_path / "db.sqlite").exists()  # asking did not create an empty file


def test_database_errors_are_one_line(run: Run, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.execute("DROP TABLE mailing_lists")
    conn.close()
    assert_error(run("lists", "list"), "no such table: mailing_lists", "listserv init")


# -- lists -------------------------------------------------------------------------------


def test_lists_create_list_show(run: Run) -> None:
    out = ok(run("lists", "create", "Staff@Lists.Example.org", "--owner", "boss@example.org"))
    assert out == f"created list {LIST} (policy members, mode shared)\n"
    ok(run("lists", "create", "news@example.org", "--policy", "announce", "--mode", "personalized"))

    table = ok(run("lists", "list")).splitlines()
    assert table[0].split() == ["ADDRESS", "POLICY", "MODE", "MEMBERS"]
    assert [line.split() for line in table[1:]] == [
        ["news@example.org", "announce", "personalized", "0"],
        [LIST, "members", "shared", "0"],
    ]
    listed = json.loads(ok(run("lists", "list", "--format", "json")))
    assert listed[1] == {"address": LIST, "policy": "members", "mode": "shared", "members": 0}

    ok(run("members", "add", LIST, "a@example.org", "b@example.org"))
    shown = dict(line.split(":", 1) for line in ok(run("lists", "show", LIST)).splitlines())
    shown = {k: v.strip() for k, v in shown.items()}
    assert shown["address"] == LIST
    assert shown["posting_policy"] == "members"
    assert shown["subject_prefix"] == "[staff]"
    counts = [shown[role] for role in ("members", "owners", "moderators", "senders")]
    assert counts == ["2", "1", "0", "0"]


def test_lists_create_twice_is_one_error_line(run: Run) -> None:
    ok(run("lists", "create", LIST))
    assert_error(run("lists", "create", LIST), f"list already exists: {LIST}")


def test_lists_set_changes_a_setting(run: Run) -> None:
    ok(run("lists", "create", LIST))
    assert ok(run("lists", "set", LIST, "policy", "announce")) == (
        f"{LIST}: posting_policy = announce\n"
    )
    ok(run("lists", "set", LIST, "subject_prefix", "[Staff news]"))
    shown = ok(run("lists", "show", LIST))
    assert re.search(r"^posting_policy:\s+announce$", shown, re.M)
    assert re.search(r"^subject_prefix:\s+\[Staff news\]$", shown, re.M)


def test_lists_set_unknown_key_lists_the_settable_ones(run: Run) -> None:
    ok(run("lists", "create", LIST))
    assert_error(
        run("lists", "set", LIST, "colour", "red"),
        "unknown setting 'colour'",
        "posting_policy",
        "subject_prefix",
    )
    assert_error(run("lists", "set", LIST, "policy", "everyone"), "announce, members, open")


def test_lists_delete_with_yes(run: Run) -> None:
    ok(run("lists", "create", LIST))
    ok(run("members", "add", LIST, "a@example.org"))
    assert ok(run("lists", "delete", LIST, "--yes")) == f"deleted list {LIST}\n"
    assert_error(run("lists", "show", LIST), f"no such list: {LIST}")


def test_lists_delete_without_yes_and_no_terminal_refuses(run: Run) -> None:
    ok(run("lists", "create", LIST))
    assert_error(run("lists", "delete", LIST, input="y\n"), "--yes")
    ok(run("lists", "show", LIST))


@pytest.mark.parametrize(("answer", "code", "kept"), [("y", 0, False), ("n", 1, True)])
def test_lists_delete_asks_on_a_terminal(
    run: Run, config_file: Path, answer: str, code: int, kept: bool
) -> None:
    ok(run("lists", "create", LIST))
    primary, secondary = pty.openpty()
    try:
        os.write(primary, f"{answer}\n".encode())  # typed ahead: the terminal buffers it
        proc = subprocess.run(
            [*CLI, "--config", str(config_file), "lists", "delete", LIST],
            stdin=secondary,
            capture_output=True,
            text=True,
            timeout=60,
            env=_clean_env(),
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert proc.returncode == code, proc.stderr
    assert f"Delete {LIST} and its 0 member entries?" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert (run("lists", "show", LIST).exit_code == 0) is kept


# -- members -----------------------------------------------------------------------------


def test_members_add_list_remove(run: Run) -> None:
    ok(run("lists", "create", LIST, "--owner", "boss@example.org"))
    out = ok(run("members", "add", LIST, "a@example.org", "B@Example.ORG", "--name", "Al"))
    assert out == "added member: a@example.org\nadded member: B@example.org\n"
    again = ok(run("members", "add", LIST, "a@example.org"))
    assert again == "already a member: a@example.org\n"
    ok(run("members", "add", LIST, "mod@example.org", "--role", "moderator"))

    lines = ok(run("members", "list", LIST)).splitlines()
    assert [line.split() for line in lines] == [
        ["a@example.org", "member", "Al"],
        ["B@example.org", "member", "Al"],
        ["boss@example.org", "owner"],
        ["mod@example.org", "moderator"],
    ]
    only = ok(run("members", "list", LIST, "--role", "owner"))
    assert only.split() == ["boss@example.org", "owner"]

    removed = run("members", "remove", LIST, "a@example.org", "zed@example.org")
    assert ok(removed) == "removed a@example.org\n"
    assert removed.stderr == "not a member: zed@example.org\n"
    none = run("members", "remove", LIST, "boss@example.org", "--role", "moderator")
    assert none.exit_code == 1
    assert none.stderr == "not a moderator: boss@example.org\n"
    assert "Traceback" not in none.output
    assert "boss@example.org" in ok(run("members", "list", LIST))


def test_members_list_as_csv_and_json(run: Run) -> None:
    ok(run("lists", "create", LIST))
    ok(run("members", "add", LIST, "a@example.org", "--name", "Ann, PhD"))
    ok(run("members", "add", LIST, "s@example.org", "--role", "sender"))
    as_csv = ok(run("members", "list", LIST, "--format", "csv"))
    assert [row[:3] for row in csv.reader(io.StringIO(as_csv))] == [
        ["address", "name", "role"],
        ["a@example.org", "Ann, PhD", "member"],
        ["s@example.org", "", "sender"],
    ]
    as_json = json.loads(ok(run("members", "list", LIST, "--format", "json", "--role", "sender")))
    assert [(r["address"], r["name"], r["role"], r["status"]) for r in as_json] == [
        ("s@example.org", "", "sender", "enabled")
    ]


def test_members_import_reports_counts_and_line_numbers(run: Run, tmp_path: Path) -> None:
    ok(run("lists", "create", LIST))
    path = tmp_path / "people.csv"
    path.write_text(
        "address,name,role\n"
        "ann@example.org,Ann,\n"
        "bob@example.org,Bob,moderator\n"
        "ann@example.org,Ann again,member\n"
        "carol@nowhere,,\n"
        "dave@example.org,Dave,king\n"
        "\n"
        "erin@example.org,,sender\n",
        encoding="utf-8",
    )
    result = run("members", "import", LIST, str(path))
    assert ok(result).splitlines() == [
        "added 3, skipped 1, invalid 2",
        "line 4: skipped: ann@example.org is already a member",
        "line 5: invalid: invalid address 'carol@nowhere': the part after the @-sign is not"
        " valid. It should have a period",
        "line 6: invalid: unknown role 'king'",
    ]
    assert "2 invalid row(s) were not imported" in result.stderr
    addresses = [line.split()[0] for line in ok(run("members", "list", LIST)).splitlines()]
    assert sorted(addresses) == ["ann@example.org", "bob@example.org", "erin@example.org"]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"email,name\nann@example.org,Ann\n", "must name an 'address' column"),
        (b"address,phone\nann@example.org,123\n", "unknown column(s) phone"),
        (b"address\nann@example.org\nz\xff@example.org\n", "not UTF-8"),
        (b"", "the file is empty"),
    ],
)
def test_members_import_of_a_bad_file_writes_nothing(run: Run, data: bytes, fragment: str) -> None:
    ok(run("lists", "create", LIST))
    assert_error(run("members", "import", LIST, "-", input=data), fragment)
    assert (
        ok(run("members", "export", LIST)) == "address,name,role,status,reason,source,subscribed\n"
    )


def test_members_export_round_trips_through_import(run: Run) -> None:
    ok(run("lists", "create", LIST, "--owner", "boss@example.org"))
    ok(run("lists", "create", "copy@lists.example.org"))
    ok(run("members", "add", LIST, "zoe@example.org", "--name", 'Zoë "Z" Smith, PhD'))
    ok(run("members", "add", LIST, "plain@example.org"))
    ok(run("members", "add", LIST, "boss@example.org", "--role", "sender"))
    exported = ok(run("members", "export", LIST))
    assert exported.startswith("address,name,role,status,reason,source,subscribed\n")

    imported = ok(run("members", "import", "copy@lists.example.org", "-", input=exported))
    assert imported == "added 4, skipped 0, invalid 0\n"

    def people(text: str) -> list[tuple[str, str, str]]:  # what import takes back
        return [(r["address"], r["name"], r["role"]) for r in csv.DictReader(io.StringIO(text))]

    assert people(ok(run("members", "export", "copy@lists.example.org"))) == people(exported)
    as_json = json.loads(ok(run("members", "export", LIST, "--format", "json")))
    zoe = {"address": "zoe@example.org", "name": 'Zoë "Z" Smith, PhD', "role": "member"}
    assert any(zoe.items() <= row.items() for row in as_json)


# -- inject and queue --------------------------------------------------------------------

POST = """
    From: Boss <boss@example.org>
    To: staff@lists.example.org
    Subject: Office closed on Friday
    Message-ID: <friday@example.org>

    The office is closed on Friday.
"""


@pytest.fixture
def announce_list(run: Run) -> str:
    ok(run("lists", "create", LIST, "--policy", "announce"))
    ok(run("members", "add", LIST, "boss@example.org", "--role", "sender"))
    ok(run("members", "add", LIST, "a@example.org", "b@example.org"))
    return LIST


def test_queue_status_on_an_empty_queue(run: Run) -> None:
    assert ok(run("queue", "status")) == "queue is empty\n"
    assert json.loads(ok(run("queue", "status", "--format", "json"))) == {
        "posts": [],
        "pending_inbound": {},
    }


def test_inject_from_an_authorized_sender_queues_the_post(
    run: Run, announce_list: str, tmp_path: Path
) -> None:
    path = tmp_path / "post.eml"
    path.write_bytes(message(POST))
    out = ok(run("inject", announce_list, str(path)))
    assert re.fullmatch(r"250 2\.0\.0 Queued as \d+\npost to \S+: accepted\n", out)

    table = ok(run("queue", "status")).splitlines()
    assert table[0].split()[:3] == ["POST", "LIST", "STATE"]
    assert len(table) == 2
    assert table[1].split()[1:3] == [LIST, "accepted"]
    assert table[1].endswith("Office closed on Friday")
    posts = json.loads(ok(run("queue", "status", "--format", "json")))["posts"]
    assert [(p["list"], p["state"], p["subject"]) for p in posts] == [
        (LIST, "accepted", "Office closed on Friday")
    ]


def test_inject_reads_stdin_and_the_envelope_sender_alone_does_not_authorize(
    run: Run, announce_list: str
) -> None:
    anonymous = message(POST).replace(b"Boss <boss@example.org>", b"someone@example.net")
    args = ("inject", announce_list, "-", "--sender", "boss@example.org")
    assert_error(
        run(*args, input=anonymous),
        "550 5.7.1 someone@example.net may not post",
        "--sender sets only the envelope sender",
    )
    stand_in = b"Sender: boss@example.org\r\n" + anonymous
    assert ok(run(*args, input=stand_in)).startswith("250 2.0.0 ")


def test_inject_from_a_non_sender_is_refused_and_nothing_is_queued(
    run: Run, announce_list: str
) -> None:
    post = message(POST).replace(b"boss@example.org", b"mallory@example.net")
    assert_error(
        run("inject", announce_list, "-", input=post),
        "Error: 550 5.7.1 mallory@example.net may not post to staff@lists.example.org",
    )
    assert ok(run("queue", "status")) == "queue is empty\n"


def test_inject_to_an_unknown_list_or_without_a_sender(run: Run, announce_list: str) -> None:
    post = message(POST)
    assert_error(run("inject", "nope@lists.example.org", "-", input=post), "no such list")
    assert_error(run("inject", "nope@elsewhere.example", "-", input=post), "no such list")
    no_from = message("""
        Subject: who am I

        body
    """)
    assert_error(run("inject", announce_list, "-", input=no_from), "--sender")
    assert_error(run("inject", announce_list, "-", "--sender", "x@y", input=post), "'x@y'")


# -- dkim --------------------------------------------------------------------------------


def test_dkim_keygen_prints_the_dns_record(run: Run, tmp_path: Path) -> None:
    out = ok(run("dkim", "keygen", "example.org", "--selector", "sel1", "--bits", "1024"))
    key = tmp_path / "dkim" / "example.org" / "sel1.pem"
    assert key.is_file()
    lines = out.splitlines()
    assert str(key) in lines[0]
    assert re.fullmatch(
        r'sel1\._domainkey\.example\.org\. IN TXT "v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+"', lines[-1]
    )
    again = run("dkim", "keygen", "example.org", "--selector", "sel1", "--bits", "1024")
    assert_error(again, "already exists")
    assert_error(
        run("dkim", "keygen", "example.org", "--selector", "s2", "--bits", "1000"),
        "--bits",
        code=2,
    )


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("lists", "show", "nope@example.org"), "no such list: nope@example.org"),
        (("members", "list", "nope@example.org"), "no such list: nope@example.org"),
        (("members", "add", LIST, "ok@example.org", "bad@x"), "invalid address 'bad@x'"),
        (("lists", "create", "not-an-address"), "invalid address 'not-an-address'"),
        (("lists", "create", "staff-request@example.org"), "may not end in -request"),
        (("lists", "create", "staff@example.org", "--owner", "@x"), "invalid address '@x'"),
    ],
)
def test_bad_input_is_one_error_line(run: Run, args: tuple[str, ...], fragment: str) -> None:
    ok(run("lists", "create", LIST))
    assert_error(run(*args), fragment)
    assert "ok@example.org" not in ok(run("members", "list", LIST))


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "missing.toml"), "lists", "list"])
    assert_error(result, "missing.toml: config file not found")


def test_config_with_an_unknown_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server]\nprot = 25\n")
    result = CliRunner().invoke(cli, ["--config", str(path), "init"])
    assert_error(result, "unknown key 'prot' in [server]")


def test_config_from_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = CliRunner().invoke(cli, ["init"], env={"LISTSERV_CONFIG": str(path)})
    assert str(tmp_path / "db.sqlite") in ok(result)


def test_usage_errors_exit_2(run: Run) -> None:
    assert_error(run("lists", "create", LIST, "--policy", "everyone"), "--policy", code=2)
    assert_error(run("members", "add", LIST), "Missing argument", code=2)


def test_debug_lets_the_exception_through(config_file: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", str(config_file), "init"]).exit_code == 0
    result = runner.invoke(cli, ["--config", str(config_file), "--debug", "lists", "show", LIST])
    assert result.exit_code == 1
    assert isinstance(result.exception, NotFound)


def test_help_needs_no_config_or_database(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    for args in ([], ["lists"], ["members", "import"], ["serve"], ["dkim", "keygen"]):
        result = CliRunner().invoke(cli, ["--config", missing, *args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.stdout


# -- real processes ----------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LISTSERV_")}


def test_installed_script_reports_a_missing_config_in_one_line(tmp_path: Path) -> None:
    script = Path(sysconfig.get_path("scripts")) / "listserv"
    assert script.is_file()
    proc = subprocess.run(
        [str(script), "--config", str(tmp_path / "missing.toml"), "lists", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"Error: {tmp_path / 'missing.toml'}: config file not found\n"


def test_module_entry_point_runs_commands(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    base = [*CLI, "--config", str(config)]
    for args, code in ((["lists", "list"], 1), (["init"], 0), (["lists", "list"], 0)):
        proc = subprocess.run(
            base + args, capture_output=True, text=True, timeout=60, env=_clean_env()
        )
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.fixture
def serve_config(tmp_path: Path) -> Iterator[Path]:
    config = write_config(
        tmp_path,
        """
        [server]
        port = 0
        [http]
        port = 0
        [delivery]
        poll_interval = 0.05
        """,
    )
    init = [*CLI, "--config", str(config), "init"]
    subprocess.run(init, check=True, capture_output=True, timeout=60, env=_clean_env())
    yield config


class StderrLog:
    """Collects a child's stderr lines in a thread; waits for a pattern with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, "".join(self.lines))
            if match:
                found.append(match)
            return bool(match) or not self.thread.is_alive()

        with self.changed:
            self.changed.wait_for(seen, timeout)
        assert found, f"no {pattern!r} in the log:\n{self.text}"
        return found[0]


def test_serve_answers_smtp_and_stops_on_sigterm(serve_config: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "--config", str(serve_config), "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    log = StderrLog(proc)
    try:
        port = int(log.wait_for(r"listening for SMTP on [\d.]+:(\d+)", timeout=30).group(1))
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.noop()[0] == 250
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.thread.join(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert "INFO listserv.daemon: stopped" in log.text
    assert "Traceback" not in log.text


def test_serve_on_a_port_in_use_is_one_error_line(serve_config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [*CLI, "--config", str(serve_config), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_clean_env(),
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("Error: cannot start: ")
    assert f"{port}" in last and "address already in use" in last


# -- input is refused where it enters ------------------------------------------------------

INJECTION = "[x]\r\nBcc: evil@example.org"


def show(run: Run, address: str = LIST) -> str:
    return ok(run("lists", "show", address))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("subject_prefix", INJECTION),
        ("subject_prefix", "[x]\n"),
        ("subject_prefix", "tab\there"),
        ("subject_prefix", "nul\x00"),
        ("description", INJECTION),
        ("description", "Staff\rList"),
        ("description", "escape\x1b[31m"),
        ("description", "del\x7f"),
        ("description", "next\x85line"),
        ("description", "line\u2028separator"),
        ("footer", "nul\x00"),
        ("footer", "bare\rreturn"),
        ("footer", "bell\x07"),
    ],
)
def test_lists_set_refuses_control_characters_and_changes_nothing(
    run: Run, key: str, value: str
) -> None:
    ok(run("lists", "create", LIST, "--description", "Staff"))
    before = show(run)
    error = assert_error(run("lists", "set", LIST, key, value), f"{key}: control character U+")
    assert "Bcc" not in error
    assert show(run) == before


@pytest.mark.parametrize("option", ["--description", "--subject-prefix"])
@pytest.mark.parametrize("value", [INJECTION, "a\nb", "a\x00b", "a\x1bb"])
def test_lists_create_refuses_control_characters_and_creates_nothing(
    run: Run, option: str, value: str
) -> None:
    key = option.removeprefix("--").replace("-", "_")
    assert_error(run("lists", "create", LIST, option, value), f"{key}: control character U+")
    result = run("lists", "list")
    assert ok(result) == "" and result.stderr == "no lists\n"


@pytest.mark.parametrize("name", ["sta\r\nff@lists.example.org", "staff\x00@lists.example.org"])
def test_a_list_name_with_control_characters_is_refused(run: Run, name: str) -> None:
    assert_error(run("lists", "create", name), "invalid address")
    assert ok(run("lists", "list")) == ""


def test_the_footer_keeps_newlines_and_tabs(run: Run, tmp_path: Path) -> None:
    ok(run("lists", "create", LIST))
    ok(run("lists", "set", LIST, "footer", "Rules:\r\n\t1. Be kind.\n\t2. Be brief."))
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    (footer,) = conn.execute("SELECT footer FROM mailing_lists").fetchone()
    conn.close()
    assert footer == "Rules:\n\t1. Be kind.\n\t2. Be brief."


@pytest.mark.parametrize(
    "value",
    [
        "Zoë's Grüße für alle",
        '"Staff, all" (x)',
        "<all staff>",
        "d" * 255,
        " ".join(["日本語"] * 40),
    ],
)
def test_header_settings_that_are_not_control_characters_are_stored(run: Run, value: str) -> None:
    ok(run("lists", "create", LIST))
    assert ok(run("lists", "set", LIST, "description", value)) == (
        f"{LIST}: description = {value}\n"
    )
    prefix = value[:100].strip()
    ok(run("lists", "set", LIST, "subject_prefix", prefix))
    shown = show(run)
    assert re.search(rf"^description: +{re.escape(value)}$", shown, re.M)
    assert re.search(rf"^subject_prefix: +{re.escape(prefix)}$", shown, re.M)


def test_an_idn_list_is_stored_as_an_a_label_and_found_by_any_spelling(run: Run) -> None:
    out = ok(run("lists", "create", "Staff@Bücher.Example"))
    assert out == "created list staff@xn--bcher-kva.example (policy members, mode shared)\n"
    for spelling in ("staff@bücher.example", "STAFF@XN--BCHER-KVA.EXAMPLE"):
        assert re.search(r"^address: +staff@xn--bcher-kva\.example$", show(run, spelling), re.M)
    assert_error(
        run("lists", "create", "staff@xn--bcher-kva.example"),
        "list already exists: staff@xn--bcher-kva.example",
    )


def test_an_idn_member_in_either_form_is_one_member(run: Run) -> None:
    ok(run("lists", "create", LIST))
    assert ok(run("members", "add", LIST, "jürgen@bücher.example")) == (
        "added member: jürgen@xn--bcher-kva.example\n"
    )
    assert ok(run("members", "add", LIST, "jürgen@XN--BCHER-KVA.example")) == (
        "already a member: jürgen@xn--bcher-kva.example\n"
    )
    assert ok(run("members", "list", LIST)).split() == ["jürgen@xn--bcher-kva.example", "member"]
    assert ok(run("members", "remove", LIST, "jürgen@Bücher.example")) == (
        "removed jürgen@xn--bcher-kva.example\n"
    )


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("a..b@example.org", "two periods in a row"),
        ("l" * 65 + "@example.org", "too long before the @-sign"),
        ("l" * 64 + "@" + "d" * 63 + "." + "e" * 63 + "." + "f" * 54 + ".example", "too long"),
        ("Ann <ann@example.org>", "display name"),
        ("garbage", "must have an @-sign"),
        ("staff@lists.example.org", "one of the addresses of staff@lists.example.org itself"),
        ("STAFF-REQUEST@Lists.Example.org", "addresses of staff@lists.example.org itself"),
        ("staff-bounces+x@lists.example.org", "addresses of staff@lists.example.org itself"),
    ],
)
def test_members_add_refuses_bad_and_own_addresses_and_adds_none(
    run: Run, address: str, fragment: str
) -> None:
    ok(run("lists", "create", LIST))
    assert_error(run("members", "add", LIST, "ok@example.org", address), fragment)
    assert_error(run("members", "add", LIST, address, "--role", "moderator"), fragment)
    assert "ok@example.org" not in ok(run("members", "list", LIST))
    imported = ok(run("members", "import", LIST, "-", input=f"address\n{address}\n"))
    assert imported.splitlines()[0] == "added 0, skipped 0, invalid 1"
    assert fragment in imported.splitlines()[1]


def test_another_list_may_be_subscribed(run: Run) -> None:
    ok(run("lists", "create", LIST))
    ok(run("lists", "create", "all@lists.example.org"))
    assert ok(run("members", "add", "all@lists.example.org", "STAFF@lists.example.org")) == (
        "added member: STAFF@lists.example.org\n"
    )


def test_lists_delete_refuses_posts_in_flight_and_force_cancels_them(
    run: Run, announce_list: str, tmp_path: Path
) -> None:
    out = ok(run("inject", announce_list, "-", input=message(POST)))
    post_id = int(out.split()[4])
    error = assert_error(run("lists", "delete", LIST, "--yes"))
    assert error == (
        f"Error: not deleting {LIST}: 1 post (1 waiting) with 2 recipient(s) not yet"
        " delivered; wait for them, or pass --force to cancel them"
    )
    show(run)
    assert ok(run("queue", "status")).count("accepted") == 1

    forced = run("lists", "delete", LIST, "--yes", "--force")
    assert ok(forced) == (
        f"cancelled post {post_id} (accepted, 2 recipient(s) not yet delivered)\n"
        f"deleted list {LIST}\n"
    )
    assert_error(run("lists", "show", LIST), f"no such list: {LIST}")
    assert ok(run("queue", "status")) == "queue is empty\n"
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    detail = conn.execute(
        "SELECT detail FROM audit_log WHERE action = 'list.delete' AND list_address = ?", (LIST,)
    ).fetchone()
    conn.close()
    assert detail == (
        f"cancelled 1 post (1 waiting) with 2 recipient(s) not yet delivered:"
        f" post {post_id} (accepted, 2 open)",
    )
