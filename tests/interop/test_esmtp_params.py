"""ESMTP parameters of the real ``greenmail run --once`` as aiosmtpd (tests/peers/aiosmtpd_tls.py)
records them: SIZE=, BODY=8BITMIME, SMTPUTF8, and the connection shaping (rate limit).

The same things are checked through Postfix and Exim in test_postfix.py and
test_second_mta.py; here the server says exactly which MAIL parameters arrived.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import peers
import support
from peers import Aiosmtpd, message, message_id, queue, run_once

SENDER, RCPT = "sender@example.org", "rcpt@example.net"
Start = Callable[..., Aiosmtpd]


def ascii_message(tag: str) -> bytes:
    return message(tag, body="plain 7-bit text\n.and a dot line\n").replace(
        b"Content-Transfer-Encoding: 8bit", b"Content-Transfer-Encoding: 7bit"
    )


def send(server: Aiosmtpd, tmp_path: Path, body: bytes, *rcpts: str, **relay) -> tuple[Path, str]:
    cfg = peers.config(tmp_path, server.port, sections={"retry": {"bounce": False}}, **relay)
    support.enqueue(cfg, body, SENDER, *(rcpts or (RCPT,)))
    return cfg, run_once(cfg)


def test_size_and_8bitmime_parameters(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd("--size", "100000")
    eight = message("esmtp-8bit")
    cfg, log = send(server, tmp_path, eight)
    assert queue(cfg) == [], log
    got = server.wait_message(message_id("esmtp-8bit"))
    assert got.content == eight
    options = got.meta["mail_options"]
    size = [int(o.split("=", 1)[1]) for o in options if o.upper().startswith("SIZE=")]
    assert size and size[0] >= len(eight), options
    assert "BODY=8BITMIME" in [o.upper() for o in options], options


def test_no_8bitmime_parameter_for_a_7bit_message(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd()
    seven = ascii_message("esmtp-7bit")
    assert max(seven) < 128
    cfg, log = send(server, tmp_path, seven)
    assert queue(cfg) == [], log
    got = server.wait_message(message_id("esmtp-7bit"))
    assert got.content == seven
    assert "BODY=8BITMIME" not in [o.upper() for o in got.meta["mail_options"]], got.meta
    # no SIZE advertised, so no SIZE= sent
    assert not any(o.upper().startswith("SIZE=") for o in got.meta["mail_options"]), got.meta


def test_message_larger_than_the_advertised_size_fails_before_data(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd("--size", "1000")
    big = message("esmtp-too-big")
    assert len(big) > 1000
    cfg, log = send(server, tmp_path, big)
    [entry] = queue(cfg)
    assert entry["state"] == "failed" and entry["recipient_states"] == {RCPT: "failed"}, entry
    assert re.search(r"(?i)size", entry["last_error"] or ""), entry
    assert "DATA" not in server.verbs(), server.commands()
    assert server.messages() == []


def test_smtputf8_parameter_for_a_utf8_recipient(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd("--smtputf8")
    rcpt = "usér@example.org"
    body = message("esmtp-smtputf8")
    cfg, log = send(server, tmp_path, body, rcpt)
    assert queue(cfg) == [], log
    got = server.wait_message(message_id("esmtp-smtputf8"))
    assert got.content == body
    assert got.rcpt_tos == [rcpt]
    assert got.meta["smtp_utf8"] and "SMTPUTF8" in [o.upper() for o in got.meta["mail_options"]], got.meta


def test_utf8_recipient_fails_when_smtputf8_is_not_offered(aiosmtpd: Start, tmp_path: Path):
    """Only that recipient fails (permanently); the ASCII one of the same message is delivered."""
    server = aiosmtpd()
    utf8, plain = "usér@example.org", "plain@example.net"
    body = message("esmtp-no-smtputf8")
    cfg, log = send(server, tmp_path, body, utf8, plain)
    got = server.wait_message(message_id("esmtp-no-smtputf8"))
    assert got.content == body
    assert got.rcpt_tos == [plain], got.meta
    [entry] = queue(cfg)
    assert entry["state"] == "failed", entry
    assert entry["recipient_states"] == {utf8: "failed", plain: "delivered"}, entry
    rcpts = [c[1] for c in server.commands() if c[0] == "RCPT"]
    assert all(utf8 not in r for r in rcpts), rcpts  # never sent to a server that cannot take it


def test_rate_limit_spaces_the_messages(aiosmtpd: Start, tmp_path: Path):
    server = aiosmtpd()
    rate = 4.0  # messages per second
    cfg = peers.config(tmp_path, server.port, rate_limit=rate)
    tags = [f"esmtp-rate-{i}" for i in range(3)]
    for tag in tags:
        support.enqueue(cfg, ascii_message(tag), SENDER, RCPT)
    log = run_once(cfg)
    assert queue(cfg) == [], log
    times = sorted(server.wait_message(message_id(t)).meta["received_at"] for t in tags)
    # 3 messages at 4/s: at least 2 intervals of 0.25 s (some slack for clock and scheduling)
    assert times[-1] - times[0] >= 2 / rate * 0.8, times
