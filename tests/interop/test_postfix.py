"""greenmail (the real ``greenmail run --once``) relaying through a real Postfix.

Postfix (tests/peers/install.sh; a private instance per module, see peers.Postfix)
offers STARTTLS, PIPELINING, CHUNKING, SIZE (1 MB), 8BITMIME and SMTPUTF8 and
relays to an aiosmtpd downstream, where the delivered bytes are read back.
Its verbose smtpd log shows what greenmail sent: each command, whether it came
pipelined (already read with the previous one), the TLS handshake, BDAT.
"""

from __future__ import annotations

import re
from pathlib import Path

import peers
import pytest
import support
from peers import (
    PostfixRelay,
    assert_relayed_unchanged,
    assert_still_queued,
    message,
    message_id,
    queue,
    run_once,
)

SENDER, RCPT = "sender@example.org", "rcpt@example.net"


def test_the_pipelining_detector_on_a_client_of_known_behaviour(postfix: PostfixRelay):
    """What the other tests rely on: the maillog tells pipelined commands from lock-step ones."""
    for pipelined in (False, True):
        mark = postfix.mta.mark()
        peers.raw_client(postfix.mta.port, message_id(f"raw-{pipelined}"), pipelined)
        [s] = postfix.mta.wait_sessions(mark)
        assert s.verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"], s.verbs
        assert [c.pipelined for c in s.commands] == [False, False, pipelined, pipelined, False], s.commands
        postfix.downstream.wait_message(message_id(f"raw-{pipelined}"))


def test_starttls_pipelining_chunking_byte_exact(postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path):
    cfg = peers.config(tmp_path, postfix.mta.port, tls="starttls", ca_file=certs.ca)
    sent = message("postfix-starttls")
    support.enqueue(cfg, sent, SENDER, RCPT)
    mark = postfix.mta.mark()
    log = run_once(cfg)
    assert queue(cfg) == [], log

    got = postfix.downstream.wait_message(message_id("postfix-starttls"))
    [received] = assert_relayed_unchanged(got.content, sent)
    assert re.search(rb"using TLSv1\.[23]", received), received  # Postfix's own record of the TLS session
    assert (got.mail_from, got.rcpt_tos) == (SENDER, [RCPT])

    [s] = postfix.mta.wait_sessions(mark)
    assert s.tls and re.search(r"TLSv1\.[23]", s.tls), s.tls
    assert s.verbs[:3] == ["EHLO", "STARTTLS", "EHLO"], s.verbs  # EHLO again after STARTTLS
    assert s.summary is not None and s.summary.get("starttls") == "1" and s.summary.get("ehlo") == "2"
    mail = s.command("MAIL")
    assert re.search(rf"MAIL FROM:<{SENDER}>", mail.line), mail.line
    size = re.search(r" SIZE=(\d+)", mail.line)
    assert size and int(size.group(1)) >= len(sent), f"no SIZE= for the whole message: {mail.line}"
    assert " BODY=8BITMIME" in mail.line, mail.line  # an 8-bit body, and Postfix offers 8BITMIME
    # CHUNKING: the message went as BDAT, never DATA
    assert "BDAT" in s.verbs and "DATA" not in s.verbs, s.verbs
    assert s.summary.get("bdat") and "data" not in s.summary, s.summary
    # PIPELINING: some command of the transaction was sent before the reply to the one before it
    txn = s.commands[s.verbs.index("MAIL") + 1 :]
    assert any(c.pipelined for c in txn if c.verb in ("RCPT", "BDAT")), [(c.line, c.pipelined) for c in txn]
    # ... but nothing that must wait was pipelined (Postfix would log "improper command pipelining")
    assert not s.command("EHLO").pipelined and not s.commands[2].pipelined
    assert not any("improper command pipelining" in line for line in s.lines)
    assert "QUIT" in s.verbs


def test_without_pipelining_and_chunking_data_is_sent_lock_step(
    postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path
):
    """The control for the test above: switched off, greenmail waits for every reply and uses DATA."""
    cfg = peers.config(
        tmp_path, postfix.mta.port, tls="starttls", ca_file=certs.ca, pipelining=False, chunking=False
    )
    sent = message("postfix-lockstep")
    support.enqueue(cfg, sent, SENDER, RCPT, "second@example.net")
    mark = postfix.mta.mark()
    log = run_once(cfg)
    assert queue(cfg) == [], log

    got = postfix.downstream.wait_message(message_id("postfix-lockstep"))
    assert_relayed_unchanged(got.content, sent)
    assert sorted(got.rcpt_tos) == sorted([RCPT, "second@example.net"])
    [s] = postfix.mta.wait_sessions(mark)
    assert s.tls
    assert "DATA" in s.verbs and "BDAT" not in s.verbs, s.verbs
    assert s.verbs.count("RCPT") == 2
    assert not any(c.pipelined for c in s.commands), [(c.line, c.pipelined) for c in s.commands]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_several_messages_share_a_connection_up_to_the_limit(
    postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path, chunking: bool
):
    cfg = peers.config(
        tmp_path,
        postfix.mta.port,
        sections={"delivery": {"max_connections": 1}},
        tls="starttls",
        ca_file=certs.ca,
        max_messages_per_connection=2,
        chunking=chunking,
    )
    tags = [f"postfix-reuse-{i}-{chunking}" for i in range(3)]
    sent = {message_id(t): message(t) for t in tags}
    for body in sent.values():
        support.enqueue(cfg, body, SENDER, RCPT)
    mark = postfix.mta.mark()
    log = run_once(cfg)
    assert queue(cfg) == [], log

    for mid, body in sent.items():
        assert_relayed_unchanged(postfix.downstream.wait_message(mid).content, body)
    sessions = postfix.mta.wait_sessions(mark, 2)
    per_connection = sorted(n for s in sessions if (n := s.verbs.count("MAIL")))
    assert per_connection == [1, 2], [s.verbs for s in sessions]
    assert all(s.tls for s in sessions)
    # the second message's MAIL went in the same write as the end of the first (RFC 2920 3.1),
    # and Postfix took it as proper pipelining. (With DATA the detector cannot tell: the read
    # that brings the final dot is a read after the last command; the fault server proves it.)
    [two] = [s for s in sessions if s.verbs.count("MAIL") == 2]
    second_mail = [c for c in two.commands if c.verb == "MAIL"][1]
    assert second_mail.pipelined or not chunking, [(c.line, c.pipelined) for c in two.commands]
    assert not any("improper command pipelining" in line for s in sessions for line in s.lines)


def test_message_over_the_advertised_size_fails_before_data(
    postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path
):
    # bounces off: the test is about the message; a bounce would be one more transaction at Postfix
    cfg = peers.config(
        tmp_path, postfix.mta.port, sections={"retry": {"bounce": False}}, tls="starttls", ca_file=certs.ca
    )
    line = "0123456789" * 7 + "\n"
    big = message("postfix-too-big", body=line * (postfix.mta.size_limit // len(line) + 100))
    assert len(big) > postfix.mta.size_limit
    qid = support.enqueue(cfg, big, SENDER, RCPT)
    mark = postfix.mta.mark()
    log = run_once(cfg)

    [entry] = queue(cfg)
    assert entry["id"] == qid
    assert entry["state"] == "failed", entry
    assert entry["recipient_states"] == {RCPT: "failed"}, entry
    assert entry["last_error"] and re.search(r"(?i)size", entry["last_error"]), entry
    # it never reached DATA: Postfix saw the EHLO (that is where SIZE is learnt) but no message data
    sessions = postfix.mta.wait_sessions(mark)
    verbs = [v for s in sessions for v in s.verbs]
    assert "EHLO" in verbs
    assert "DATA" not in verbs and "BDAT" not in verbs, verbs
    assert message_id("postfix-too-big") not in postfix.downstream.by_message_id()
    assert "size" in log.lower(), log


def test_smtputf8_recipient_through_postfix(postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path):
    rcpt = "usér@example.org"
    cfg = peers.config(tmp_path, postfix.mta.port, tls="starttls", ca_file=certs.ca)
    sent = message("postfix-smtputf8", extra_headers=f"X-Original-To: {rcpt}\n")
    support.enqueue(cfg, sent, SENDER, rcpt)
    mark = postfix.mta.mark()
    log = run_once(cfg)
    assert queue(cfg) == [], log

    got = postfix.downstream.wait_message(message_id("postfix-smtputf8"))
    assert_relayed_unchanged(got.content, sent)
    assert got.rcpt_tos == [rcpt]
    assert got.meta["smtp_utf8"], got.meta  # Postfix passed SMTPUTF8 on: greenmail asked for it
    [s] = postfix.mta.wait_sessions(mark)
    assert re.search(r"(?i) SMTPUTF8\b", s.command("MAIL").line), s.command("MAIL").line


def test_postfix_certificate_for_another_name_is_refused(
    postfix: PostfixRelay, certs: peers.Certs, tmp_path: Path
):
    """Postfix presents the localhost certificate; greenmail told to expect another name refuses it."""
    cfg = peers.config(
        tmp_path, postfix.mta.port, tls="starttls", ca_file=certs.ca, tls_server_name="mail.example.com"
    )
    qid = support.enqueue(cfg, message("postfix-wrong-name"), SENDER, RCPT)
    mark = postfix.mta.mark()
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    sessions = postfix.mta.wait_sessions(mark)
    assert all("STARTTLS" in s.verbs and "MAIL" not in s.verbs for s in sessions), [s.verbs for s in sessions]
    assert re.search(r"(?i)mismatch|not valid for", log), log
