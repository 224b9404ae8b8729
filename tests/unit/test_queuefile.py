"""Unit tests of greenmail.queuefile: names, envelope lines, added headers, State."""

from __future__ import annotations

import email
import email.policy
import io
import re

import pytest

from greenmail.dropoff import added_headers, envelope_lines
from greenmail.errors import CorruptQueueFile
from greenmail.queuefile import (
    HOST,
    Entry,
    Envelope,
    State,
    format_name,
    new_id,
    parse_name,
    read_envelope,
)

# -- file names -----------------------------------------------------------------


ID = "0123456789ABCDEF01234567"  # the shape of greenmail's own ids: 24 upper-case hex digits


@pytest.mark.parametrize(
    ("name", "qid", "attempts", "next_at"),
    [
        (ID, ID, 0, 0),
        (f"{ID},2,1700000000", ID, 2, 1700000000),
        (f"{ID},0,5", ID, 0, 5),
        (f"{ID},7,0", ID, 7, 0),
    ],
)
def test_parse_name(name: str, qid: str, attempts: int, next_at: int) -> None:
    entry = parse_name(name)
    assert entry == Entry(name, qid, attempts, next_at)


@pytest.mark.parametrize(
    ("qid", "attempts", "next_at", "name"),
    [
        (ID, 0, 0, ID),
        (ID, 2, 1700000000, f"{ID},2,1700000000"),
        (ID, 0, 1700000000, f"{ID},0,1700000000"),
        (ID, 3, 0, f"{ID},3,0"),
    ],
)
def test_format_name_round_trip(qid: str, attempts: int, next_at: int, name: str) -> None:
    assert format_name(qid, attempts, next_at) == name
    entry = parse_name(name)
    assert entry is not None
    assert (entry.id, entry.attempts, entry.next_at) == (qid, attempts, next_at)


def test_new_id_is_a_valid_name_and_unique() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for qid in ids:
        assert parse_name(qid) == Entry(qid, qid, 0, 0)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".x",
        ".hidden,1,2",
        "a b",
        "a@b",
        "ABC,2,1700000000@host.1.ab",
        "a,1",
        "a,1,",
        "a,,1",
        "a,1,2,3",
        "a,x,2",
        "a,-1,2",
        ",1,2",
        "my message.eml",
        "a/b",
        "a\nb",
        "é",
        "0" * 129,
        "a,1234567890,1",
        "a,1,1234567890123",
        # names of other programs' choosing, even valid-looking ones: given an id of our own first
        "ABC",
        "abc-1_2.x",
        "msg.4242",
        "msg.4242,1,0",
        "0" * 128,
        ID.lower(),
        ID[:-1],
        ID + "0",
        f"{ID},1,2,8",
    ],
)
def test_parse_name_foreign(name: str) -> None:
    assert parse_name(name) is None


@pytest.mark.parametrize(
    ("next_at", "now", "due"),
    [(0, 0, True), (0, 1e9, True), (100, 99.9, False), (100, 100, True), (100, 100.5, True)],
)
def test_entry_due(next_at: int, now: float, due: bool) -> None:
    assert Entry("x", "x", 1, next_at).due(now) is due


def test_entry_renamed() -> None:
    e = Entry("ABC", "ABC").renamed(3, 1700000000)
    assert e == Entry("ABC,3,1700000000", "ABC", 3, 1700000000)
    assert e.renamed(0, 0).name == "ABC"


# -- envelope lines ---------------------------------------------------------------

MESSAGE = b"Subject: hi\n\nbody\n"


def env(data: bytes) -> Envelope:
    return read_envelope(io.BytesIO(data))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_read_envelope_line_endings(eol: bytes) -> None:
    head = b"a@example.org" + eol + b"b@example.net" + eol
    data = head + b"Subject: x" + eol + eol + b"body" + eol
    e = env(data)
    assert e == Envelope("a@example.org", ("b@example.net",), len(head))
    assert data[e.body_offset :].startswith(b"Subject: x")


@pytest.mark.parametrize(
    "sender_line", [b"", b"<>", b" <> ", b"  "], ids=["empty", "brackets", "spaced", "blank"]
)
def test_read_envelope_null_sender(sender_line: bytes) -> None:
    e = env(sender_line + b"\nb@x.org\n" + MESSAGE)
    assert e.sender == ""
    assert e.recipients == ("b@x.org",)


def test_read_envelope_brackets_tolerated() -> None:
    e = env(b"<a@b>\n<c@d>, e@f\n" + MESSAGE)
    assert e.sender == "a@b"
    assert e.recipients == ("c@d", "e@f")


def test_read_envelope_several_recipients() -> None:
    e = env(b"a@b\r\nr1@x.org, r2@y.org ,r3@z.org,  <r4@w.org>\r\nX: y\r\n\r\nz\r\n")
    assert e.recipients == ("r1@x.org", "r2@y.org", "r3@z.org", "r4@w.org")


def test_read_envelope_body_offset_points_at_message() -> None:
    head = "sender@exämple.org\nrcpt@b.org,r2@c.org\n".encode()
    data = head + MESSAGE
    f = io.BytesIO(data)
    e = read_envelope(f)
    assert e.body_offset == len(head)
    f.seek(e.body_offset)
    assert f.read() == MESSAGE


def test_read_envelope_one_byte_message() -> None:
    e = env(b"a@b\nc@d\nx")
    assert e.body_offset == 8


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty-file"),
        pytest.param(b"a@b", id="only-sender-no-eol"),
        pytest.param(b"a@b\n", id="missing-second-line"),
        pytest.param(b"a@b\nc@d", id="second-line-no-eol"),
        pytest.param(b"a@b\nc@d\n", id="empty-message"),
        pytest.param(b"a@b\r\nc@d\r\n", id="empty-message-crlf"),
        pytest.param(b"a@b\n\n" + MESSAGE, id="no-recipients"),
        pytest.param(b"a@b\n \n" + MESSAGE, id="blank-recipients"),
        pytest.param(b"a@b\n<>\n" + MESSAGE, id="null-recipient"),
        pytest.param(b"a@b\nc@d,\n" + MESSAGE, id="trailing-comma"),
        pytest.param(b"a@b\nc@d,,e@f\n" + MESSAGE, id="empty-between-commas"),
        pytest.param(b"nobody\nc@d\n" + MESSAGE, id="bad-sender"),
        pytest.param(b"a@b\nnot-an-address\n" + MESSAGE, id="bad-recipient"),
        pytest.param(b"a b@c\nc@d\n" + MESSAGE, id="sender-space"),
        pytest.param(b"a@b\nc\x01@d\n" + MESSAGE, id="recipient-control"),
        pytest.param(b"a@b\n<c@d\n" + MESSAGE, id="unbalanced-bracket"),
        pytest.param(b"\xffa@b\nc@d\n" + MESSAGE, id="sender-not-utf8"),
        pytest.param(b"a@b\nc@d\xfe\n" + MESSAGE, id="recipient-not-utf8"),
    ],
)
def test_read_envelope_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptQueueFile):
        env(data)


def test_read_envelope_too_long() -> None:
    with pytest.raises(CorruptQueueFile):
        env(b"a" * (1024 * 1024 + 10) + b"@b\nc@d\n" + MESSAGE)


def test_envelope_lines_round_trip() -> None:
    data = envelope_lines("", ["a@b", "c@d"]) + MESSAGE
    assert data.startswith(b"\na@b,c@d\n")
    e = env(data)
    assert e == Envelope("", ("a@b", "c@d"), len(b"\na@b,c@d\n"))


# -- added headers -----------------------------------------------------------------

QID = "0123456789ABCDEF01234567"
DATE_RE = rb"Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"
MSGID = f"Message-ID: <{QID}@{HOST}>".encode()


def header_names(added: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0] for line in added.splitlines() if line]


def test_added_headers_both_missing() -> None:
    added = added_headers(b"Subject: x\n\nbody\n", QID)
    lines = added.split(b"\n")
    assert len(lines) == 3 and lines[2] == b""
    assert re.fullmatch(DATE_RE, lines[0])
    assert lines[1] == MSGID
    msg = email.message_from_bytes(added + b"Subject: x\n\nbody\n", policy=email.policy.default)
    assert msg["Date"] is not None and msg["Message-ID"] == f"<{QID}@{HOST}>"
    assert msg["Subject"] == "x"
    assert msg.get_content() == "body\n"


@pytest.mark.parametrize(
    "head",
    [
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <x@y>\n\nbody\n",
        b"date: Mon, 1 Jan 2024 00:00:00 +0000\nmessage-id: <x@y>\n\nbody\n",
        b"Subject: s\nMESSAGE-ID: <x@y>\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\n\nbody\n",
        b"Subject: s\r\nDate: d\r\nMessage-Id: <x@y>\r\n\r\nbody\r\n",
        b"Subject: s\nDate: d\nMessage-ID: <x@y>\n",  # headers only, no body
    ],
)
def test_added_headers_none_when_both_present(head: bytes) -> None:
    assert added_headers(head, QID) == b""


@pytest.mark.parametrize(
    ("head", "wanted"),
    [
        (b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nSubject: s\n\nbody\n", b"Message-ID"),
        (b"Subject: s\ndate: d\n\nbody\n", b"Message-ID"),
        (b"Message-ID: <x@y>\nSubject: s\n\nbody\n", b"Date"),
        (b"Subject: s\nmessage-ID: <x@y>\n\nbody\n", b"Date"),
    ],
)
def test_added_headers_only_the_missing_one(head: bytes, wanted: bytes) -> None:
    added = added_headers(head, QID)
    assert header_names(added) == [wanted]
    assert added.endswith(b"\n") and not added.endswith(b"\n\n")


@pytest.mark.parametrize(
    "head",
    [
        b"X-Date: d\nX-Message-ID: <x@y>\nSubject: s\n\nbody\n",
        b"Resent-Date: d\nResent-Message-ID: <x@y>\n\nbody\n",
        b"Subject: Date: and Message-ID: in a value\n\nbody\n",
    ],
)
def test_added_headers_similar_names_do_not_count(head: bytes) -> None:
    assert header_names(added_headers(head, QID)) == [b"Date", b"Message-ID"]


def test_added_headers_crlf_message_gets_crlf_lines() -> None:
    added = added_headers(b"Subject: s\r\n\r\nbody\r\n", QID)
    assert added.endswith(b"\r\n")
    assert added.count(b"\r\n") == 2
    assert added.count(b"\n") == 2  # no bare LF
    assert header_names(added) == [b"Date", b"Message-ID"]


def test_added_headers_lf_message_gets_lf_lines() -> None:
    added = added_headers(b"Subject: s\n\nbody\n", QID)
    assert b"\r" not in added
    assert added.count(b"\n") == 2


@pytest.mark.parametrize(
    ("head", "eol"),
    [
        (b"just some text\nmore\n", b"\n"),
        (b"just some text\r\nmore\r\n", b"\r\n"),
        (b"no newline at all", b"\n"),
        (b"From someone\n\nbody\n", b"\n"),
    ],
)
def test_added_headers_blank_line_when_no_header_first(head: bytes, eol: bytes) -> None:
    added = added_headers(head, QID)
    assert added.endswith(eol + eol)
    assert header_names(added) == [b"Date", b"Message-ID"]
    msg = email.message_from_bytes(added + head, policy=email.policy.default)
    assert msg["Message-ID"] == f"<{QID}@{HOST}>"
    assert msg["Date"] is not None


@pytest.mark.parametrize(
    "head",
    [
        b"Subject: s\n\nDate: d\nMessage-ID: <x@y>\n",
        b"Subject: s\r\n\r\nDate: d\r\nMessage-ID: <x@y>\r\n",
        b"Subject: s\n\nbody\nDate: d\nMessage-ID: <x@y>\n",
    ],
)
def test_added_headers_body_lines_do_not_count(head: bytes) -> None:
    assert header_names(added_headers(head, QID)) == [b"Date", b"Message-ID"]


@pytest.mark.parametrize(
    "head",
    [
        # The header section is empty (the message starts with the blank line),
        # so these lines are body, not headers.
        pytest.param(b"\nDate: d\nMessage-ID: <x@y>\n", id="empty-header-section-LF"),
        pytest.param(b"\r\nDate: d\r\nMessage-ID: <x@y>\r\n", id="empty-header-section-CRLF"),
        # The message does not start with a header line, so added_headers puts
        # a blank line after its own headers: everything given is then body.
        pytest.param(b"hello\nDate: d\nMessage-ID: <x@y>\n\nbody\n", id="text-first"),
    ],
)
def test_added_headers_lines_that_end_up_in_the_body_do_not_count(head: bytes) -> None:
    added = added_headers(head, QID)
    msg = email.message_from_bytes(added + head, policy=email.policy.default)
    assert msg["Date"] is not None, added
    assert msg["Message-ID"] == f"<{QID}@{HOST}>", added


# -- State ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        State(),
        State({"a@b": "delivered", "c@d": "failed"}, "451 try later", {"c@d": "550 no such user"}),
        State(last_error="naïve — ünïcode\nline two"),
    ],
)
def test_state_round_trip(state: State) -> None:
    data = state.to_bytes()
    assert isinstance(data, bytes)
    assert State.from_bytes(data) == state


def test_state_from_partial_json() -> None:
    assert State.from_bytes(b"{}") == State()
    assert State.from_bytes(b'{"last_error": "x"}') == State(last_error="x")


def test_state_pending() -> None:
    e = Envelope("s@x", ("a@b", "c@d", "e@f"), 10)
    assert State().pending(e.recipients) == ("a@b", "c@d", "e@f")
    assert State({"a@b": "delivered", "e@f": "failed"}).pending(e.recipients) == ("c@d",)
    assert State({"a@b": "delivered", "c@d": "delivered", "e@f": "failed"}).pending(e.recipients) == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"{",
        b"[]",
        b"null",
        b"42",
        b'"str"',
        b'{"recipients": 5}',
        b"\xff\xfe",
        b'{"errors": [1]}',
    ],
)
def test_state_garbage(data: bytes) -> None:
    with pytest.raises(CorruptQueueFile):
        State.from_bytes(data)
