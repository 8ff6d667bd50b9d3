"""The throttle: token buckets and slots with an injected clock, the adaptive slow-down
and pause, and the buckets shared through the database by several claimers (threads
with engines of their own, and another process), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_list
from sink import Sink
from test_e2e import SENDER, post_state, post_text, send, wait_until
from test_queue import _accepted_post

from listserv import config, lists, members
from listserv.config import DomainLimit, ThrottleSettings
from listserv.db import Database
from listserv.distribute import batches, posts, status, throttle
from listserv.distribute.batches import End, Report
from listserv.distribute.results import RecipientResult
from listserv.distribute.throttle import (
    MESSAGES,
    RECIPIENTS,
    Bucket,
    Candidate,
    Throttle,
)
from listserv.models import (
    DeliveryBatch,
    DeliveryMode,
    PostState,
    RecipientState,
    ThrottleBucket,
)

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def only(**domains: DomainLimit) -> Throttle:
    """A throttle with just these domain limits (no built-in providers)."""
    return Throttle(ThrottleSettings(providers=False, domains=dict(domains)))


def shared(n: int, domain: str = "slow.example", recipients: int = 1) -> list[Candidate]:
    return [Candidate(i, domain, 1, recipients) for i in range(1, n + 1)]


# -- the arithmetic, on an injected clock -------------------------------------------------


def test_a_domain_rate_admits_its_burst_then_one_batch_per_token() -> None:
    t = Throttle(
        ThrottleSettings(providers=False, burst=1.0, domains={"slow.example": DomainLimit(rate=2)})
    )
    buckets: dict[str, Bucket] = {}
    first = t.admit(shared(5), buckets, {}, 10, at(0))
    assert first.admitted == [1, 2]  # a new bucket starts full: 2 tokens
    assert first.retry_after == pytest.approx(0.5)
    assert t.admit(shared(5), buckets, {}, 10, at(0.25)).admitted == []
    assert len(t.admit(shared(5), buckets, {}, 10, at(0.5)).admitted) == 1
    # an hour idle refills the bucket to its capacity only: the burst, not 7,200
    assert len(t.admit(shared(50), buckets, {}, 100, at(3600)).admitted) == 2


def test_burst_is_seconds_of_rate() -> None:
    t = Throttle(
        ThrottleSettings(providers=False, burst=3.0, domains={"slow.example": DomainLimit(rate=2)})
    )
    assert len(t.admit(shared(10), {}, {}, 10, at(0)).admitted) == 6


def test_global_rates_count_messages_and_recipients() -> None:
    t = Throttle(ThrottleSettings(providers=False, rate=100, recipient_rate=10))
    buckets: dict[str, Bucket] = {}
    got = t.admit(shared(5, "any.example", recipients=4), buckets, {}, 10, at(0))
    assert got.admitted == [1, 2]  # 8 of 10 recipient tokens; a third needs 4
    assert got.retry_after == pytest.approx(0.2)
    assert buckets[RECIPIENTS].level(10, 10, at(0)) == pytest.approx(2)
    t = Throttle(ThrottleSettings(providers=False, rate=3))
    assert len(t.admit(shared(5, "any.example"), {}, {}, 10, at(0)).admitted) == 3


def test_a_batch_bigger_than_the_bucket_goes_when_it_is_full_and_the_debt_is_repaid() -> None:
    t = Throttle(ThrottleSettings(providers=False, recipient_rate=10))
    buckets: dict[str, Bucket] = {}
    big = [Candidate(1, "any.example", 1, 50), Candidate(2, "any.example", 1, 50)]
    assert t.admit(big, buckets, {}, 10, at(0)).admitted == [1]  # full: 10 >= min(50, 10)
    assert t.admit(big[1:], buckets, {}, 10, at(4.9)).admitted == []  # -40 + 49 < 10
    assert t.admit(big[1:], buckets, {}, 10, at(5)).admitted == [2]  # 50 tokens/5 s: 10/s


def test_personalized_batches_cost_one_message_per_recipient() -> None:
    t = only(**{"slow.example": DomainLimit(rate=5)})
    buckets: dict[str, Bucket] = {}
    personalized = [Candidate(1, "slow.example", 5, 5), Candidate(2, "slow.example", 5, 5)]
    assert t.admit(personalized, buckets, {}, 10, at(0)).admitted == [1]
    assert t.admit(personalized[1:], buckets, {}, 10, at(0.8)).admitted == []
    assert t.admit(personalized[1:], buckets, {}, 10, at(1)).admitted == [2]


def test_concurrency_counts_batches_in_flight_and_aliases_share_a_provider() -> None:
    t = Throttle(ThrottleSettings(domains={"gmail.com": DomainLimit(rate=0, concurrency=2)}))
    assert t.key("GoogleMail.com") == "gmail.com"
    mixed = [Candidate(1, "googlemail.com", 1, 1), Candidate(2, "gmail.com", 1, 1)]
    mixed.append(Candidate(3, "other.example", 1, 1))
    assert t.admit(mixed, {}, {"gmail.com": 1}, 10, at(0)).admitted == [1, 3]
    blocked, _ = t.blocked({}, {"gmail.com": 2}, at(0))
    assert blocked == {"gmail.com"}
    assert "googlemail.com" in t.domains_of(blocked)


def test_builtin_providers_apply_unless_switched_off_and_config_overrides_them() -> None:
    assert Throttle().limit("yahoo.com").concurrency > 0
    assert Throttle().key("hotmail.com") == "outlook.com"
    assert Throttle(ThrottleSettings(providers=False)).limit("yahoo.com") == DomainLimit()
    custom = Throttle(ThrottleSettings(domains={"hotmail.com": DomainLimit(rate=1)}))
    assert custom.key("hotmail.com") == "hotmail.com"  # listed: a bucket of its own
    assert custom.limit("hotmail.com").rate == 1


def test_421_halves_the_rate_once_per_incident_and_it_comes_back_by_steps() -> None:
    t = Throttle(
        ThrottleSettings(
            providers=False, restore_after=60, domains={"slow.example": DomainLimit(rate=8)}
        )
    )
    b = t.new_bucket("slow.example", at(0))
    event = t.slow_down(b, "answered 421 4.7.0 try later", at(0))
    assert event is not None and event[0] == logging.WARNING
    assert "rate halved to 4 messages/s" in event[1] and "421 4.7.0" in event[1]
    assert t.rate(b) == 4
    assert t.slow_down(b, "answered 421 again", at(throttle.HOLD_OFF - 1)) is None  # same one
    assert t.rate(b) == 4
    assert t.slow_down(b, "answered 451", at(throttle.HOLD_OFF)) is not None
    assert t.rate(b) == 2
    assert t.restore(b, at(throttle.HOLD_OFF + 59)) is None
    raised = t.restore(b, at(throttle.HOLD_OFF + 60))
    assert raised is not None and "rate raised to 3 messages/s" in raised[1]
    assert t.restore(b, at(throttle.HOLD_OFF + 60 * 6)) is not None
    assert b.factor == 1.0 and t.rate(b) == 8 and b.note == ""
    for i in range(10):  # never below 1/16
        t.slow_down(b, "421", at(1000 + 10 * i))
    assert b.factor == throttle.MIN_FACTOR


def test_a_domain_without_a_rate_is_slowed_from_a_base_rate() -> None:
    t = only()
    b = t.new_bucket("big.example", at(0))
    assert t.rate(b) == 0  # no limit
    t.slow_down(b, "connection lost", at(0))
    assert t.rate(b) == throttle.SLOW_BASE_RATE / 2


def test_a_paused_domain_is_blocked_until_the_pause_is_over() -> None:
    t = Throttle(ThrottleSettings(providers=False, pause_for=900))
    b = t.new_bucket("picky.example", at(0))
    event = t.pause(b, "refused 3 of 3 recipients (550 5.7.1 blocked)", at(0))
    assert event is not None and "paused for 900 s" in event[1]
    buckets = {"picky.example": b}
    assert t.blocked(buckets, {}, at(899))[0] == {"picky.example"}
    cands = [Candidate(1, "picky.example", 1, 1), Candidate(2, "fine.example", 1, 1)]
    assert t.admit(cands, buckets, {}, 10, at(899)).admitted == [2]
    blocked, events = t.blocked(buckets, {}, at(900))
    assert blocked == set() and events == [
        (logging.INFO, "domain picky.example: pause over, sending again")
    ]


def _results(*specs: tuple[RecipientState, int | None, str]) -> list[RecipientResult]:
    return [RecipientResult(i, state, code, text) for i, (state, code, text) in enumerate(specs)]


DELIVERED = (RecipientState.DELIVERED, 250, "ok")


def test_assess_reads_slow_downs_and_refusals_from_results() -> None:
    refused = (RecipientState.FAILED, 550, "5.7.1 blocked")
    signals = throttle.assess(
        [
            ("a.example", 2, _results(DELIVERED, (RecipientState.DEFERRED, 421, "4.7.0 busy"))),
            ("b.example", 1, _results((RecipientState.DEFERRED, None, "connection lost: x"))),
            ("c.example", 1, _results((RecipientState.DEFERRED, None, "internal error: bug"))),
            ("d.example", 4, _results(refused, refused, refused, DELIVERED)),
            ("e.example", 1, _results((RecipientState.FAILED, 550, "5.1.1 no such user"))),
            ("f.example", 10, _results(refused, refused, refused)),  # 3 of 10: not most
            ("g.example", 1, _results((RecipientState.DEFERRED, 452, "4.2.2 mailbox full"))),
        ]
    )
    assert set(signals) == {"a.example", "b.example", "d.example"}
    assert signals["a.example"].slow == "answered 421 4.7.0 busy"
    assert signals["b.example"].slow == "connection lost: x"
    assert signals["d.example"].refused == "refused 3 of 4 recipients (550 5.7.1 blocked)"


# -- through the database -------------------------------------------------------------


def _queue(db: Database, domains: dict[str, int], per_batch: int = 1, mode: str = "shared") -> int:
    """A sending post with `n` recipients at each domain, `per_batch` a batch."""
    address = make_list(db, delivery_mode=mode)
    addrs = [f"u{i}@{d}" for d, n in domains.items() for i in range(n)]
    with db.session() as s:
        members.add(s, lists.get(s, address), addrs)
    post_id = _accepted_post(db, address)
    with db.session() as s:
        post = posts.lock_accepted_post(s, post_id)
        assert post is not None
        posts.enqueue(
            s,
            post,
            prepared=b"msg",
            envelope_from="b@x.org",
            delivery_mode=DeliveryMode(mode),
            render=None,
            addresses=posts.recipients(s, post.list_id),
            max_per_batch=per_batch,
        )
    return post_id


def _claim(db: Database, t: Throttle, now: datetime, worker: str = "w", limit: int = 50) -> Any:
    with db.session() as s:
        return batches.claim(s, worker=worker, lease=MINUTE, limit=limit, throttle=t, now=now)


def _domains(claim: Any) -> Counter[str]:
    return Counter(b.domain for b in claim.batches)


def _start(db: Database) -> datetime:
    """An injected clock just after the batches became due."""
    with db.reading() as s:
        latest = s.scalar(sa.select(sa.func.max(DeliveryBatch.next_attempt_at)))
    assert latest is not None
    return latest + timedelta(seconds=1)


def test_a_throttled_domains_batches_wait_while_other_domains_flow(db: Database) -> None:
    _queue(db, {"a-slow.example": 30, "b-fast.example": 10})  # the slow ones come first
    t = only(**{"a-slow.example": DomainLimit(rate=1)})
    now = _start(db)
    first = _claim(db, t, now, limit=4)
    assert _domains(first)["a-slow.example"] == 1
    second = _claim(db, t, now, limit=20)  # the slow domain is out of tokens: not even read
    assert _domains(second) == Counter({"b-fast.example": 10 - _domains(first)["b-fast.example"]})
    assert second.retry_after == pytest.approx(1.0)
    assert _domains(_claim(db, t, now + timedelta(seconds=1)))["a-slow.example"] == 1
    assert _domains(_claim(db, t, now + timedelta(seconds=5)))["a-slow.example"] == 1  # burst 1


def test_domain_concurrency_is_counted_from_live_leases(db: Database) -> None:
    _queue(db, {"few.example": 5})
    t = only(**{"few.example": DomainLimit(concurrency=2)})
    now = _start(db)
    held = _claim(db, t, now).batches
    assert len(held) == 2
    assert _claim(db, t, now, worker="other").batches == []
    report = Report(
        held[0],
        [RecipientResult(held[0].recipients[0][0], RecipientState.DELIVERED, 250, "ok")],
        End.DONE,
        0,
    )
    with db.session() as s:
        batches.record(s, [report], worker="w", policy=config.DeliverySettings())
    assert len(_claim(db, t, now, worker="other").batches) == 1  # a slot came free
    # a lease that ran out (its holder died) frees its slot too
    assert len(_claim(db, t, now + 2 * MINUTE, worker="other").batches) == 2


CLAIMER = """
import json, sys
from datetime import datetime, timedelta
from listserv.config import DomainLimit, ThrottleSettings
from listserv.db import Database
from listserv.distribute import batches
from listserv.distribute.throttle import Throttle
db = Database(sys.argv[1])
t = Throttle(ThrottleSettings(providers=False, domains={"shared.example": DomainLimit(rate=4)}))
with db.session() as s:
    got = batches.claim(s, worker="child", lease=timedelta(minutes=1), limit=50,
                        throttle=t, now=datetime.fromisoformat(sys.argv[2]))
print(json.dumps(len(got.batches)))
db.dispose()
"""


def test_buckets_are_shared_by_claimers_in_threads_and_processes(db: Database, db_url: str) -> None:
    _queue(db, {"shared.example": 60})
    t = only(**{"shared.example": DomainLimit(rate=4)})  # a full bucket holds 4
    now = _start(db)
    got: list[int] = []
    lock = threading.Lock()

    def claimer(n: int) -> None:
        own = Database(db_url)  # an engine and connections of its own, as a daemon has
        try:
            for _ in range(5):
                claimed = _claim(own, t, now, worker=f"w{n}")
                with lock:
                    got.extend(b.id for b in claimed.batches)
        finally:
            own.dispose()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and len(set(got)) == 4  # 20 claims at one instant: one bucket
    child = subprocess.run(
        [sys.executable, "-c", CLAIMER, db_url, (now + timedelta(seconds=0.5)).isoformat()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(child.stdout) == 2  # half a second refilled 2 tokens, for the child
    assert _claim(db, t, now + timedelta(seconds=0.5)).batches == []  # and not again here
    with db.reading() as s:
        row = s.scalar(sa.select(ThrottleBucket).where(ThrottleBucket.key == "shared.example"))
    assert row is not None and row.tokens == pytest.approx(0)


def test_results_slow_a_domain_down_and_pause_one_that_refuses(db: Database) -> None:
    _queue(db, {"a-picky.example": 20, "b-busy.example": 40, "c-calm.example": 20}, per_batch=4)
    t = Throttle(
        ThrottleSettings(
            providers=False,
            pause_for=600,
            domains={"b-busy.example": DomainLimit(rate=4)},
        )
    )
    now = _start(db)
    claimed = {b.domain: b for b in _claim(db, t, now, limit=10).batches}
    busy, picky = claimed["b-busy.example"], claimed["a-picky.example"]
    slow = [
        RecipientResult(rid, RecipientState.DEFERRED, 421, "4.7.0 slow down")
        for rid, _ in busy.recipients
    ]
    no = [
        RecipientResult(rid, RecipientState.FAILED, 550, "5.7.1 go away")
        for rid, _ in picky.recipients
    ]
    with db.session() as s:
        events = throttle.observe(
            s, t, [("b-busy.example", 4, slow), ("a-picky.example", 4, no)], now
        )
    assert [level for level, _ in events] == [logging.WARNING, logging.WARNING]
    text = "\n".join(line for _, line in events)
    assert "b-busy.example: answered 421 4.7.0 slow down; rate halved to 2 messages/s" in text
    assert (
        "a-picky.example: refused 4 of 4 recipients (550 5.7.1 go away); paused for 600 s" in text
    )
    later = now + timedelta(seconds=10)  # 2 tokens/s now, the bucket holds 2
    got = _domains(_claim(db, t, later))
    assert got["b-busy.example"] == 2 and got["a-picky.example"] == 0 and got["c-calm.example"] > 0
    with db.reading() as s:
        shown = {b.key: b for b in status.throttled_domains(s, t)}
    assert (
        shown["b-busy.example"].factor == 0.5 and shown["a-picky.example"].paused_until is not None
    )
    after = now + timedelta(seconds=600)
    with db.session() as s:
        resumed = batches.claim(s, worker="w", lease=MINUTE, limit=50, throttle=t, now=after)
    assert _domains(resumed)["a-picky.example"] > 0
    assert (logging.INFO, "domain a-picky.example: pause over, sending again") in resumed.events
    assert any("b-busy.example: back to full rate" in line for _, line in resumed.events)


def test_a_mixed_domain_batch_is_throttled_by_its_first_recipients_domain(db: Database) -> None:
    address = make_list(db)
    with db.session() as s:
        members.add(s, lists.get(s, address), ["x@a.example", "y@b.example", "z@b.example"])
    post_id = _accepted_post(db, address)
    with db.session() as s:
        post = posts.lock_accepted_post(s, post_id)
        assert post is not None
        posts.enqueue(
            s,
            post,
            prepared=b"m",
            envelope_from="b@x.org",
            delivery_mode=DeliveryMode.SHARED,
            render=None,
            addresses=posts.recipients(s, post.list_id),
            max_per_batch=10,
            mix_domains=True,
        )
    now = _start(db)
    paused_a = only()
    with db.session() as s:
        throttle.observe(
            s,
            paused_a,
            [("a.example", 3, _results(*[(RecipientState.FAILED, 554, "no")] * 3))],
            now,
        )
    assert _claim(db, paused_a, now).batches == []  # the batch's domain is a.example
    assert len(_claim(db, only(), now + timedelta(hours=1)).batches) == 1


async def test_the_daemon_halves_a_domain_that_answers_451_and_logs_it(
    db: Database, sink: Sink, daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    many = [f"m{i}@busy.example" for i in range(6)] + ["ok@calm.example"]
    make_list(db, members_=many, senders=[SENDER])
    sink.script("RCPT", "451 4.7.1 too fast, slow down", match="m0@", times=1)
    caplog.set_level(logging.INFO, logger="listserv")
    daemon = await daemon_factory(delivery__max_recipients_per_message=2)
    await send(daemon.port, post_text())
    await wait_until(lambda: post_state(db) is PostState.SENT, timeout=30)
    assert Counter(sink.recipients()) == Counter(many)
    lines = [r.getMessage() for r in caplog.records if r.name == "listserv.dispatcher"]
    assert any(
        "domain busy.example: answered 451 4.7.1 too fast, slow down; rate halved to 5" in line
        for line in lines
    ), lines
    with db.reading() as s:
        row = s.scalar(sa.select(ThrottleBucket).where(ThrottleBucket.key == "busy.example"))
    assert row is not None and row.factor == 0.5


def test_config_rejects_bad_throttle_tables_with_one_line() -> None:
    with pytest.raises(config.ConfigError, match=r'\[throttle.domains."gmail.com"\]: unknown key'):
        config.from_dict({"throttle": {"domains": {"gmail.com": {"rat": 1}}}}, source="t")
    with pytest.raises(config.ConfigError, match="not a domain name"):
        config.from_dict({"throttle": {"domains": {"localhost": {"rate": 1}}}}, source="t")
    with pytest.raises(config.ConfigError, match=r"\[throttle\] burst: must be greater than 0"):
        config.from_dict({"throttle": {"burst": 0}}, source="t")
    with pytest.raises(config.ConfigError, match="expected tables"):
        config.from_dict({"throttle": {"domains": 5}}, source="t")
    loaded = config.from_dict(
        {"throttle": {"rate": 50, "domains": {"GMAIL.com": {"rate": 5, "concurrency": 2}}}},
        source="t",
    )
    assert loaded.throttle.rate == 50.0
    assert loaded.throttle.domains == {"gmail.com": DomainLimit(rate=5.0, concurrency=2)}
    assert MESSAGES.startswith("*")  # never a domain name
