"""greenmail.protocol.Client as a table of conversations: each row sends a command or feeds the relay's bytes.

A row is one of
  ("send", CMD, PHASE)            the command may go; the phase after sending it
  ("recv", BYTES, ANSWERS, PHASE) the replies complete in BYTES answer ANSWERS [(CMD, code), ...] in order
  ("can", CMD, BOOL)              whether CMD may go now
  ("illegal", CMD)                sending CMD raises LocalProtocolError, and the connection is poisoned
(tests/unit/test_protocol.py covers the stage matrix and the Transaction; this is the Client.)
"""

from __future__ import annotations

from typing import Any

import pytest

from greenmail.errors import LocalProtocolError, ProtocolError
from greenmail.protocol import Client, Cmd, Phase

C, P = Cmd, Phase
EHLO_PIPELINING = b"250-relay.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-relay.test\r\n250 8BITMIME\r\n"
LINES = {c: c.value.upper().encode() + b"\r\n" for c in Cmd}

GREET_PLAIN = [
    ("recv", b"220 relay.test ESMTP\r\n", [(C.BANNER, 220)], P.HELLO),
    ("send", C.EHLO, P.WAITING),
    ("recv", EHLO_PLAIN, [(C.EHLO, 250)], P.READY),
]
GREET_PIPELINING = [*GREET_PLAIN[:2], ("recv", EHLO_PIPELINING, [(C.EHLO, 250)], P.READY)]

CONVERSATIONS: dict[str, list[tuple[Any, ...]]] = {
    "one-by-one": [
        ("can", C.EHLO, False),  # nothing before the banner
        *GREET_PLAIN,
        ("send", C.MAIL, P.MAIL),
        ("can", C.RCPT, False),  # no PIPELINING: the reply to MAIL first
        ("recv", b"250 ok\r\n", [(C.MAIL, 250)], P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("recv", b"250 ok\r\n", [(C.RCPT, 250)], P.RCPT),
        ("send", C.DATA, P.DATA),
        ("recv", b"354 go\r\n", [(C.DATA, 354)], P.BODY),
        ("send", C.END, P.READY),
        ("can", C.MAIL, False),  # no PIPELINING: nothing behind the final dot
        ("recv", b"250 queued\r\n", [(C.END, 250)], P.READY),
        ("send", C.QUIT, P.CLOSED),
        ("recv", b"221 bye\r\n", [(C.QUIT, 221)], P.CLOSED),
    ],
    "helo-fallback": [
        ("recv", b"220 relay.test\r\n", [(C.BANNER, 220)], P.HELLO),
        ("send", C.EHLO, P.WAITING),
        ("recv", b"502 5.5.1 no EHLO\r\n", [(C.EHLO, 502)], P.HELLO),
        ("can", C.MAIL, False),
        ("send", C.HELO, P.WAITING),
        ("recv", b"250 hello\r\n", [(C.HELO, 250)], P.READY),
        ("send", C.MAIL, P.MAIL),
    ],
    "helo-refused-too": [
        ("recv", b"220 relay.test\r\n", [(C.BANNER, 220)], P.HELLO),
        ("send", C.EHLO, P.WAITING),
        ("recv", b"500 what\r\n", [(C.EHLO, 500)], P.HELLO),
        ("send", C.HELO, P.WAITING),
        ("recv", b"550 not you\r\n", [(C.HELO, 550)], P.REFUSED),
        ("can", C.MAIL, False),
        ("send", C.QUIT, P.CLOSED),  # only QUIT is left
    ],
    "banner-refused": [
        ("recv", b"554 go away\r\n", [(C.BANNER, 554)], P.REFUSED),
        ("illegal", C.EHLO),
    ],
    "ehlo-4xx": [
        *GREET_PLAIN[:2],
        ("recv", b"421 4.3.2 closing\r\n", [(C.EHLO, 421)], P.CLOSED),
        ("can", C.QUIT, False),  # 421: nothing more is sent
    ],
    "starttls": [
        *GREET_PLAIN,
        ("send", C.STARTTLS, P.WAITING),
        ("can", C.MAIL, False),  # STARTTLS is synchronous even with PIPELINING
        ("recv", b"220 ready for TLS\r\n", [(C.STARTTLS, 220)], P.HANDSHAKE),
        ("can", C.MAIL, False),  # the handshake, then EHLO again
        ("tls",),
        ("can", C.MAIL, False),
        ("send", C.EHLO, P.WAITING),
        ("recv", EHLO_PIPELINING, [(C.EHLO, 250)], P.READY),
        ("send", C.MAIL, P.MAIL),
    ],
    "starttls-refused": [
        *GREET_PLAIN,
        ("send", C.STARTTLS, P.WAITING),
        ("recv", b"454 4.7.0 TLS not available\r\n", [(C.STARTTLS, 454)], P.READY),
    ],
    "auth-challenge": [
        *GREET_PIPELINING,
        ("send", C.AUTH, P.WAITING),
        ("can", C.MAIL, False),  # AUTH is synchronous
        ("recv", b"334 VXNlcm5hbWU6\r\n", [(C.AUTH, 334)], P.AUTH),
        ("can", C.MAIL, False),
        ("send", C.AUTH_ANSWER, P.WAITING),
        ("recv", b"334 UGFzc3dvcmQ6\r\n", [(C.AUTH_ANSWER, 334)], P.AUTH),
        ("send", C.AUTH_ANSWER, P.WAITING),
        ("recv", b"235 2.7.0 ok\r\n", [(C.AUTH_ANSWER, 235)], P.READY),
        ("send", C.MAIL, P.MAIL),
    ],
    "auth-refused": [
        *GREET_PLAIN,
        ("send", C.AUTH, P.WAITING),
        ("recv", b"535 5.7.8 bad credentials\r\n", [(C.AUTH, 535)], P.READY),
    ],
    "pipelined-and-next-mail-behind-the-dot": [
        *GREET_PIPELINING,
        ("send", C.MAIL, P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("send", C.RCPT, P.RCPT),
        ("send", C.DATA, P.DATA),
        ("can", C.RSET, False),  # DATA is the last of a pipelined group
        ("recv", b"250 ok\r\n250 ok\r\n", [(C.MAIL, 250), (C.RCPT, 250)], P.DATA),
        ("recv", b"250 ok\r\n354 go\r\n", [(C.RCPT, 250), (C.DATA, 354)], P.BODY),
        ("send", C.END, P.READY),
        ("send", C.MAIL, P.MAIL),  # the next message's commands behind the final dot
        ("send", C.RCPT, P.RCPT),
        ("send", C.DATA, P.DATA),
        # the replies of both messages, in order; the phase stays as sending made it until the last
        ("recv", b"250 queued\r\n250 ok\r\n250 ok\r\n", [(C.END, 250), (C.MAIL, 250), (C.RCPT, 250)], P.DATA),
        ("recv", b"354 go\r\n", [(C.DATA, 354)], P.BODY),
    ],
    "pipelined-mail-refused": [
        *GREET_PIPELINING,
        ("send", C.MAIL, P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("send", C.DATA, P.DATA),
        ("recv", b"550 5.1.8 bad sender\r\n503 no\r\n", [(C.MAIL, 550), (C.RCPT, 503)], P.DATA),
        ("recv", b"503 5.5.1 no recipients\r\n", [(C.DATA, 503)], P.READY),
        ("send", C.RSET, P.READY),
    ],
    "bdat": [
        *GREET_PIPELINING,
        ("send", C.MAIL, P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("send", C.BDAT, P.BDAT),
        ("send", C.BDAT, P.BDAT),
        ("illegal_body",),
        ("send", C.BDAT_LAST, P.READY),
        ("send", C.MAIL, P.MAIL),  # BDAT LAST is not synchronous: the next MAIL goes behind it
        (
            "recv",
            b"250 ok\r\n" * 5,
            [(C.MAIL, 250), (C.RCPT, 250), (C.BDAT, 250), (C.BDAT, 250)] + [(C.BDAT_LAST, 250)],
            P.MAIL,
        ),
        ("recv", b"250 ok\r\n", [(C.MAIL, 250)], P.MAIL),
    ],
    "bdat-without-pipelining": [
        *GREET_PLAIN,
        ("send", C.MAIL, P.MAIL),
        ("recv", b"250 ok\r\n", [(C.MAIL, 250)], P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("recv", b"250 ok\r\n", [(C.RCPT, 250)], P.RCPT),
        ("send", C.BDAT_LAST, P.READY),
        ("can", C.MAIL, False),
        ("recv", b"250 2.0.0 queued\r\n", [(C.BDAT_LAST, 250)], P.READY),
        ("send", C.MAIL, P.MAIL),
    ],
    "mail-before-ehlo": [
        ("recv", b"220 relay.test\r\n", [(C.BANNER, 220)], P.HELLO),
        ("illegal", C.MAIL),
    ],
    "rcpt-without-mail": [*GREET_PIPELINING, ("illegal", C.RCPT)],
    "data-without-rcpt": [*GREET_PIPELINING, ("send", C.MAIL, P.MAIL), ("illegal", C.DATA)],
    "end-without-354": [
        *GREET_PIPELINING,
        ("send", C.MAIL, P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("illegal", C.END),
    ],
    "body-before-354": [
        *GREET_PIPELINING,
        ("send", C.MAIL, P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("send", C.DATA, P.DATA),
        ("illegal_body",),
    ],
    "next-mail-without-pipelining": [
        *GREET_PLAIN,
        ("send", C.MAIL, P.MAIL),
        ("recv", b"250 ok\r\n", [(C.MAIL, 250)], P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("recv", b"250 ok\r\n", [(C.RCPT, 250)], P.RCPT),
        ("send", C.DATA, P.DATA),
        ("recv", b"354 go\r\n", [(C.DATA, 354)], P.BODY),
        ("send", C.END, P.READY),
        ("illegal", C.MAIL),
    ],
    "tls-without-starttls": [*GREET_PLAIN, ("illegal_tls",)],
    "quit-in-the-body": [
        *GREET_PLAIN,
        ("send", C.MAIL, P.MAIL),
        ("recv", b"250 ok\r\n", [(C.MAIL, 250)], P.MAIL),
        ("send", C.RCPT, P.RCPT),
        ("recv", b"250 ok\r\n", [(C.RCPT, 250)], P.RCPT),
        ("send", C.DATA, P.DATA),
        ("recv", b"354 go\r\n", [(C.DATA, 354)], P.BODY),
        ("illegal", C.QUIT),
    ],
}


def answers(client: Client, data: bytes) -> list[tuple[Cmd, int]]:
    client.receive(data)
    out = []
    while (got := client.next_reply()) is not None:
        expect, reply = got
        out.append((expect.cmd, reply.code))
    return out


def assert_poisoned(client: Client) -> None:
    """After an illegal step the connection is closed: nothing at all may be sent on it."""
    assert client.phase is P.CLOSED
    for cmd in Cmd:
        assert not client.can_send(cmd)
        with pytest.raises(LocalProtocolError):
            client.send(cmd, LINES[cmd])


def play(client: Client, rows: list[tuple[Any, ...]]) -> None:
    for i, row in enumerate(rows):
        kind, where = row[0], f"row {i}: {row}"
        if kind == "send":
            assert client.can_send(row[1]), where
            assert client.send(row[1], LINES[row[1]]) == LINES[row[1]]
            assert client.phase is row[2], where
        elif kind == "recv":
            assert answers(client, row[1]) == row[2], where
            assert client.phase is row[3], where
        elif kind == "can":
            assert client.can_send(row[1]) is row[2], where
        elif kind == "tls":
            client.tls_started()
            assert client.extensions == {} and not client.pipelining, where
        elif kind == "illegal":
            with pytest.raises(LocalProtocolError):
                client.send(row[1], LINES[row[1]])
            assert_poisoned(client)
        elif kind == "illegal_body":
            with pytest.raises(LocalProtocolError):
                client.body()
        elif kind == "illegal_tls":
            with pytest.raises(LocalProtocolError):
                client.tls_started()
        else:
            raise AssertionError(where)


@pytest.mark.parametrize("rows", list(CONVERSATIONS.values()), ids=list(CONVERSATIONS))
def test_conversation(rows: list[tuple[Any, ...]]) -> None:
    play(Client(pipelining=True), rows)


def test_pipelining_is_used_only_when_offered_and_allowed() -> None:
    offered = Client(pipelining=True)
    play(offered, GREET_PIPELINING)
    assert offered.pipelining and "CHUNKING" in offered.extensions
    not_offered = Client(pipelining=True)
    play(not_offered, GREET_PLAIN)
    assert not not_offered.pipelining
    not_allowed = Client(pipelining=False)
    play(not_allowed, GREET_PIPELINING)
    assert not not_allowed.pipelining
    not_allowed.send(C.MAIL, LINES[C.MAIL])
    assert not not_allowed.can_send(C.RCPT)


def test_the_body_may_go_after_354() -> None:
    client = Client()
    play(client, CONVERSATIONS["one-by-one"][:11])
    assert client.phase is P.BODY
    client.body()  # no error


def test_a_reply_no_command_asked_for_is_a_protocol_error() -> None:
    client = Client()
    play(client, GREET_PLAIN)
    with pytest.raises(ProtocolError):
        answers(client, b"250 surprise\r\n")
    assert client.phase is P.CLOSED


def test_a_reply_ahead_of_its_command_is_a_protocol_error() -> None:
    """Bytes of a reply waiting when a command goes would be taken for that command's reply."""
    client = Client()
    play(client, GREET_PLAIN)
    client.receive(b"250 early")
    with pytest.raises(ProtocolError):
        client.send(C.MAIL, LINES[C.MAIL])


def test_data_after_the_starttls_reply_is_a_protocol_error() -> None:
    """Plain-text bytes behind 220 must not be read as if they had come over TLS."""
    client = Client()
    play(client, [*GREET_PLAIN, ("send", C.STARTTLS, P.WAITING)])
    assert answers(client, b"220 go\r\n250-injected") == [(C.STARTTLS, 220)]
    with pytest.raises(ProtocolError):
        client.tls_started()


def test_421_closes_the_connection_whatever_was_pipelined() -> None:
    client = Client()
    play(client, [*GREET_PIPELINING, ("send", C.MAIL, P.MAIL), ("send", C.RCPT, P.RCPT)])
    assert answers(client, b"421 4.3.2 shutting down\r\n") == [(C.MAIL, 421)]
    assert client.phase is P.CLOSED and client.closing is not None and client.closing.code == 421
    assert not client.can_send(C.RSET) and not client.can_send(C.QUIT)
