"""Any chunking of the relay's bytes gives protocol.Client the same replies, phases and outcome.

A conversation is a list of rounds: the commands the client sends, then the
bytes the relay answers them with (multi-line replies, bare LF line ends,
replies of several pipelined commands at once, errors). Each round's bytes
are cut at arbitrary points (inside CRLF and inside multi-line replies
too) and fed piece by piece; after each piece the client yields whatever
replies are complete. The record of what it yielded, each transaction's
per-recipient results and the final phase must equal those of the unsplit
feed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greenmail.errors import ProtocolError, SmtpError
from greenmail.protocol import Client, Cmd, Transaction

C = Cmd
EHLO = b"250-relay.test says hello\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
A, B, D = "a@x.test", "b@x.test", "d@x.test"


@dataclass
class Round:
    sends: list[tuple[Cmd, str | None, str | None]]  # (command, transaction name, recipient)
    replies: bytes


GREET = [
    Round([], b"220-relay.test ESMTP\r\n220 second banner line\r\n"),
    Round([(C.EHLO, None, None)], EHLO),
]
CONVERSATIONS: dict[str, list[Round]] = {
    "pipelined-two-messages": [
        *GREET,
        Round(
            [(C.MAIL, "t1", None), (C.RCPT, "t1", A), (C.RCPT, "t1", B), (C.DATA, "t1", None)],
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450-4.2.1 mailbox busy\r\n450 4.2.1 try later\r\n354 go\r\n",
        ),
        Round(
            [(C.END, "t1", None), (C.MAIL, "t2", None), (C.RCPT, "t2", D), (C.DATA, "t2", None)],
            b"250 2.0.0 queued as 1\r\n250 ok\r\n250 ok\r\n354 go\r\n",
        ),
        Round([(C.END, "t2", None), (C.QUIT, None, None)], b"250 2.0.0 queued as 2\r\n221 bye\r\n"),
    ],
    "bare-lf-and-empty-text": [
        Round([], b"220\n"),
        Round([(C.EHLO, None, None)], b"250-relay\n250-PIPELINING\n250 \n"),
        Round(
            [(C.MAIL, "t1", None), (C.RCPT, "t1", A), (C.DATA, "t1", None)], b"250 ok\n550 5.1.1 no\n554 no\n"
        ),
        Round([(C.RSET, None, None), (C.QUIT, None, None)], b"250\r\n221\r\n"),
    ],
    "bdat": [
        *GREET,
        Round(
            [(C.MAIL, "t1", None), (C.RCPT, "t1", A), (C.BDAT, "t1", None), (C.BDAT_LAST, "t1", None)],
            b"250 ok\r\n250 ok\r\n250 2.0.0 chunk ok\r\n250-2.0.0 queued\r\n250 really\r\n",
        ),
    ],
    "421-in-the-middle": [
        *GREET,
        Round(
            [(C.MAIL, "t1", None), (C.RCPT, "t1", A), (C.RCPT, "t1", B)],
            b"250 ok\r\n421-4.3.2 going down\r\n421 4.3.2 bye\r\n",
        ),
    ],
    "reply-code-changes-inside-a-reply": [
        *GREET,
        Round([(C.MAIL, "t1", None), (C.RCPT, "t1", A)], b"250 ok\r\n250-2.1.5 ok\r\n550 5.1.1 no\r\n"),
    ],
    "malformed-line": [*GREET, Round([(C.MAIL, "t1", None)], b"25O ok\r\n")],
    "a-reply-nobody-asked-for": [*GREET, Round([(C.MAIL, "t1", None)], b"250 ok\r\n250 more\r\n")],
    "helo-fallback": [
        Round([], b"220 relay\r\n"),
        Round([(C.EHLO, None, None)], b"502-5.5.1 no\r\n502 5.5.1 EHLO here\r\n"),
        Round([(C.HELO, None, None)], b"250 hi\r\n"),
        Round([(C.MAIL, "t1", None)], b"250 ok\r\n"),
        Round([(C.RCPT, "t1", A)], b"250 ok\r\n"),
        Round([(C.DATA, "t1", None)], b"354 go\r\n"),
        Round([(C.END, "t1", None)], b"250 ok\r\n"),
    ],
}
RECIPIENTS = {"t1": (A, B), "t2": (D,)}


class Closing(Exception):
    pass


def line(cmd: Cmd, rcpt: str | None) -> bytes:
    return f"{cmd.value.upper()} {rcpt or ''}\r\n".encode()


def run(rounds: list[Round], cuts: list[list[int]]) -> tuple[Any, ...]:
    """The conversation fed in the pieces ``cuts`` make; what the client yielded, results, phase, error."""
    client = Client(pipelining=True)
    txns: dict[str, Transaction] = {}
    events: list[tuple[str, int, tuple[str, ...]]] = []
    error: tuple[str, str] | None = None
    try:
        for rnd, at in zip(rounds, cuts, strict=True):
            for cmd, name, rcpt in rnd.sends:
                txn = txns.setdefault(name, Transaction(RECIPIENTS[name])) if name else None
                client.send(cmd, line(cmd, rcpt), txn, rcpt)
            bounds = [0, *sorted(set(at)), len(rnd.replies)]
            for start, end in zip(bounds, bounds[1:], strict=False):
                client.receive(rnd.replies[start:end])
                while (got := client.next_reply()) is not None:
                    expect, reply = got
                    events.append((expect.cmd.value, reply.code, reply.lines))
                    if expect.txn is not None:
                        expect.txn.on_reply(expect, reply)
                if client.closing is not None:
                    raise Closing
    except Closing:
        pass  # the relay said 421: nothing more is read
    except SmtpError as e:
        error = (type(e).__name__, str(e))
    results = {n: {r: s.value for r, s in t.results.items()} for n, t in txns.items()}
    return events, results, client.phase, error


def whole(rounds: list[Round]) -> tuple[Any, ...]:
    return run(rounds, [[] for _ in rounds])


def byte_by_byte(rounds: list[Round]) -> tuple[Any, ...]:
    return run(rounds, [list(range(1, len(r.replies))) for r in rounds])


@st.composite
def cuts_of(draw: st.DrawFn, rounds: list[Round]) -> list[list[int]]:
    return [
        draw(st.lists(st.integers(1, max(1, len(r.replies) - 1)), max_size=len(r.replies)))
        if r.replies
        else []
        for r in rounds
    ]


def test_the_unsplit_feeds_say_what_they_should() -> None:
    """The reference outcomes themselves (so that 'the same as unsplit' means something)."""
    events, results, _, error = whole(CONVERSATIONS["pipelined-two-messages"])
    assert error is None
    assert [e[:2] for e in events][2:] == [
        ("mail", 250), ("rcpt", 250), ("rcpt", 450), ("data", 354),
        ("end", 250), ("mail", 250), ("rcpt", 250), ("data", 354), ("end", 250), ("quit", 221),
    ]  # fmt: skip
    assert events[0] == ("banner", 220, ("relay.test ESMTP", "second banner line"))
    assert events[4][2] == ("4.2.1 mailbox busy", "4.2.1 try later")
    assert results == {"t1": {A: "delivered", B: "deferred"}, "t2": {D: "delivered"}}
    assert whole(CONVERSATIONS["421-in-the-middle"])[2].value == "closed"
    assert whole(CONVERSATIONS["reply-code-changes-inside-a-reply"])[3][0] == ProtocolError.__name__
    assert whole(CONVERSATIONS["malformed-line"])[3][0] == ProtocolError.__name__
    assert whole(CONVERSATIONS["a-reply-nobody-asked-for"])[3][0] == ProtocolError.__name__
    assert whole(CONVERSATIONS["bdat"])[1] == {"t1": {A: "delivered"}}  # B was never given to RCPT


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_byte_by_byte_is_the_same_as_unsplit(name: str) -> None:
    assert byte_by_byte(CONVERSATIONS[name]) == whole(CONVERSATIONS[name])


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@given(data=st.data())
def test_any_chunking_is_the_same_as_unsplit(name: str, data: st.DataObject) -> None:
    rounds = CONVERSATIONS[name]
    assert run(rounds, data.draw(cuts_of(rounds))) == whole(rounds)


@given(data=st.data())
def test_any_chunking_inside_crlf_and_multiline_replies(data: st.DataObject) -> None:
    """Cuts only at the awkward places: between CR and LF, and just after a 'NNN-' continuation."""
    rounds = CONVERSATIONS["pipelined-two-messages"]
    awkward = []
    for r in rounds:
        places = [i + 1 for i in range(len(r.replies) - 1) if r.replies[i : i + 2] == b"\r\n"]
        places += [i + 4 for i in range(len(r.replies) - 4) if r.replies[i + 3 : i + 4] == b"-"]
        awkward.append(data.draw(st.lists(st.sampled_from(places)) if places else st.just([])))
    assert run(rounds, awkward) == whole(rounds)
