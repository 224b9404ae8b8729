"""greenmail (the real ``greenmail run --once``) relaying through a real Exim 4 (GnuTLS).

Exim (unpacked by tests/peers/install.sh; a private instance per module, see
peers.Exim) listens on three ports: plain (no STARTTLS offered), STARTTLS, and
implicit TLS; AUTH PLAIN, LOGIN and CRAM-MD5 are offered over TLS only.  It
relays to an aiosmtpd downstream, where the delivered bytes are read back.  Its
mainlog's ``<=`` line tells how greenmail talked to it: P= protocol (esmtp,
esmtps, esmtpsa), X= TLS version, L = PIPELINING used (L- = offered, not
used), K = CHUNKING (BDAT) used, A= the authenticator and user.
"""

from __future__ import annotations

import re
from pathlib import Path

import peers
import pytest
import support
from peers import (
    PASSWORD,
    USER,
    EximRelay,
    assert_relayed_unchanged,
    assert_still_queued,
    message,
    message_id,
    password_file,
    queue,
    run_once,
)

SENDER, RCPT = "sender@example.org", "rcpt@example.net"


def deliver(exim: EximRelay, cfg: Path, tag: str, rcpt: str = RCPT) -> tuple[dict[str, str], peers.Received]:
    """Enqueue message(tag), run greenmail once; Exim's <= fields and what the downstream got."""
    sent = message(tag)
    support.enqueue(cfg, sent, SENDER, rcpt)
    mark = exim.mta.mark()
    log = run_once(cfg)
    assert queue(cfg) == [], log
    fields = exim.mta.wait_accepted(mark, message_id(tag))
    got = exim.downstream.wait_message(message_id(tag))
    assert_relayed_unchanged(got.content, sent)
    assert (got.mail_from, got.rcpt_tos) == (SENDER, [rcpt])
    return fields, got


def test_the_pipelining_flag_on_a_client_of_known_behaviour(exim: EximRelay):
    """What the other tests rely on: Exim logs L (used) or L- (offered, not used) correctly."""
    for pipelined in (False, True):
        mark = exim.mta.mark()
        peers.raw_client(exim.mta.plain_port, message_id(f"raw-{pipelined}"), pipelined)
        fields = exim.mta.wait_accepted(mark, message_id(f"raw-{pipelined}"))
        assert fields["L"].endswith("-") != pipelined, fields


def test_plain_port_opportunistic_sends_in_clear(exim: EximRelay, tmp_path: Path):
    """Exim offers no STARTTLS here; greenmail's default for a loopback relay (opportunistic) sends anyway."""
    cfg = peers.config(tmp_path, exim.mta.plain_port)
    fields, _ = deliver(exim, cfg, "exim-plain")
    assert fields["P"] == "esmtp", fields
    assert "X" not in fields, fields
    assert not fields.get("L", "-").endswith("-"), f"PIPELINING was offered but not used: {fields}"
    assert fields.get("K") == "K", f"CHUNKING was offered but not used: {fields}"


def test_without_pipelining_and_chunking(exim: EximRelay, tmp_path: Path):
    """The control for the L and K flags: switched off, greenmail waits for each reply and uses DATA."""
    cfg = peers.config(tmp_path, exim.mta.plain_port, pipelining=False, chunking=False)
    fields, _ = deliver(exim, cfg, "exim-lockstep")
    assert fields.get("L", "").endswith("-"), f"PIPELINING offered, so Exim logs L-: {fields}"
    assert "K" not in fields, fields


def test_tls_none_stays_in_clear_even_when_starttls_is_offered(exim: EximRelay, tmp_path: Path):
    cfg = peers.config(tmp_path, exim.mta.starttls_port, tls="none")
    fields, _ = deliver(exim, cfg, "exim-tls-none")
    assert fields["P"] == "esmtp" and "X" not in fields, fields


def test_starttls_byte_exact_with_pipelining_and_chunking(
    exim: EximRelay, certs: peers.Certs, tmp_path: Path
):
    cfg = peers.config(tmp_path, exim.mta.starttls_port, tls="starttls", ca_file=certs.ca)
    fields, got = deliver(exim, cfg, "exim-starttls")
    assert fields["P"] == "esmtps", fields
    assert re.match(r"TLS1\.[23]:", fields.get("X", "")), fields
    assert not fields.get("L", "-").endswith("-"), f"PIPELINING was offered but not used: {fields}"
    assert fields.get("K") == "K", f"CHUNKING was offered but not used: {fields}"
    assert int(fields["S"]) > len(message("exim-starttls")) // 2


def test_implicit_tls(exim: EximRelay, certs: peers.Certs, tmp_path: Path):
    cfg = peers.config(tmp_path, exim.mta.implicit_port, tls="implicit", ca_file=certs.ca)
    fields, _ = deliver(exim, cfg, "exim-implicit")
    assert fields["P"] == "esmtps", fields
    assert re.match(r"TLS1\.[23]:", fields.get("X", "")), fields


def test_starttls_required_but_not_offered_sends_nothing(exim: EximRelay, certs: peers.Certs, tmp_path: Path):
    cfg = peers.config(tmp_path, exim.mta.plain_port, tls="starttls", ca_file=certs.ca)
    qid = support.enqueue(cfg, message("exim-no-starttls"), SENDER, RCPT)
    mark = exim.mta.mark()
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    assert " <= " not in exim.mta.log(mark), exim.mta.log(mark)
    assert re.search(r"(?i)starttls", log), log


@pytest.mark.parametrize(
    ("mechanism", "authenticator"), [("PLAIN", "plain"), ("LOGIN", "login"), ("CRAM-MD5", "cram")]
)
def test_auth_over_starttls(
    exim: EximRelay, certs: peers.Certs, tmp_path: Path, mechanism: str, authenticator: str
):
    cfg = peers.config(
        tmp_path,
        exim.mta.starttls_port,
        tls="starttls",
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path),
        auth_mechanisms=[mechanism],
    )
    fields, _ = deliver(exim, cfg, f"exim-auth-{authenticator}")
    assert fields["P"] == "esmtpsa", fields
    assert fields.get("A") == f"{authenticator}:{USER}", fields


def test_auth_wrong_password_keeps_the_message(exim: EximRelay, certs: peers.Certs, tmp_path: Path):
    cfg = peers.config(
        tmp_path,
        exim.mta.starttls_port,
        tls="starttls",
        ca_file=certs.ca,
        username=USER,
        password_file=password_file(tmp_path, PASSWORD + "-wrong"),
    )
    qid = support.enqueue(cfg, message("exim-auth-wrong"), SENDER, RCPT)
    mark = exim.mta.mark()
    log = run_once(cfg)
    assert_still_queued(cfg, qid)
    exim_log = exim.mta.log(mark)
    assert " <= " not in exim_log, exim_log
    assert re.search(r"authenticator failed", exim_log), exim_log
    assert "535" in log, log


def test_smtputf8_recipient_through_exim(exim: EximRelay, certs: peers.Certs, tmp_path: Path):
    cfg = peers.config(tmp_path, exim.mta.starttls_port, tls="starttls", ca_file=certs.ca)
    fields, got = deliver(exim, cfg, "exim-smtputf8", rcpt="usér@example.org")
    assert got.meta["smtp_utf8"], got.meta  # Exim passed SMTPUTF8 on: greenmail asked for it
    assert fields["P"] in ("utf8esmtps", "esmtps"), fields
