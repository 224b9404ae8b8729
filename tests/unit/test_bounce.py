"""Unit tests of greenmail.bounce: the RFC 3464 DSN as the email package parses it.

Every DSN built here is parsed back with ``email.policy.default`` and checked
part by part: multipart/report; report-type=delivery-status, a text/plain part,
message/delivery-status (per-message and per-recipient field groups) and
text/rfc822-headers holding the original header block.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from greenmail import bounce
from greenmail.bounce import Failure, build, original_headers, status_of

MTA = "mx.example.org"
SENDER = "sender@example.org"
ARRIVAL = 1_700_000_000.0
HEADERS = (
    b"From: Sender <sender@example.org>\nTo: b@example.net\nSubject: hello\nMessage-ID: <orig@example.org>\n"
)


def make(
    failures: list[Failure],
    action: str = "failed",
    headers: bytes = HEADERS,
    sender: str = SENDER,
    qid: str = "QID123",
) -> bytes:
    return build(
        reporting_mta=MTA,
        original_sender=sender,
        queue_id=qid,
        arrival=ARRIVAL,
        failures=failures,
        original_headers=headers,
        action=action,
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    assert [p.get_content_type() for p in payload] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    return payload[0], payload[1], payload[2]


def groups(status_part: Message) -> list[dict[str, str]]:
    """The field groups of a message/delivery-status part: per-message first, then one per recipient."""
    payload = status_part.get_payload()
    assert isinstance(payload, list), payload
    return [{k: str(v) for k, v in g.items()} for g in payload]


def per_recipient(data: bytes) -> dict[str, dict[str, str]]:
    _, status, _ = parts(parse(data))
    out = {}
    for g in groups(status)[1:]:
        kind, _, addr = g["Final-Recipient"].partition(";")
        assert kind.strip().lower() == "rfc822"
        out[addr.strip()] = g
    return out


# -- structure -----------------------------------------------------------------------


def test_structure_of_a_failure_report() -> None:
    data = make([Failure("b@example.net", "550 5.1.1 <b@example.net>: no such user", "relay.example.net")])
    assert isinstance(data, bytes)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["Subject"]
    assert email.utils.parsedate_to_datetime(str(msg["Date"])) is not None
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith(">")
    assert str(msg["Auto-Submitted"]).startswith("auto-")  # RFC 3834: no auto-replies to it
    text, status, headers = parts(msg)
    body = text.get_content()
    assert "b@example.net" in body
    assert "550 5.1.1" in body
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"


def test_each_report_gets_its_own_message_id() -> None:
    f = [Failure("b@example.net", "550 5.1.1 no")]
    assert parse(make(f))["Message-ID"] != parse(make(f))["Message-ID"]


def test_per_message_fields() -> None:
    _, status, _ = parts(parse(make([Failure("b@example.net", "550 5.1.1 no")])))
    first = groups(status)[0]
    assert first["Reporting-MTA"] == f"dns; {MTA}"
    assert "Final-Recipient" not in first
    arrival = email.utils.parsedate_to_datetime(first["Arrival-Date"])
    assert arrival.timestamp() == ARRIVAL


def test_per_recipient_fields_with_the_relays_enhanced_code() -> None:
    data = make(
        [
            Failure("b@example.net", "550 5.1.1 no such user", "relay.example.net"),
            Failure("c@example.net", "552 5.2.2 mailbox full", "relay.example.net"),
        ]
    )
    rcpts = per_recipient(data)
    assert list(rcpts) == ["b@example.net", "c@example.net"]
    b, c = rcpts["b@example.net"], rcpts["c@example.net"]
    assert b["Action"] == "failed"
    assert b["Status"] == "5.1.1"
    assert b["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert b["Remote-MTA"] == "dns; relay.example.net"
    assert c["Status"] == "5.2.2"
    assert c["Diagnostic-Code"] == "smtp; 552 5.2.2 mailbox full"


def test_reply_without_enhanced_code_gets_the_class_default() -> None:
    g = per_recipient(make([Failure("b@example.net", "550 no such user here")]))["b@example.net"]
    assert g["Status"] == "5.0.0"
    assert g["Diagnostic-Code"] == "smtp; 550 no such user here"
    assert "Remote-MTA" not in g


def test_greenmails_own_reason_is_not_labelled_an_smtp_reply() -> None:
    why = "message expired: undeliverable for 5 days; last error: timeout after 30s (stage banner)"
    g = per_recipient(make([Failure("b@example.net", why)]))["b@example.net"]
    assert g["Status"] == "5.0.0"
    kind, _, text = g["Diagnostic-Code"].partition(";")
    assert kind.strip().lower() != "smtp"
    assert text.strip() == why


def test_delayed_report() -> None:
    data = make([Failure("b@example.net", "451 4.3.0 try again later")], action="delayed")
    msg = parse(data)
    assert msg.get_param("report-type") == "delivery-status"
    g = per_recipient(data)["b@example.net"]
    assert g["Action"] == "delayed"
    assert g["Status"] == "4.3.0"
    assert g["Diagnostic-Code"] == "smtp; 451 4.3.0 try again later"
    # the failure report's wording is not used for a delay
    assert parse(make([Failure("b@example.net", "550 5.1.1 x")]))["Subject"] != msg["Subject"]


def test_delayed_report_for_a_reason_without_a_code() -> None:
    g = per_recipient(make([Failure("b@example.net", "connection refused")], action="delayed"))
    assert g["b@example.net"]["Status"] == "4.0.0"


def test_many_recipients_in_one_report() -> None:
    rcpts = [f"user{i}@example.net" for i in range(20)]
    data = make([Failure(r, f"550 5.1.1 {r} unknown") for r in rcpts])
    assert list(per_recipient(data)) == rcpts


# -- status_of ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "action", "status"),
    [
        ("550 5.1.1 no such user", "failed", "5.1.1"),
        ("554 5.7.1 rejected by policy", "failed", "5.7.1"),
        ("552 5.2.2", "failed", "5.2.2"),
        ("550 5.1.10 null MX", "failed", "5.1.10"),
        ("553 5.123.456 three digits", "failed", "5.123.456"),
        ("550 no enhanced code", "failed", "5.0.0"),
        ("550", "failed", "5.0.0"),
        ("550 5.1.1234 too many digits", "failed", "5.0.0"),
        ("550 5.1 too short", "failed", "5.0.0"),
        ("550 x5.1.1 glued", "failed", "5.0.0"),
        ("451 4.3.0 later", "delayed", "4.3.0"),
        ("450 mailbox busy", "delayed", "4.0.0"),
        ("421 4.4.2 closing", "delayed", "4.4.2"),
        ("timeout after 30s waiting for the rcpt reply (stage rcpt)", "failed", "5.0.0"),
        ("timeout after 30s waiting for the rcpt reply (stage rcpt)", "delayed", "4.0.0"),
        ("connection closed by the relay (stage data)", "delayed", "4.0.0"),
        ("message expired: undeliverable for 5 days; last error: 451 4.3.0 x", "failed", "5.0.0"),
        ("unknown", "failed", "5.0.0"),
        ("", "failed", "5.0.0"),
    ],
)
def test_status_of(reply: str, action: str, status: str) -> None:
    assert status_of(reply, action) == status


# -- the original headers ---------------------------------------------------------------------


def test_rfc822_headers_part_holds_the_original_headers() -> None:
    _, _, headers = parts(parse(make([Failure("b@example.net", "550 5.1.1 no")])))
    content = headers.get_content()
    original = email.message_from_string(content, policy=email.policy.default)
    assert original["Subject"] == "hello"
    assert original["Message-ID"] == "<orig@example.org>"
    assert original["To"] == "b@example.net"
    assert original["From"].addresses[0].addr_spec == SENDER
    assert content.replace("\r\n", "\n").strip("\n") == HEADERS.decode().strip("\n")


def test_rfc822_headers_with_folded_and_crlf_lines() -> None:
    original = b"Subject: a long\r\n subject folded\r\nMessage-ID: <crlf@example.org>\r\n"
    _, _, headers = parts(parse(make([Failure("b@example.net", "550 5.1.1 no")], headers=original)))
    parsed = email.message_from_string(headers.get_content(), policy=email.policy.default)
    assert parsed["Message-ID"] == "<crlf@example.org>"
    assert " ".join(parsed["Subject"].split()) == "a long subject folded"


def test_rfc822_headers_part_is_capped() -> None:
    huge = b"Subject: x\n" + b"X-Filler: " + b"y" * (2 * bounce.MAX_HEADERS) + b"\n"
    data = make([Failure("b@example.net", "550 5.1.1 no")], headers=huge)
    assert len(data) < 2 * bounce.MAX_HEADERS
    _, _, headers = parts(parse(data))
    assert headers.get_content().startswith("Subject: x")


def test_non_ascii_original_headers() -> None:
    """An 8-bit (raw UTF-8) Subject in the original message must not break the DSN."""
    original = "Subject: Grüße aus Köln\nFrom: Jürgen <sender@example.org>\nMessage-ID: <u@example.org>\n"
    data = make([Failure("b@example.net", "550 5.1.1 no")], headers=original.encode())
    _, _, headers = parts(parse(data))
    assert "Grüße aus Köln" in headers.get_content()
    assert "<u@example.org>" in headers.get_content()


def test_non_ascii_relay_reply() -> None:
    """Reply text is decoded with errors="replace": any 8-bit byte from a relay becomes non-ASCII."""
    reply = "550 5.1.1 Benutzer unbekannt: \ufffd ü"
    data = make([Failure("b@example.net", reply)])
    g = per_recipient(data)["b@example.net"]
    assert g["Status"] == "5.1.1"
    assert g["Action"] == "failed"


def test_non_ascii_recipient() -> None:
    """address.check admits UTF-8 addresses (SMTPUTF8); their DSN must still be built."""
    data = make([Failure("jürgen@example.net", "550 5.1.1 no")])
    assert "jürgen@example.net" in per_recipient(data)


# -- original_headers() ---------------------------------------------------------------------------


def queue_file(
    tmp_path: Path, message: bytes, envelope: bytes = b"sender@example.org\nb@example.net\n"
) -> Path:
    path = tmp_path / "Q"
    path.write_bytes(envelope + message)
    return path


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            b"Subject: a\nTo: b@example.net\n\nbody line\nX-Not: a header\n",
            b"Subject: a\nTo: b@example.net\n",
        ),
        (b"Subject: a\r\nTo: b@x\r\n\r\nbody\r\n\r\nmore\r\n", b"Subject: a\r\nTo: b@x\r\n"),
        (b"Subject: a\n folded\nTo: b@x\n\n\nbody\n", b"Subject: a\n folded\nTo: b@x\n"),
        (b"Subject: only headers\nTo: b@x\n", b"Subject: only headers\nTo: b@x\n"),
        (b"Subject: a\n\n", b"Subject: a\n"),
    ],
)
def test_original_headers_stop_at_the_blank_line(tmp_path: Path, message: bytes, expected: bytes) -> None:
    envelope = b"sender@example.org\nb@example.net\n"
    path = queue_file(tmp_path, message, envelope)
    assert original_headers(str(path), len(envelope)) == expected


def test_original_headers_after_a_crlf_envelope(tmp_path: Path) -> None:
    envelope = b"\r\nb@example.net,c@example.net\r\n"
    path = queue_file(tmp_path, b"Subject: bounce of a bounce\r\n\r\nbody\r\n", envelope)
    assert original_headers(str(path), len(envelope)) == b"Subject: bounce of a bounce\r\n"


def test_original_headers_capped(tmp_path: Path) -> None:
    envelope = b"s@example.org\nb@example.net\n"
    path = queue_file(
        tmp_path, b"Subject: x\nX-Big: " + b"z" * (3 * bounce.MAX_HEADERS) + b"\n\nbody\n", envelope
    )
    head = original_headers(str(path), len(envelope))
    assert head.startswith(b"Subject: x\n")
    assert len(head) <= bounce.MAX_HEADERS


def test_built_from_a_queue_file(tmp_path: Path) -> None:
    """original_headers() feeds build(): the body never appears in the report."""
    envelope = b"sender@example.org\nb@example.net\n"
    path = queue_file(tmp_path, b"Subject: secret plans\nMessage-ID: <m@x>\n\nTHE BODY TEXT\n", envelope)
    data = make(
        [Failure("b@example.net", "550 5.1.1 no")], headers=original_headers(str(path), len(envelope))
    )
    assert b"THE BODY TEXT" not in data
    _, _, headers = parts(parse(data))
    assert "Subject: secret plans" in headers.get_content()
