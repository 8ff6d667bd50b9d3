"""Bounce reading without a database: VERP tokens, the sample corpus in tests/bounces/
(each file's expected findings in expected.json), and `listserv bounces parse`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from listserv.bounces import parse, smtp, verp
from listserv.cli import cli

CORPUS = Path(__file__).parent / "bounces"
EXPECTED: dict[str, dict[str, object]] = json.loads((CORPUS / "expected.json").read_text())
KEY = b"k" * 32
BASE = "staff-bounces@lists.example.org"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_bounce_reads_as_expected(name: str) -> None:
    expected = EXPECTED[name]
    report = parse.parse((CORPUS / name).read_bytes())
    assert report.as_json() == {
        "permanent": expected["permanent"],
        "temporary": expected["temporary"],
    }
    assert report.source == expected["source"]
    for field in ("original_message_id", "is_dsn", "auto_reply", "from_robot"):
        if field in expected:
            assert getattr(report, field) == expected[field], field


def test_every_sample_in_the_corpus_has_an_expectation() -> None:
    assert {p.name for p in CORPUS.glob("*.eml")} == set(EXPECTED)


def test_a_dsn_reports_the_original_recipient_not_where_it_was_forwarded() -> None:
    report = parse.parse((CORPUS / "rfc3464_forwarded_mixed.eml").read_bytes())
    [bob] = [f for f in report.findings if f.address == "bob@example.org"]
    assert (bob.status, bob.detail) == ("5.2.2", "smtp; 552 5.2.2 Mailbox full")
    assert all("forward.example" not in f.address for f in report.findings)


def test_a_verp_token_round_trips_and_survives_a_relay_that_changes_case() -> None:
    for delivery_id in (1, 31, 32, 1_000_000, 2**40):
        envelope = verp.envelope(KEY, BASE, delivery_id)
        local = envelope.partition("@")[0]
        token = local.partition("+")[2]
        assert token == token.lower() and token.isalnum()
        assert len(local.encode()) <= 64
        assert verp.delivery_of(KEY, BASE, token) == delivery_id
        assert verp.delivery_of(KEY, BASE, token.upper()) == delivery_id
    assert len(verp.token(KEY, BASE, 1_000_000)) == 20


def test_forged_and_garbled_verp_tokens_name_nobody() -> None:
    token = verp.token(KEY, BASE, 42)
    forged = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert verp.delivery_of(KEY, BASE, forged) is None  # MAC does not hold
    other_id = verp.token(KEY, BASE, 43)[:-16] + token[-16:]
    assert verp.delivery_of(KEY, BASE, other_id) is None  # someone else's delivery
    assert verp.delivery_of(b"x" * 32, BASE, token) is None  # another site's key
    assert verp.delivery_of(KEY, "other-bounces@lists.example.org", token) is None
    for garbled in ("", "abc", token + "!", "1" * 20, "a" + token):
        assert verp.delivery_of(KEY, BASE, garbled) is None


def test_a_list_name_too_long_for_a_token_keeps_the_plain_bounce_address() -> None:
    base = f"{'x' * 40}-bounces@lists.example.org"
    assert verp.envelope(KEY, base, 7) == base


def test_only_the_recipients_own_refusals_count_as_bounces() -> None:
    assert smtp.counts(smtp.Failure(1, "a@example.com", 550, "5.1.1 no such user"))
    assert smtp.counts(smtp.Failure(1, "a@example.com", 554, "5.6.0 message refused"))
    assert smtp.counts(smtp.Failure(1, "a@example.com", 451, "gave up after 9", gave_up=True))
    assert not smtp.counts(smtp.Failure(1, "a@example.com", 550, "MAIL FROM refused: 550 no"))
    assert not smtp.counts(smtp.Failure(1, "a@example.com", 553, "smarthost lacks SMTPUTF8"))
    assert not smtp.counts(smtp.Failure(1, "a@example.com", None, "gave up: connection failed"))
    assert not smtp.counts(
        smtp.Failure(1, "a@example.com", None, "connection failed", gave_up=True)
    )


def test_bounces_parse_prints_json_and_exits_0(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bounces", "parse", str(CORPUS / "exim.eml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "permanent": ["Other@exim.example.com", "nobody@exim.example.com"],
        "temporary": [],
    }
    result = CliRunner().invoke(cli, ["bounces", "parse", str(CORPUS / "human_reply.eml")])
    assert result.exit_code == 0
    assert json.loads(result.output) == {"permanent": [], "temporary": []}


def test_bounces_parse_of_an_unreadable_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bounces", "parse", str(tmp_path / "missing.eml")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot read ")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_bounces_parse_of_a_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bounces", "parse", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot read ") and result.output.count("\n") == 1


def test_garbage_reads_as_no_bounce_without_raising() -> None:
    noise = bytes(range(256)) * 12 + b"\r\nFrom: \r\n\r\n\xff\xfe"
    report = parse.parse(noise)
    assert report.as_json() == {"permanent": [], "temporary": []}
