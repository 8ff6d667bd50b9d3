"""Tests of the recording SMTP sink itself, driven by aiosmtplib over loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sink import Sink

SINK_SCRIPT = Path(__file__).with_name("sink.py")

MESSAGE = (
    textwrap.dedent(
        """\
        From: Ann <ann@example.org>
        To: dev@lists.example.org
        Subject: Hello sink
        Message-ID: <1@example.org>

        Body line.
        .leading dot survives
        """
    )
    .replace("\n", "\r\n")
    .encode()
)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as sink:
        yield sink


async def send(
    sink: Sink, recipients: Sequence[str], *, message: bytes = MESSAGE, **kwargs: Any
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    return await aiosmtplib.send(
        message,
        sender="ann@example.org",
        recipients=recipients,
        hostname=sink.host,
        port=sink.port,
        timeout=kwargs.pop("timeout", 5),
        **kwargs,
    )


async def test_accepts_message_and_records_envelope_and_raw_bytes(sink: Sink) -> None:
    errors, reply = await send(sink, ["bob@example.net", "cy@example.com"])

    assert errors == {}
    assert reply.startswith("2.0.0 OK queued as 1")
    [received] = sink.received
    assert received.mail_from == "ann@example.org"
    assert received.rcpt_tos == ["bob@example.net", "cy@example.com"]
    assert received.data == MESSAGE  # CRLF kept, dot-stuffing undone
    assert received.message()["Subject"] == "Hello sink"
    assert sink.recipients() == ["bob@example.net", "cy@example.com"]
    assert sink.counters == {"MAIL": 1, "RCPT": 2, "DATA": 1}


async def test_smtputf8_address_is_accepted(sink: Sink) -> None:
    errors, _ = await send(sink, ["jörg@exämple.de"], mail_options=["SMTPUTF8"])

    assert errors == {}
    assert sink.recipients() == ["jörg@exämple.de"]
    assert "SMTPUTF8" in sink.received[0].mail_options


async def test_scripted_rcpt_451_refuses_only_the_matching_recipient_once(sink: Sink) -> None:
    sink.script("RCPT", "451 4.3.0 try later", match="bob@")

    errors, _ = await send(sink, ["ann@example.net", "bob@example.net"])
    assert {rcpt: (r.code, r.message) for rcpt, r in errors.items()} == {
        "bob@example.net": (451, "4.3.0 try later")
    }
    assert sink.received[0].rcpt_tos == ["ann@example.net"]

    errors, _ = await send(sink, ["bob@example.net"])
    assert errors == {}
    assert sink.recipients() == ["ann@example.net", "bob@example.net"]
    assert sink.counters["RCPT"] == 3
    assert ("RCPT TO:<bob@example.net>", "451 4.3.0 try later") in sink.transcript


async def test_scripted_data_451_records_nothing_then_the_retry_is_accepted(sink: Sink) -> None:
    sink.script("DATA", "451 4.3.0 queue full")

    with pytest.raises(aiosmtplib.SMTPDataError) as excinfo:
        await send(sink, ["bob@example.net"])
    assert (excinfo.value.code, excinfo.value.message) == (451, "4.3.0 queue full")
    assert sink.received == []

    await send(sink, ["bob@example.net"])
    assert sink.recipients() == ["bob@example.net"]
    assert sink.counters["DATA"] == 2


async def test_script_forever_refuses_every_time(sink: Sink) -> None:
    sink.script("MAIL", "550 5.7.1 go away", times=-1)

    for _ in range(3):
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await send(sink, ["bob@example.net"])
    assert sink.counters == {"MAIL": 3}


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA"])
async def test_disconnect_after_command_drops_the_connection_and_records_nothing(
    sink: Sink, command: str
) -> None:
    sink.disconnect_after(command)

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(sink, ["bob@example.net"])
    assert sink.received == []
    assert sink.counters[command] == 1

    await send(sink, ["bob@example.net"])  # the fault was used up
    assert sink.recipients() == ["bob@example.net"]


async def test_delay_outlasts_the_client_timeout(sink: Sink) -> None:
    sink.delay("DATA", 30.0)

    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await send(sink, ["bob@example.net"], timeout=0.2)
    # The fixture's stop() then ends the session still sleeping in the hook.


async def test_wait_for_recipients_times_out_saying_how_many_arrived(sink: Sink) -> None:
    await send(sink, ["bob@example.net"])
    await sink.wait_for_recipients(1, timeout=1)

    with pytest.raises(TimeoutError, match=r"1 of 2 recipients arrived within 0\.05s"):
        await sink.wait_for_recipients(2, timeout=0.05)


async def test_wait_for_messages_wakes_on_delivery(sink: Sink) -> None:
    waiter = asyncio.create_task(sink.wait_for_messages(2, timeout=5))
    await send(sink, ["a@example.net"])
    await send(sink, ["b@example.net"])
    await waiter
    assert sink.recipients() == ["a@example.net", "b@example.net"]


async def test_stop_closes_connections_that_are_still_open() -> None:
    sink = Sink()
    await sink.start()
    client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=5)
    await client.connect()
    await client.ehlo()

    await sink.stop()

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.noop()
    client.close()


async def wait_for_file(path: Path, proc: asyncio.subprocess.Process, timeout: float) -> str:
    """Poll for a file written by another process, failing fast if that process exits."""
    async with asyncio.timeout(timeout):
        while not path.exists():
            if proc.returncode is not None:
                raise AssertionError(f"sink exited early with {proc.returncode}")
            await asyncio.sleep(0.01)
    return path.read_text()


async def test_cli_counts_recipients_and_reports_json_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "sink.port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SINK_SCRIPT),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        port = int(await wait_for_file(ready, proc, timeout=10))
        for recipients in (["a@x.test"], ["b@x.test", "c@x.test"], ["d@y.test"]):
            await aiosmtplib.send(
                MESSAGE, sender="ann@example.org", recipients=recipients, port=port, timeout=5
            )
        proc.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 0
    tally = json.loads(stdout)
    assert {k: tally[k] for k in ("recipients", "messages")} == {"recipients": 4, "messages": 3}
    assert 0 < tally["first"] <= tally["last"]
