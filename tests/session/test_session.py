"""greenmail.session.Session against the scripted fault server, in this process under gevent.

Every scenario checks where the queue file ends up (outgoing/ untouched, outgoing/ID,1,NEXT
requeued with backoff, failed/, delivered = gone), the delivery state in meta/, what the relay
received, the metric deltas, and that outgoing_active/ is empty afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import gevent
import pytest
from faultserver import FaultServer
from session_harness import Harness as BaseHarness
from session_harness import gwait
from support import free_port

from greenmail import wire
from greenmail.queuefile import Entry, State
from greenmail.session import Session

T = 0.4  # every SMTP timeout, seconds
MIN_BACKOFF = 300
STAGES = ("banner", "helo", "mail", "rcpt", "data", "message")
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
# (4xx, 5xx) reply per stage
CODES = {
    "banner": ("421 4.3.2 busy", "554 5.3.0 go away"),
    "helo": ("421 4.3.2 busy", "550 5.7.1 not you"),
    "mail": ("451 4.3.0 try later", "550 5.1.8 bad sender"),
    "rcpt": ("450 4.2.1 mailbox busy", "550 5.1.1 no such user"),
    "data": ("451 4.3.0 no data now", "554 5.3.4 no data ever"),
    "message": ("452 4.3.1 disk full", "554 5.6.0 content rejected"),
}
BODY = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m@test>\r\nSubject: hi\r\n\r\nhello\r\n"


class Harness(BaseHarness):
    """The stage machine one command at a time; PIPELINING has tests of its own."""

    timeout = T

    def __init__(self, tmp_path: Path, port: int, **overrides: dict) -> None:
        relay = {"pipelining": False, **overrides.pop("relay", {})}
        super().__init__(tmp_path, port, relay=relay, **overrides)


# -- helpers for expectations ------------------------------------------------------------


def assert_untouched(h: Harness, qid: str) -> None:
    """Nothing claimed or charged: original name, no state, no attempt counted."""
    assert h.where(qid) == ("outgoing", Entry(qid, qid, 0, 0))
    assert h.state(qid) == State()
    for result in ("delivered", "deferred", "failed"):
        assert h.m("delivery_attempts_total", result=result) == 0
    for reason in ("temporary", "timeout", "connection", "protocol", "shutdown"):
        assert h.m("requeues_total", reason=reason) == 0


def assert_requeued(
    h: Harness, qid: str, reason: str, before: float, attempts: int = 1, alone: bool = True
) -> Entry:
    """Back in outgoing/ as ID,ATTEMPTS,NEXT with NEXT = now + min_backoff; ``alone``: the only message."""
    loc = h.where(qid)
    assert loc is not None and loc[0] == "outgoing", loc
    e = loc[1]
    assert e.attempts == attempts
    assert_backoff(e, before, MIN_BACKOFF)
    assert h.m("requeues_total", reason=reason) == 1
    assert h.m("delivery_attempts_total", result="deferred") == 1
    if alone:
        assert h.m("delivery_attempts_total", result="failed") == 0
        assert h.m("delivery_attempts_total", result="delivered") == 0
    return e


def assert_backoff(e: Entry, before: float, backoff: float) -> None:
    """next_at = now + backoff, plus the outbox's jitter of up to a quarter more."""
    assert int(before) + backoff <= e.next_at <= time.time() + backoff * 1.25 + 1, (e, before)


def assert_failed(h: Harness, qid: str) -> None:
    assert h.where(qid) == ("failed", Entry(f"{qid},1,0", qid, 1, 0))
    assert h.m("delivery_attempts_total", result="failed") == 1
    assert (
        sum(h.m("requeues_total", reason=r) for r in ("temporary", "timeout", "connection", "protocol")) == 0
    )


def transactions(commands: list[str]) -> dict[str, list[str]]:
    """MAIL FROM line -> the RCPT lines that followed it (the last transaction per sender)."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for cmd in commands:
        if cmd.startswith("MAIL"):
            current = out[cmd] = []
        elif cmd.startswith("RCPT"):
            current.append(cmd)
    return out


# -- every stage x every fault -------------------------------------------------------------

FAULTS = ("4xx", "5xx", "drop", "stall", "garbage")
REASONS = {"4xx": "temporary", "drop": "connection", "stall": "timeout", "garbage": "protocol"}


def action(stage: str, fault: str) -> object:
    return {
        "4xx": CODES[stage][0],
        "5xx": CODES[stage][1],
        "drop": "drop",
        "stall": "stall",
        "garbage": b"garbage\r\n",
    }[fault]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_fault(h: Harness, server: FaultServer, stage: str, fault: str) -> None:
    qid = h.enqueue()
    server.script = {stage: action(stage, fault)}
    before = time.time()
    took = h.run()
    assert took < 5 * T + 1

    assert h.m("connection_attempts_total", result="ok") == 1
    assert server.connections == 1
    # stages before the faulty one were reached once, later ones never
    i = STAGES.index(stage)
    for s in STAGES[:i]:
        assert h.m("smtp_stage_reached_total", stage=s) == 1, s
    for s in STAGES[i + 1 :]:
        assert h.m("smtp_stage_reached_total", stage=s) == 0, s
    reached = h.m("smtp_stage_reached_total", stage=stage)
    assert reached == (2 if (stage, fault) == ("helo", "5xx") else 1)
    if fault in ("4xx", "5xx"):
        code = CODES[stage][fault == "5xx"][:3]
        assert h.m("smtp_replies_total", stage=stage, code=code) == reached
    if fault == "garbage":
        assert h.m("smtp_replies_total", stage=stage, code="other") == 1
    # the body reached the relay only when the fault is after the final dot
    assert len(server.messages) == (1 if stage == "message" else 0)
    # a broken connection is closed at once; a refused transaction is reset and the session QUITs
    prefix = ["EHLO", "MAIL", "RCPT", "DATA"][:i]
    if fault in ("drop", "stall", "garbage"):
        assert server.verbs() == prefix
    elif stage not in ("banner", "helo"):
        assert server.verbs() == [*prefix, "RSET", "QUIT"]

    if stage in ("banner", "helo"):
        assert_untouched(h, qid)
        assert h.greeted == [False]
        if (stage, fault) == ("helo", "5xx"):
            assert server.verbs()[:2] == ["EHLO", "HELO"]
        return
    assert h.greeted == [True]
    st = h.state(qid)
    if fault == "5xx":
        assert_failed(h, qid)
        assert st.recipients == {RCPT: "failed"}
        assert CODES[stage][1] in st.last_error
        assert CODES[stage][1] in st.errors[RCPT]
        assert h.m("recipients_total", result="failed") == 1
        assert h.m("bounces_total") == 1
        return
    assert_requeued(h, qid, REASONS[fault], before)
    assert st.recipients == {}
    assert st.last_error
    if fault == "4xx":
        assert CODES[stage][0] in st.last_error
    assert h.m("recipients_total", result="deferred") == 1


@pytest.mark.parametrize("stage", STAGES)
def test_reply_of_the_wrong_class_is_a_protocol_error(h: Harness, server: FaultServer, stage: str) -> None:
    """A well-formed reply the stage cannot have (354 to MAIL, 250 to DATA, ...)."""
    qid = h.enqueue()
    server.script = {stage: "250 fine" if stage == "data" else "354 what"}
    before = time.time()
    h.run()
    if stage in ("banner", "helo"):
        assert_untouched(h, qid)
    else:
        assert_requeued(h, qid, "protocol", before)


def test_multiline_4xx_reply_is_kept_whole(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue()
    server.script = {"mail": "451-4.3.0 first line\n451 4.3.0 second line"}
    before = time.time()
    h.run()
    assert_requeued(h, qid, "temporary", before)
    assert "first line" in h.state(qid).last_error
    assert "second line" in h.state(qid).last_error


# -- greeting ------------------------------------------------------------------------------


def test_ehlo_refused_falls_back_to_helo(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue()
    server.script = {"helo": ["502 5.5.1 no EHLO here", "250 hello"]}
    h.run()
    assert h.where(qid) is None
    assert server.verbs() == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.commands()[1] == "HELO client.test"
    assert h.m("delivery_attempts_total", result="delivered") == 1


def test_connect_refused(h: Harness, tmp_path: Path) -> None:
    qid = h.enqueue()
    h2 = Harness(tmp_path, free_port())
    took = h2.run()
    assert took < 2
    assert h2.m("connection_attempts_total", result="refused") == 1
    assert h2.m("connection_attempts_total", result="ok") == 0
    assert h2.greeted == [False]
    assert_untouched(h2, qid)


# -- recipients ----------------------------------------------------------------------------


def test_rcpt_mix_accepted_recipient_is_never_sent_again(h: Harness, server: FaultServer) -> None:
    a, b, c = "a@example.net", "b@example.net", "c@example.net"
    qid = h.enqueue(a, b, c)
    server.script = {"rcpt": {"when": {f"<{b}>": "450 4.2.1 busy", f"<{c}>": "550 5.1.1 unknown"}}}
    before = time.time()
    h.run()
    assert_requeued(h, qid, "temporary", before)
    st = h.state(qid)
    assert st.recipients == {a: "delivered", c: "failed"}
    assert "450 4.2.1 busy" in st.errors[b]
    assert "550 5.1.1 unknown" in st.errors[c]
    assert [m["recipients"] for m in server.messages] == [[a]]
    for result in ("delivered", "deferred", "failed"):
        assert h.m("recipients_total", result=result) == 1

    assert h.spool.retry(qid)  # due now, attempts kept
    assert h.where(qid) == ("outgoing", Entry(f"{qid},1,0", qid, 1, 0))
    server.script = {}
    h.run()
    # the second connection also carries the bounce for c (from <>): only count our transaction
    assert transactions(server.commands(1))[f"MAIL FROM:<{SENDER}>"] == [f"RCPT TO:<{b}>"]
    assert [m["recipients"] for m in server.messages if m["sender"] == SENDER] == [[a], [b]]
    assert h.m("bounces_total") == 1
    # nothing is left to try and one recipient failed: failed/, with the whole story in the state
    assert h.where(qid) == ("failed", Entry(f"{qid},2,0", qid, 2, 0))
    assert h.state(qid).recipients == {a: "delivered", b: "delivered", c: "failed"}


def test_no_recipient_accepted_sends_no_data_and_goes_on(h: Harness, server: FaultServer) -> None:
    bad = h.enqueue("x@example.net")
    good = h.enqueue("y@example.net")
    server.script = {"rcpt": {"when": {"<x@example.net>": "550 5.1.1 unknown"}}}
    h.run()
    assert server.connections == 1
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert h.where(bad) == ("failed", Entry(f"{bad},1,0", bad, 1, 0))
    assert h.where(good) is None
    assert [m["recipients"] for m in server.messages] == [["y@example.net"]]
    assert h.m("delivery_attempts_total", result="failed") == 1
    assert h.m("delivery_attempts_total", result="delivered") == 1


def test_several_messages_over_one_connection(h: Harness, server: FaultServer) -> None:
    ids = [h.enqueue(f"r{i}@example.net", sender=f"s{i}@example.org") for i in range(4)]
    h.run()
    assert server.connections == 1
    assert server.max_concurrent == 1
    assert server.verbs().count("MAIL") == 4
    assert server.verbs()[-1] == "QUIT"
    assert "RSET" not in server.verbs()
    assert [(m["sender"], m["recipients"]) for m in server.messages] == [
        (f"s{i}@example.org", [f"r{i}@example.net"]) for i in range(4)
    ]
    assert all(h.where(q) is None for q in ids)
    assert h.names("meta") == []
    assert h.m("delivery_attempts_total", result="delivered") == 4
    assert h.m("connection_attempts_total", result="ok") == 1
    assert h.m("delivery_delay_seconds_count") == 4
    assert h.m("smtp_session_duration_seconds_count") == 1
    assert h.metrics.active == 0


def test_a_temporary_failure_does_not_end_the_connection(h: Harness, server: FaultServer) -> None:
    first = h.enqueue("x@example.net")
    second = h.enqueue("y@example.net")
    server.script = {"message": ["451 4.3.0 later"]}  # only the first message
    before = time.time()
    h.run()
    assert server.connections == 1
    assert_requeued(h, first, "temporary", before, alone=False)
    assert h.where(second) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]


def test_too_many_recipients_452_sends_the_rest_in_a_new_transaction(h: Harness, server: FaultServer) -> None:
    a, b, c = "a@example.net", "b@example.net", "c@example.net"
    qid = h.enqueue(a, b, c)
    server.script = {"rcpt": ["250 ok", "452 4.5.3 too many recipients"]}  # the 2nd RCPT of the connection
    h.run()
    assert h.where(qid) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert [m["recipients"] for m in server.messages] == [[a], [b, c]]
    assert h.m("recipients_total", result="delivered") == 3
    assert h.m("delivery_attempts_total", result="delivered") == 1
    assert sum(h.m("requeues_total", reason=r) for r in ("temporary", "connection", "protocol")) == 0


@pytest.mark.parametrize("fault", ["drop", "stall", "garbage"])
def test_a_broken_connection_charges_only_the_message_in_flight(
    h: Harness, server: FaultServer, fault: str
) -> None:
    first = h.enqueue("x@example.net")
    second = h.enqueue("y@example.net")
    server.script = {"rcpt": action("rcpt", fault)}
    before = time.time()
    h.run()
    assert server.connections == 1
    assert_requeued(h, first, REASONS[fault], before)
    assert h.where(second) == ("outgoing", Entry(second, second, 0, 0))
    assert h.state(second) == State()


# -- the body ------------------------------------------------------------------------------


def test_body_is_dot_stuffed_and_crlf_normalised(h: Harness, server: FaultServer) -> None:
    body = (
        b"Date: Thu, 1 Jan 2026 00:00:00 +0000\nMessage-ID: <m@test>\n\n"
        b".line starting with a dot\n..two dots\nbare LF\nbare CR\rCRLF\r\n.\r\n"
        b"a lone dot above\n.\nlast line without newline."
    )
    h.enqueue(body=body)
    h.run()
    (msg,) = server.messages
    assert msg["data"] == wire.normalise(body)
    assert msg["wire"] == wire.stuff(body)
    lines = msg["wire"].split(b"\r\n")
    assert all(b"\r" not in ln and b"\n" not in ln for ln in lines)
    assert b"\r\n..line starting" in msg["wire"]
    assert b"\r\n...two dots" in msg["wire"]
    assert msg["wire"].endswith(b"newline.\r\n.\r\n")


def test_big_body_across_chunks(h: Harness, server: FaultServer) -> None:
    """Dots, CRs and LFs on and around the 64 KiB chunk boundaries the session reads the file in."""
    header = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <big@test>\r\n\r\n"
    pieces = [b".", b"\r", b"\n", b"\r\n", b"x", b"..", b"\n.", b"\r."]
    body = header + b"".join(pieces[i * 7 % len(pieces)] + b"ab"[: i % 3] for i in range(120_000))
    h.enqueue(body=body)
    h.run()
    (msg,) = server.messages
    assert msg["data"] == wire.normalise(body)
    assert msg["wire"] == wire.stuff(body)


# -- hostile replies -----------------------------------------------------------------------


@pytest.mark.parametrize("flood", ["huge", "endless"])
@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_oversized_reply_is_a_protocol_error(h: Harness, server: FaultServer, stage: str, flood: str) -> None:
    qid = h.enqueue()
    server.script = {stage: flood}
    before = time.time()
    took = h.run()
    assert took < 3
    assert_requeued(h, qid, "protocol", before)
    assert h.m("smtp_replies_total", stage=stage, code="other") == 1
    gwait(lambda: server.closed == 1, what="the server to see the client go")


def test_trickling_reply_times_out_on_the_whole_reply(h: Harness, server: FaultServer) -> None:
    """The timeout bounds the whole reply, not each recv: a slow endless reply cannot hold us."""
    qid = h.enqueue()
    server.script = {"mail": "trickle"}
    before = time.time()
    took = h.run()
    assert took < 3 * T + 1
    assert_requeued(h, qid, "timeout", before)


def test_relay_that_stops_reading_the_body_times_out(tmp_path: Path, server: FaultServer) -> None:
    """data_block: a write of the body that cannot complete (the relay reads nothing more)."""
    h = Harness(tmp_path, server.port)
    qid = h.enqueue(body=BODY + b"x" * 998 + b"\r\n" * 16 * 1024)  # 16 MB: more than the socket buffers
    server.script = {"data": {"reply": "354 go", "then": "deaf"}}
    before = time.time()
    took = h.run()
    assert took < 3 * T + 2
    assert_requeued(h, qid, "timeout", before)
    assert "message" in h.state(qid).last_error


def test_relay_that_drops_during_the_body(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(body=BODY + (b"y" * 998 + b"\r\n") * 16 * 1024)
    server.script = {"data": {"reply": "354 go", "then": "drop"}}
    before = time.time()
    h.run()
    assert_requeued(h, qid, "connection", before)
    assert server.messages == []


def test_relay_that_never_answers_quit(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue()
    server.script = {"quit": "stall"}
    took = h.run()
    assert took < 3 * T + 1
    assert h.where(qid) is None
    assert h.m("delivery_attempts_total", result="delivered") == 1


# -- retry bookkeeping ---------------------------------------------------------------------


def test_backoff_doubles_with_each_attempt(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue()
    server.script = {"rcpt": "450 4.2.1 busy"}
    h.run()
    assert h.spool.retry(qid)
    before = time.time()
    h.run()
    loc = h.where(qid)
    assert loc is not None and loc[0] == "outgoing"
    assert loc[1].attempts == 2
    assert_backoff(loc[1], before, 2 * MIN_BACKOFF)


def test_temporary_failure_past_max_lifetime_fails(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, retry={"max_lifetime": 3600})
    qid = h.enqueue()
    old = time.time() - 7200
    h.backdate(qid, old)
    server.script = {"rcpt": "450 4.2.1 busy"}
    h.run()
    assert_failed(h, qid)
    assert h.m("messages_expired_total") == 1
    st = h.state(qid)
    assert st.recipients == {RCPT: "failed"}
    assert "expired" in st.last_error


def test_concurrent_sessions_send_each_message_once(h: Harness, server: FaultServer) -> None:
    ids = [h.enqueue(f"r{i}@example.net") for i in range(12)]
    h.queue.refresh()
    sessions = [Session(h.transport, h.outbox) for _ in range(3)]
    greenlets = [gevent.spawn(s.run) for s in sessions]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert all(g.dead for g in greenlets)
    h.assert_settled()
    assert server.connections == 3
    assert sorted(r for m in server.messages for r in m["recipients"]) == sorted(
        f"r{i}@example.net" for i in range(12)
    )
    assert all(h.where(q) is None for q in ids)
    assert h.m("delivery_attempts_total", result="delivered") == 12


# -- the final dot and shutdown ------------------------------------------------------------


def test_drop_after_final_dot_warns_of_a_duplicate(
    h: Harness, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    qid = h.enqueue()
    server.script = {"message": "drop"}
    before = time.time()
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    assert len(server.messages) == 1
    assert_requeued(h, qid, "connection", before)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("delivered twice" in r.getMessage() and qid in r.getMessage() for r in warnings)


def test_timeout_after_final_dot_warns_of_a_duplicate(
    h: Harness, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    qid = h.enqueue()
    server.script = {"message": "stall"}
    before = time.time()
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    assert_requeued(h, qid, "timeout", before)
    assert "delivered twice" in caplog.text


def test_no_duplicate_warning_before_the_final_dot(
    h: Harness, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Stale state of one message must not leak into the next: the warning is per message."""
    h.enqueue()
    server.script = {"data": "drop"}
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    assert "delivered twice" not in caplog.text


def test_kill_while_stalled_in_data_puts_the_claim_back(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, timeouts={"data_init": 60})
    qid = h.enqueue()
    server.script = {"data": "stall"}
    g = h.session()
    gwait(lambda: "DATA" in server.verbs(), what="DATA")
    gevent.sleep(0.05)  # the session is now waiting for the reply
    assert h.where(qid)[0] == "outgoing_active"
    g.kill(block=True, timeout=5)
    assert g.dead
    h.assert_settled()
    assert h.where(qid) == ("outgoing", Entry(qid, qid, 0, 0))  # original name: no attempt counted
    assert h.m("requeues_total", reason="shutdown") == 1
    for result in ("delivered", "deferred", "failed"):
        assert h.m("delivery_attempts_total", result=result) == 0
    assert h.metrics.active == 0
    gwait(lambda: server.closed == 1, what="the connection to close")


# -- bounces (contract section 5: 5xx -> the sender gets a bounce when retry.bounce is on) ---


def _bounces(h: Harness, original: str) -> list[tuple[str, str]]:
    """(sender line, recipients line) of every queue file in outgoing/ and failed/ but the original."""
    return [(s, r) for sub in ("outgoing", "failed") for qid, s, r in h.envelopes(sub) if qid != original]


def test_permanent_failure_bounces_to_the_sender(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue()
    server.script = {"rcpt": "550 5.1.1 no such user"}
    h.run()
    assert_failed(h, qid)
    assert h.m("bounces_total") == 1
    assert _bounces(h, qid) == [("", SENDER)]  # a DSN from the null sender to the sender


def test_no_bounce_for_a_null_sender(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(sender="")
    server.script = {"rcpt": "550 5.1.1 no such user"}
    h.run()
    assert_failed(h, qid)
    assert h.m("bounces_total") == 0
    assert _bounces(h, qid) == []


def test_no_bounce_when_disabled(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, retry={"bounce": False})
    qid = h.enqueue()
    server.script = {"rcpt": "550 5.1.1 no such user"}
    h.run()
    assert_failed(h, qid)
    assert h.m("bounces_total") == 0
    assert _bounces(h, qid) == []


# -- desynchronised replies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        # 354 and, unasked, 250 at once; then the message is rejected: the early 250 is no answer
        # to the final dot, and taking it for one would call a rejected message delivered (lost)
        {"data": "354 go ahead\n250 2.0.0 not yet asked", "message": "554 5.6.0 rejected"},
        # MAIL answered twice: the stray 550 must not fail a recipient the relay never refused
        {"mail": "250 ok\n550 5.1.1 not yet asked"},
    ],
    ids=["message", "rcpt"],
)
def test_reply_sent_ahead_of_its_command_is_a_protocol_error(h: Harness, server: FaultServer, script) -> None:
    """Surplus reply data waiting when a command (or the body) is sent answers nothing the client
    asked: a desynchronised relay, a protocol error (contract 5: temporary, requeued)."""
    qid = h.enqueue()
    server.script = script
    before = time.time()
    h.run()
    assert h.where(qid) is not None, "a message the relay rejected was taken as delivered"
    assert h.state(qid).recipients == {}
    assert h.m("bounces_total") == 0
    assert_requeued(h, qid, "protocol", before)


@pytest.mark.spool_only  # slows the spool's requeue, which runs in the threadpool
def test_kill_during_the_settling_rename_keeps_counters_and_file_in_step(
    h: Harness, server: FaultServer
) -> None:
    """The daemon's stop kills sessions; a kill landing while the threadpool renames the claim
    must neither settle it twice nor lose the attempt's counters."""
    entered, go = threading.Event(), threading.Event()
    requeue = h.spool.requeue

    def slow_requeue(*args, **kwargs):
        entered.set()
        go.wait(10)
        return requeue(*args, **kwargs)

    h.spool.requeue = slow_requeue
    qid = h.enqueue()
    server.script = {"rcpt": "450 4.2.1 busy"}
    before = time.time()
    g = h.session()
    gwait(entered.is_set, what="the requeue to start")
    g.kill(block=False)
    gevent.sleep(0.05)
    go.set()
    g.join(5)
    assert g.dead
    h.assert_settled()
    assert_requeued(h, qid, "temporary", before)
    assert h.m("requeues_total", reason="shutdown") == 0


@pytest.mark.spool_only  # slows the spool's enqueue, which runs in the threadpool
def test_kill_while_the_bounce_is_written_sends_one_bounce(h: Harness, server: FaultServer) -> None:
    """A kill landing while the outbox enqueues the bounce: the sender gets one bounce, not two,
    and the failed message ends in failed/ (nothing is tried again for a failed recipient)."""
    qid = h.enqueue()
    entered, go = threading.Event(), threading.Event()
    enqueue = h.spool.enqueue

    def slow_enqueue(*args, **kwargs):
        entered.set()
        go.wait(10)
        return enqueue(*args, **kwargs)

    h.spool.enqueue = slow_enqueue
    server.script = {"rcpt": {"when": {f"<{RCPT}>": "550 5.1.1 no such user"}}}
    g = h.session()
    gwait(entered.is_set, what="the bounce to be written")
    g.kill(block=False)
    gevent.sleep(0.05)
    go.set()
    g.join(5)
    assert g.dead
    h.assert_settled()
    h.spool.enqueue = enqueue
    h.run()  # the next pass: delivers whatever is due (the bounce, and the message if it came back)
    bounces = [m for m in server.messages if m["sender"] == ""]
    left = [b for b in _bounces(h, qid) if b[0] == ""]
    assert len(bounces) + len(left) == 1, (bounces, left)
    assert h.where(qid) == ("failed", Entry(f"{qid},1,0", qid, 1, 0))


def test_message_with_every_recipient_settled_opens_no_transaction(h: Harness, server: FaultServer) -> None:
    """A message back in outgoing/ whose recipients are all settled (a crash or kill between the
    state write and the rename) has nothing to send: no MAIL without RCPT, no transaction left
    open that makes the relay refuse the next message's MAIL with 503."""
    settled = h.enqueue()
    h.spool.write_state(settled, State(recipients={RCPT: "delivered"}))
    other = h.enqueue("y@example.net")
    h.run()
    assert h.where(settled) is None
    assert h.where(other) is None, h.state(other)
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [m["recipients"] for m in server.messages] == [["y@example.net"]]


def test_connect_timeout(tmp_path: Path) -> None:
    """A listener whose accept queue is full drops SYNs: the connect times out."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue (backlog 0 still admits one or two)
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        try:
            h = Harness(tmp_path, port)
            qid = h.enqueue()
            took = h.run()
        finally:
            for c in fillers:
                c.close()
    assert took < 4 * T + 1
    assert h.m("connection_attempts_total", result="timeout") == 1
    assert h.greeted == [False]
    assert_untouched(h, qid)


def test_delivery_line_keeps_a_reply_with_percent_signs_verbatim(
    h: Harness, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The delivery line is built whole, not %-formatted: a relay's '%s' or '%(x)d' is text."""
    qid = h.enqueue()
    server.script = {"rcpt": "450 4.2.1 busy %s %(x)d 100%"}
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    lines = [r.getMessage() for r in caplog.records if qid in r.getMessage() and "status=" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith("dsn=4.2.1, status=deferred (450 4.2.1 busy %s %(x)d 100%)")
    assert lines[0].startswith(f"{qid}: to=<")


def test_a_claim_no_longer_ours_stops_before_the_final_dot(
    h: Harness, server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared queue's lease that could not be renewed in time (Claim.keep raises): the relay
    never sees the final dot, the connection is closed without QUIT, the claim ends once."""
    from greenmail.errors import LeaseLost
    from greenmail.queue import Claim

    qid = h.enqueue()

    def lost(claim: Claim) -> None:
        raise LeaseLost(f"{claim.id}: this node's lease could not be renewed in time")

    monkeypatch.setattr(Claim, "keep", lost)
    h.run()
    assert server.messages == []
    verbs = server.verbs()
    assert "DATA" in verbs and "QUIT" not in verbs
    directory, entry = h.where(qid)
    assert directory == "outgoing" and entry.attempts == 1
    assert "lease could not be renewed" in (h.state(qid).last_error or "")
