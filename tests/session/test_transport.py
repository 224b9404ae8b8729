"""The transport features of greenmail.session/connection against the scripted fault server:
PIPELINING, CHUNKING (BDAT), SIZE, 8BITMIME, SMTPUTF8, max_messages_per_connection, relay
failover, the 421 throttle, the rate limit, and the STARTTLS/AUTH refusals that need no TLS.

Each Session runs in this process under gevent, as in test_session.py (its harness is copied,
not imported). Real TLS handshakes are covered by the interop tests.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

import pytest
from faultserver import FaultServer, ehlo
from session_harness import Harness as BaseHarness
from session_harness import gwait
from support import free_port

from greenmail import wire
from greenmail.queuefile import Entry, State
from greenmail.shaping import RateLimiter, Throttle

T = 0.5  # every SMTP timeout, seconds
MIN_BACKOFF = 300
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
A, B, C = "a@example.net", "b@example.net", "c@example.net"
BODY = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m@test>\r\nSubject: hi\r\n\r\nhello\r\n"
# a body with dots at line starts, bare LF and CR line ends and no final line end
DOTTY = (
    b"Date: Thu, 1 Jan 2026 00:00:00 +0000\nMessage-ID: <dots@test>\n\n"
    b".line starting with a dot\n..two dots\nbare LF\nbare CR\rCRLF\r\n.\r\n"
    b"a lone dot above\n.\nlast line without newline."
)
CHUNKING = ehlo("PIPELINING", "8BITMIME", "CHUNKING")
PROOF = "hold_mail"  # the fault server's pipelining proof option
REQUEUE_REASONS = ("temporary", "timeout", "connection", "protocol", "shutdown")


class Harness(BaseHarness):
    timeout = T


def assert_untouched(h: Harness, qid: str) -> None:
    """Nothing claimed or charged: original name, no state, no attempt counted, no bounce."""
    assert h.where(qid) == ("outgoing", Entry(qid, qid, 0, 0))
    assert h.state(qid) == State()
    for result in ("delivered", "deferred", "failed"):
        assert h.m("delivery_attempts_total", result=result) == 0
    for reason in REQUEUE_REASONS:
        assert h.m("requeues_total", reason=reason) == 0
    assert h.m("bounces_total") == 0
    assert h.others(qid) == []


def assert_requeued(h: Harness, qid: str, reason: str, attempts: int = 1) -> None:
    loc = h.where(qid)
    assert loc is not None and loc[0] == "outgoing", loc
    assert loc[1].attempts == attempts
    assert loc[1].next_at > time.time() + MIN_BACKOFF / 2
    for r in REQUEUE_REASONS:
        assert h.m("requeues_total", reason=r) == (1 if r == reason else 0), r
    assert h.m("delivery_attempts_total", result="deferred") == 1


def assert_failed(h: Harness, qid: str) -> None:
    assert h.where(qid) == ("failed", Entry(f"{qid},1,0", qid, 1, 0))
    assert h.m("delivery_attempts_total", result="failed") == 1


def transactions(commands: list[str]) -> list[list[str]]:
    """The command lines from each MAIL up to (not including) the next MAIL, RSET or QUIT."""
    out: list[list[str]] = []
    for cmd in commands:
        verb = cmd.split(" ", 1)[0].upper()
        if verb == "MAIL":
            out.append([cmd])
        elif verb in ("RSET", "QUIT"):
            out.append([])
        elif out:
            out[-1].append(cmd)
    return [t for t in out if t]


# -- PIPELINING ------------------------------------------------------------------------------


def test_pipelined_transaction_is_written_before_any_reply_is_read(h: Harness, server: FaultServer) -> None:
    """The proof server answers MAIL only once DATA has arrived: only a pipelining client delivers."""
    qid = h.enqueue(A, B, C)
    server.script = {PROOF: "DATA"}
    h.run()  # a client that waits for MAIL's reply times out (see the next test)
    assert h.where(qid) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
    assert [m["recipients"] for m in server.messages] == [[A, B, C]]
    assert server.messages[0]["data"] == BODY
    assert h.m("delivery_attempts_total", result="delivered") == 1
    assert h.m("recipients_total", result="delivered") == 3


@pytest.mark.parametrize(
    "configured, advertised",
    [(False, True), (True, False)],
    ids=["pipelining-off", "not-advertised"],
)
def test_no_pipelining_waits_for_each_reply(tmp_path: Path, configured: bool, advertised: bool) -> None:
    """relay.pipelining=false, or PIPELINING not offered: one command at a time, so the proof
    server's held-back MAIL reply times the session out."""
    script = {PROOF: "DATA", "ehlo": ehlo("PIPELINING", "8BITMIME") if advertised else ehlo("8BITMIME")}
    with FaultServer(script) as server:
        h = Harness(tmp_path, server.port, relay={"pipelining": configured})
        qid = h.enqueue()
        took = h.run()
    assert took < 3 * T + 1
    assert server.verbs() == ["EHLO", "MAIL"]
    assert_requeued(h, qid, "timeout")
    assert "mail" in h.state(qid).last_error


def test_pipelined_replies_are_matched_in_order(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(A, B, C)
    server.script = {
        PROOF: "DATA",
        "rcpt": {"when": {f"<{B}>": "450 4.2.1 busy", f"<{C}>": "550 5.1.1 unknown"}},
    }
    h.run()
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]
    assert [m["recipients"] for m in server.messages] == [[A]]
    st = h.state(qid)
    assert st.recipients == {A: "delivered", C: "failed"}
    assert "450 4.2.1 busy" in st.errors[B]
    assert "550 5.1.1 unknown" in st.errors[C]
    assert_requeued(h, qid, "temporary")
    for result in ("delivered", "deferred", "failed"):
        assert h.m("recipients_total", result=result) == 1, result
    assert h.m("bounces_total") == 1  # for C


def test_pipelined_mail_4xx_defers_all_whatever_rcpt_and_data_say(h: Harness, server: FaultServer) -> None:
    """MAIL refused: the relay answers the pipelined RCPTs and DATA with 503 (no transaction);
    those replies must neither fail a recipient nor bounce."""
    qid = h.enqueue(A, B)
    server.script = {PROOF: "DATA", "mail": "451 4.3.0 try later"}
    h.run()
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]
    assert server.messages == []
    st = h.state(qid)
    assert st.recipients == {}
    assert "451 4.3.0 try later" in st.last_error
    assert all("451 4.3.0" in st.errors[r] for r in (A, B))
    assert_requeued(h, qid, "temporary")
    assert h.m("recipients_total", result="deferred") == 2
    assert h.m("recipients_total", result="failed") == 0
    assert h.m("delivery_attempts_total", result="failed") == 0
    assert h.m("bounces_total") == 0
    assert h.others(qid) == []


def test_pipelined_mail_5xx_fails_all_once(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(A, B)
    server.script = {"mail": "550 5.1.8 bad sender"}
    h.run()
    assert_failed(h, qid)
    st = h.state(qid)
    assert st.recipients == {A: "failed", B: "failed"}
    assert all("550 5.1.8" in st.errors[r] for r in (A, B))
    assert h.m("recipients_total", result="failed") == 2
    assert h.m("bounces_total") == 1
    assert len(h.others(qid)) == 1


def test_data_accepted_with_no_recipient_ends_the_empty_message_at_once(
    h: Harness, server: FaultServer
) -> None:
    """All RCPTs refused but the pipelined DATA got 354: "." at once, then RSET; no body sent."""
    qid = h.enqueue(A)
    server.script = {"rcpt": "550 5.1.1 unknown", "data": "354 go ahead"}
    h.run()
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"]
    (msg,) = server.messages
    assert msg["recipients"] == []
    assert msg["wire"] == b".\r\n"
    assert_failed(h, qid)
    assert h.state(qid).recipients == {A: "failed"}


@pytest.mark.parametrize(
    "rcpt_replies, expected",
    [
        (["250 ok", "452 4.5.3 too many recipients", "452 4.5.3 too many recipients"], [[A], [B, C]]),
        (["250 ok", "452 4.5.3 too many recipients", "250 ok"], [[A, C], [B]]),
    ],
    ids=["rest-refused", "one-refused"],
)
def test_pipelined_452_sends_the_rest_in_a_second_transaction(
    h: Harness, server: FaultServer, rcpt_replies: list[str], expected: list[list[str]]
) -> None:
    qid = h.enqueue(A, B, C)
    server.script = {PROOF: "DATA", "rcpt": rcpt_replies}  # by occurrence on the connection
    h.run()
    assert server.connections == 1
    assert [m["recipients"] for m in server.messages] == expected
    txns = transactions(server.commands())
    assert [[c.split(" ", 1)[0] for c in t] for t in txns] == [
        ["MAIL"] + ["RCPT"] * (3 if i == 0 else len(expected[1])) + ["DATA"] for i in range(2)
    ]
    assert "RSET" not in server.verbs()
    assert h.where(qid) is None
    assert h.m("recipients_total", result="delivered") == 3
    assert h.m("delivery_attempts_total", result="delivered") == 1
    assert h.m("bounces_total") == 0


# -- the next message behind the final dot (RFC 2920 3.1) ----------------------------------


def bodies(n: int) -> list[bytes]:
    return [BODY.replace(b"<m@test>", f"<m{i}@test>".encode()) for i in range(n)]


def enqueue_n(h: Harness, n: int) -> list[str]:
    return [h.enqueue(f"r{i}@example.net", body=b) for i, b in enumerate(bodies(n))]


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_next_message_commands_go_with_the_end_of_the_previous_one(
    h: Harness, server: FaultServer, chunking: bool
) -> None:
    """The proof server answers the first two final dots only once the next message's RCPT has
    arrived: a client that waits for that reply before its next MAIL times out."""
    ids = enqueue_n(h, 3)
    server.script = {"hold_dot": "RCPT", "hold_dot_count": 2}
    if chunking:
        server.script["ehlo"] = CHUNKING
    h.run()
    assert all(h.where(q) is None for q in ids)
    assert server.connections == 1
    verbs = ["MAIL", "RCPT", "BDAT"] if chunking else ["MAIL", "RCPT", "DATA"]
    seen = server.verbs()
    assert [v for i, v in enumerate(seen) if not (v == "BDAT" == seen[i - 1])] == ["EHLO", *verbs * 3, "QUIT"]
    assert [m["data"] for m in server.messages] == bodies(3)
    assert [m["recipients"] for m in server.messages] == [[f"r{i}@example.net"] for i in range(3)]
    assert h.m("delivery_attempts_total", result="delivered") == 3
    for stage in ("mail", "rcpt", "data", "message"):
        assert h.m("smtp_stage_reached_total", stage=stage) == 3, stage


def test_a_refused_message_does_not_touch_the_next_one_sent_behind_it(
    h: Harness, server: FaultServer
) -> None:
    first, second = enqueue_n(h, 2)
    server.script = {"hold_dot": "RCPT", "message": ["554 5.6.0 content rejected"]}
    h.run()
    assert_failed(h, first)
    assert h.where(second) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]  # no RSET
    assert [m["reply"].split(" ")[0] for m in server.messages] == ["554", "250"]
    assert h.m("delivery_attempts_total", result="delivered") == 1
    assert h.m("bounces_total") == 1


@pytest.mark.parametrize(
    "end, reason",
    [({"reply": "421 4.3.2 shutting down", "then": "drop"}, "temporary"), ("drop", "connection")],
    ids=["421", "drop"],
)
def test_when_the_connection_ends_at_a_dot_the_message_behind_it_goes_back_untouched(
    h: Harness, server: FaultServer, end: object, reason: str
) -> None:
    first, second, third = enqueue_n(h, 3)
    server.script = {"hold_dot": "RCPT", "message": [end]}
    h.run()
    # the proof server answered the dot once the second message's RCPT had arrived; it read no further
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert len(server.messages) == 1
    loc = h.where(first)
    assert loc is not None and loc[0] == "outgoing" and loc[1].attempts == 1
    # the second was claimed and its commands sent, but no reply to them was read
    assert h.where(second) == ("outgoing", Entry(second, second, 0, 0))
    assert h.state(second) == State()
    assert h.where(third) == ("outgoing", Entry(third, third, 0, 0))  # never claimed
    assert h.m("delivery_attempts_total", result="deferred") == 1
    assert h.m("requeues_total", reason="connection") == (2 if reason == "connection" else 1)
    assert h.m("requeues_total", reason="temporary") == (1 if reason == "temporary" else 0)
    assert h.m("spool_messages", state="active") == 0


def test_kill_while_waiting_at_a_dot_puts_back_the_message_claimed_behind_it(
    tmp_path: Path, server: FaultServer
) -> None:
    h = Harness(tmp_path, server.port, timeouts={"data_end": 60})
    first = h.enqueue()
    second = h.enqueue()
    server.script = {"hold_dot": "RCPT", "message": "stall"}  # answered never, but read on
    g = h.session()
    # the second's commands went in the same write as the first's end: the server has that end
    gwait(lambda: len(server.messages) == 1, what="the first message's end at the server")
    assert len(h.names("outgoing_active")) == 2
    g.kill(block=True, timeout=5)
    assert g.dead
    h.assert_settled()
    for qid in (first, second):
        assert h.where(qid) == ("outgoing", Entry(qid, qid, 0, 0))  # no attempt counted
    assert h.m("requeues_total", reason="shutdown") == 2
    for result in ("delivered", "deferred", "failed"):
        assert h.m("delivery_attempts_total", result=result) == 0


# -- CHUNKING --------------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize("size", ["small", "big"])
def test_chunking_sends_the_body_with_bdat(
    tmp_path: Path, server: FaultServer, size: str, pipelining: bool
) -> None:
    h = Harness(tmp_path, server.port, relay={"pipelining": pipelining})
    body = DOTTY
    if size == "big":  # dots, CRs and LFs on and around the 64 KiB chunk boundaries
        pieces = [b".", b"\r", b"\n", b"\r\n", b"x", b"..", b"\n.", b"\r."]
        body += b"\n" + b"".join(pieces[i * 7 % len(pieces)] + b"ab"[: i % 3] for i in range(60_000))
    qid = h.enqueue(body=body)
    server.script = {"ehlo": CHUNKING}
    h.run()
    assert h.where(qid) is None
    verbs = server.verbs()
    assert "DATA" not in verbs
    bdats = [c for c in server.commands() if c.startswith("BDAT")]
    assert bdats and bdats[-1].endswith(" LAST")
    assert all(not c.endswith("LAST") for c in bdats[:-1])
    assert verbs == ["EHLO", "MAIL", "RCPT", *["BDAT"] * len(bdats), "QUIT"]
    (msg,) = server.messages
    assert msg["data"] == wire.normalise(body)  # no dot-stuffing: lines starting with "." as they are
    assert b"\r\n.line starting" in msg["data"] and b"\r\n..two dots" in msg["data"]
    assert sum(msg["chunks"]) == len(wire.normalise(body))
    assert [int(c.split()[1]) for c in bdats] == msg["chunks"]
    if size == "big":
        assert len(bdats) >= 3
    else:  # one round trip: the whole body in one BDAT ... LAST
        assert bdats == [f"BDAT {len(wire.normalise(body))} LAST"]
    assert msg["reply"].startswith("250")
    assert h.m("delivery_attempts_total", result="delivered") == 1


def test_chunking_with_pipelining(h: Harness, server: FaultServer) -> None:
    """MAIL and the RCPTs in one write (the proof holds MAIL's reply until the last RCPT), then BDAT."""
    qid = h.enqueue(A, B, C)
    server.script = {"ehlo": CHUNKING, PROOF: f"RCPT TO:<{C}>"}
    h.run()
    assert h.where(qid) is None
    assert "DATA" not in server.verbs()
    (msg,) = server.messages
    assert msg["recipients"] == [A, B, C]
    assert msg["data"] == BODY


BIG = BODY + (b"z" * 998 + b"\r\n") * 200  # 200 KB: several 64 KiB BDAT chunks


@pytest.mark.parametrize(
    "script, outcome",
    [
        ({"bdat": "451 4.3.0 no chunks now"}, "deferred"),
        ({"bdat": ["250 ok", "554 5.3.4 too much"]}, "failed"),
        ({"bdat": ["250 ok", "250 ok", "452 4.3.1 disk full"]}, "deferred"),
        ({"message": "452 4.3.1 disk full"}, "deferred"),
        ({"message": "554 5.6.0 content rejected"}, "failed"),
    ],
    ids=["first-4xx", "second-5xx", "third-4xx", "last-4xx", "last-5xx"],
)
def test_bdat_refused_part_way(h: Harness, server: FaultServer, script: dict, outcome: str) -> None:
    qid = h.enqueue(body=BIG)
    server.script = {"ehlo": CHUNKING, **script}
    h.run()
    assert len(server.messages) == (0 if "bdat" in script else 1)
    bdats = [c for c in server.commands() if c.startswith("BDAT")]
    if "bdat" in script:
        refused = len(script["bdat"]) if isinstance(script["bdat"], list) else 1
        assert len(bdats) == refused, "chunks sent after the relay refused one"
        assert not any(c.endswith("LAST") for c in bdats)
        reply = script["bdat"] if isinstance(script["bdat"], str) else script["bdat"][-1]
    else:
        reply = script["message"]
    assert server.verbs()[-2:] == ["RSET", "QUIT"]
    st = h.state(qid)
    assert reply in st.errors[RCPT]
    if outcome == "failed":
        assert_failed(h, qid)
        assert st.recipients == {RCPT: "failed"}
        assert h.m("bounces_total") == 1
    else:
        assert_requeued(h, qid, "temporary")
        assert st.recipients == {}
        assert h.m("bounces_total") == 0


def test_chunking_with_no_recipient_accepted_sends_no_bdat(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(A, B)
    server.script = {"ehlo": CHUNKING, "rcpt": "550 5.1.1 unknown"}
    h.run()
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "QUIT"]
    assert server.messages == []
    assert_failed(h, qid)


def test_chunking_off_uses_data(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, relay={"chunking": False})
    qid = h.enqueue(body=DOTTY)
    server.script = {"ehlo": CHUNKING}
    h.run()
    assert h.where(qid) is None
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    (msg,) = server.messages
    assert msg["wire"] == wire.stuff(DOTTY)
    assert msg["data"] == wire.normalise(DOTTY)


def test_chunking_not_advertised_uses_data(h: Harness, server: FaultServer) -> None:
    h.enqueue()
    h.run()
    assert server.verbs() == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


# -- SIZE, 8BITMIME, SMTPUTF8 ----------------------------------------------------------------


@pytest.mark.parametrize("sender", [SENDER, ""], ids=["sender", "null-sender"])
def test_message_over_the_relay_size_is_failed_without_mail(
    h: Harness, server: FaultServer, sender: str
) -> None:
    qid = h.enqueue(A, B, sender=sender, body=BODY + b"x" * 5000 + b"\r\n")
    server.script = {"ehlo": ehlo("PIPELINING", "SIZE 1000")}
    h.run()
    assert "MAIL" not in server.verbs()
    assert server.verbs() == ["EHLO", "QUIT"]
    assert_failed(h, qid)
    st = h.state(qid)
    assert st.recipients == {A: "failed", B: "failed"}
    assert "size" in st.last_error.lower()
    assert all("size" in st.errors[r].lower() and "1000" in st.errors[r] for r in (A, B))
    assert h.m("recipients_total", result="failed") == 2
    if sender:
        assert h.m("bounces_total") == 1
        assert len(h.others(qid)) == 1
    else:
        assert h.m("bounces_total") == 0
        assert h.others(qid) == []


def test_message_over_the_size_does_not_hold_up_the_next(h: Harness, server: FaultServer) -> None:
    big = h.enqueue(A, body=BODY + b"x" * 5000 + b"\r\n")
    small = h.enqueue(B)
    server.script = {"ehlo": ehlo("PIPELINING", "SIZE 1000")}
    h.run()
    assert_failed(h, big)
    assert h.where(small) is None
    assert [m["recipients"] for m in server.messages] == [[B]]


@pytest.mark.parametrize("advertised", ["SIZE 100000", "SIZE"], ids=["limit", "no-limit"])
def test_size_parameter_when_advertised(h: Harness, server: FaultServer, advertised: str) -> None:
    body = BODY + b"y" * 3000 + b"\r\n"
    h.enqueue(body=body)
    server.script = {"ehlo": ehlo("PIPELINING", advertised)}
    h.run()
    (mail,) = [c for c in server.commands() if c.startswith("MAIL")]
    assert mail == f"MAIL FROM:<{SENDER}> SIZE={len(body)}"
    assert len(server.messages) == 1


@pytest.mark.parametrize("value", ["lots", "-1", "\u00b2"])
def test_malformed_size_is_ignored(h: Harness, server: FaultServer, value: str) -> None:
    """A SIZE whose value is no number (here "\u00b2", which str.isdigit() accepts) is no limit."""
    qid = h.enqueue()
    server.script = {"ehlo": ehlo("PIPELINING", f"SIZE {value}")}
    h.run()
    assert h.where(qid) is None
    assert len(server.messages) == 1


def test_no_size_parameter_when_not_advertised(h: Harness, server: FaultServer) -> None:
    h.enqueue()
    h.run()
    (mail,) = [c for c in server.commands() if c.startswith("MAIL")]
    assert mail == f"MAIL FROM:<{SENDER}>"


@pytest.mark.parametrize(
    "body, advertised, param",
    [
        (BODY + "caf\u00e9\r\n".encode(), True, True),
        (BODY, True, False),
        (BODY + "caf\u00e9\r\n".encode(), False, False),
    ],
    ids=["8bit", "7bit", "8bit-not-advertised"],
)
def test_body_8bitmime(h: Harness, server: FaultServer, body: bytes, advertised: bool, param: bool) -> None:
    qid = h.enqueue(body=body)
    server.script = {"ehlo": ehlo("PIPELINING", "8BITMIME") if advertised else ehlo("PIPELINING")}
    h.run()
    (mail,) = [c for c in server.commands() if c.startswith("MAIL")]
    assert mail.endswith(" BODY=8BITMIME") == param
    assert ("BODY=" in mail) == param
    assert h.where(qid) is None
    assert server.messages[0]["data"] == body


UTF8_RCPT = "j\u00f6rg@exampl\u00e9.net"


def latin1(s: str) -> str:
    """How the fault server (which decodes lines as latin-1) records a UTF-8 string."""
    return s.encode().decode("latin-1")


def test_smtputf8_recipient_when_advertised(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(UTF8_RCPT, A)
    server.script = {"ehlo": ehlo("PIPELINING", "8BITMIME", "SMTPUTF8")}
    h.run()
    assert h.where(qid) is None
    (mail,) = [c for c in server.commands() if c.startswith("MAIL")]
    assert mail == f"MAIL FROM:<{SENDER}> SMTPUTF8"
    assert [m["recipients"] for m in server.messages] == [[latin1(UTF8_RCPT), A]]
    assert h.m("recipients_total", result="delivered") == 2


def test_non_ascii_recipient_without_smtputf8_fails_alone(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(UTF8_RCPT, A)
    h.run()  # the default EHLO has no SMTPUTF8
    cmds = server.commands()
    assert [c for c in cmds if c.startswith(("MAIL", "RCPT"))] == [f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{A}>"]
    assert [m["recipients"] for m in server.messages] == [[A]]
    assert_failed(h, qid)
    st = h.state(qid)
    assert st.recipients == {UTF8_RCPT: "failed", A: "delivered"}
    assert st.errors[UTF8_RCPT].startswith("553 5.6.7")
    assert h.m("bounces_total") == 1


def test_non_ascii_sender_without_smtputf8_sends_nothing(h: Harness, server: FaultServer) -> None:
    qid = h.enqueue(A, B, sender="s\u00e9nder@example.org")
    h.run()
    assert "MAIL" not in server.verbs()
    assert_failed(h, qid)
    st = h.state(qid)
    assert st.recipients == {A: "failed", B: "failed"}
    assert all(st.errors[r].startswith("553 5.6.7") for r in (A, B))


# -- connections -----------------------------------------------------------------------------


def test_max_messages_per_connection(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, relay={"max_messages_per_connection": 2})
    ids = [h.enqueue(f"r{i}@example.net") for i in range(5)]
    runs = 0
    while h.names("outgoing"):
        assert runs < 5, "the spool does not empty"
        h.run()
        runs += 1
    assert runs == 3
    assert server.connections == 3
    assert [server.verbs(i).count("MAIL") for i in range(3)] == [2, 2, 1]
    assert all(server.verbs(i)[-1] == "QUIT" for i in range(3))
    assert sorted(r for m in server.messages for r in m["recipients"]) == [
        f"r{i}@example.net" for i in range(5)
    ]
    assert all(h.where(q) is None for q in ids)
    assert h.greeted == [True, True, True]


def test_failover_past_a_closed_port(tmp_path: Path, server: FaultServer) -> None:
    closed = free_port()
    h = Harness(tmp_path, server.port, relay={"hosts": [f"127.0.0.1:{closed}", f"127.0.0.1:{server.port}"]})
    qid = h.enqueue()
    h.run()
    assert h.where(qid) is None
    assert len(server.messages) == 1
    assert h.m("connection_attempts_total", result="refused") == 1
    assert h.m("connection_attempts_total", result="ok") == 1
    assert h.greeted == [True]


def test_failover_past_a_refusing_banner(tmp_path: Path, server: FaultServer) -> None:
    with FaultServer({"banner": "554 5.3.0 go away"}) as bad:
        h = Harness(
            tmp_path, bad.port, relay={"hosts": [f"127.0.0.1:{bad.port}", f"127.0.0.1:{server.port}"]}
        )
        qid = h.enqueue()
        h.run()
        assert bad.verbs() == ["QUIT"]
        assert bad.messages == []
    assert h.where(qid) is None
    assert [m["recipients"] for m in server.messages] == [[RCPT]]
    assert h.m("connection_attempts_total", result="ok") == 2
    assert h.greeted == [True]


def test_every_relay_down_claims_nothing(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    h = Harness(tmp_path, 0, relay={"hosts": [f"127.0.0.1:{p}" for p in ports]})
    qid = h.enqueue()
    h.run()
    assert h.m("connection_attempts_total", result="refused") == 2
    assert h.greeted == [False]
    assert_untouched(h, qid)


@pytest.mark.parametrize("then", [None, "drop"], ids=["stays", "closes"])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_421_at_mail_defers_and_halves_the_connection_limit(
    tmp_path: Path, server: FaultServer, pipelining: bool, then: str | None
) -> None:
    """A 421 (the relay sheds load; RFC 5321 says it closes the connection after it) defers the
    message as a temporary failure, with the 421 as its reason, and halves the throttle."""
    throttle = Throttle(8)
    h = Harness(tmp_path, server.port, throttle=throttle, relay={"pipelining": pipelining})
    qid = h.enqueue(A, B)
    reply = "421 4.3.2 shutting down"
    server.script = {"mail": reply if then is None else {"reply": reply, "then": then}}
    h.run()
    assert throttle.current == 4
    assert_requeued(h, qid, "temporary")
    st = h.state(qid)
    assert reply in st.last_error
    assert all(reply in st.errors[r] for r in (A, B))
    assert st.recipients == {}
    assert h.m("bounces_total") == 0


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_421_at_rcpt_then_close_is_a_temporary_failure(
    tmp_path: Path, server: FaultServer, pipelining: bool
) -> None:
    """The relay answers the first RCPT with 421 and closes (RFC 5321 3.8): the 421 decides the
    outcome (temporary, its text kept), not the closed connection the next read runs into."""
    throttle = Throttle(8)
    h = Harness(tmp_path, server.port, throttle=throttle, relay={"pipelining": pipelining})
    qid = h.enqueue(A, B)
    reply = "421 4.3.2 shutting down"
    server.script = {"rcpt": {"reply": reply, "then": "drop"}}
    h.run()
    assert throttle.current == 4
    assert_requeued(h, qid, "temporary")
    st = h.state(qid)
    assert reply in st.last_error
    assert reply in st.errors[A]
    assert st.recipients == {}


def test_rate_limit_spaces_messages(tmp_path: Path, server: FaultServer) -> None:
    h = Harness(tmp_path, server.port, limiter=RateLimiter(20))  # one MAIL every 50 ms
    for i in range(4):
        h.enqueue(f"r{i}@example.net")
    took = h.run()
    assert took >= 3 * 0.05 - 0.01
    assert len(server.messages) == 4


# -- STARTTLS and AUTH, as far as they need no TLS -------------------------------------------


def test_starttls_required_but_not_offered(
    tmp_path: Path, server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, server.port, relay={"tls": "starttls"})
    qid = h.enqueue()
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    assert h.greeted == [False]
    assert_untouched(h, qid)
    assert "MAIL" not in server.verbs()
    assert "STARTTLS" in caplog.text
    assert any(r.levelno >= logging.WARNING and "STARTTLS" in r.getMessage() for r in caplog.records)


def test_starttls_refused_by_the_relay(tmp_path: Path, server: FaultServer) -> None:
    server.script = {"ehlo": ehlo("PIPELINING", "STARTTLS")}  # STARTTLS itself gets "500 unknown"
    h = Harness(tmp_path, server.port, relay={"tls": "starttls"})
    qid = h.enqueue()
    h.run()
    assert server.verbs()[:2] == ["EHLO", "STARTTLS"]
    assert "MAIL" not in server.verbs()
    assert h.greeted == [False]
    assert_untouched(h, qid)


def test_auth_refused_in_clear(tmp_path: Path, server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    server.script = {"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN")}
    h = Harness(tmp_path, server.port, password="secret", relay={"tls": "none", "username": "user"})
    qid = h.enqueue()
    with caplog.at_level(logging.INFO, logger="greenmail"):
        h.run()
    assert "AUTH" not in server.verbs()
    assert "MAIL" not in server.verbs()
    assert h.greeted == [False]
    assert_untouched(h, qid)
    assert "auth_allow_plaintext" in caplog.text
    assert "secret" not in caplog.text


AUTH_ON = {"tls": "none", "username": "user", "auth_allow_plaintext": True}


def test_auth_plain(tmp_path: Path, server: FaultServer) -> None:
    server.script = {"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN"), "auth": "235 2.7.0 ok"}
    h = Harness(tmp_path, server.port, password="s3cret pass", relay=AUTH_ON)
    qid = h.enqueue()
    h.run()
    cmds = server.commands()
    assert cmds[1] == "AUTH PLAIN " + base64.b64encode(b"\0user\0s3cret pass").decode()
    assert server.verbs() == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert h.where(qid) is None


def test_auth_login(tmp_path: Path, server: FaultServer) -> None:
    server.script = {
        "ehlo": ehlo("PIPELINING", "AUTH LOGIN"),
        "auth": ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 ok"],
    }
    h = Harness(tmp_path, server.port, password="s3cret", relay={**AUTH_ON, "auth_mechanisms": ["LOGIN"]})
    qid = h.enqueue()
    h.run()
    assert server.commands()[1:4] == ["AUTH LOGIN", "dXNlcg==", "czNjcmV0"]
    assert h.where(qid) is None


def test_auth_cram_md5_rfc2195(tmp_path: Path, server: FaultServer) -> None:
    challenge = "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
    server.script = {
        "ehlo": ehlo("PIPELINING", "AUTH PLAIN CRAM-MD5"),
        "auth": [f"334 {challenge}", "235 ok"],
    }
    relay = {**AUTH_ON, "username": "tim", "auth_mechanisms": ["CRAM-MD5", "PLAIN"]}
    h = Harness(tmp_path, server.port, password="tanstaaftanstaaf", relay=relay)
    qid = h.enqueue()
    h.run()
    assert server.commands()[1:3] == ["AUTH CRAM-MD5", "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"]
    assert h.where(qid) is None


@pytest.mark.parametrize(
    "script",
    [
        {"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN"), "auth": "535 5.7.8 bad credentials"},
        {"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN"), "auth": "454 4.7.0 try later"},
        {"ehlo": ehlo("PIPELINING", "AUTH CRAM-MD5")},  # no mechanism in common
        {},  # no AUTH offered
    ],
    ids=["535", "454", "no-common-mechanism", "not-offered"],
)
def test_auth_failure_claims_nothing(tmp_path: Path, server: FaultServer, script: dict) -> None:
    server.script = script
    h = Harness(tmp_path, server.port, password="s3cret", relay=AUTH_ON)
    qid = h.enqueue()
    h.run()
    assert "MAIL" not in server.verbs()
    assert h.greeted == [False]
    assert_untouched(h, qid)
    assert h.m("recipients_total", result="failed") == 0
