"""Unit tests for greenmail.wire: reply parsing, command encoding, dot-stuffing."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from greenmail.errors import CommandError, GreenmailError, ProtocolError
from greenmail.wire import (
    MAX_LINE,
    MAX_LINES,
    MAX_REPLY,
    DotStuffer,
    DotUnstuffer,
    LineNormaliser,
    Reply,
    ReplyParser,
    command,
    mail_from,
    normalise,
    rcpt_to,
    stuff,
    unstuff,
)

HYPOTHESIS = settings(max_examples=200, deadline=None)


# --------------------------------------------------------------------------- helpers


def parse_all(*chunks: bytes) -> list[Reply]:
    """Feed the chunks in order, draining every complete reply after each one."""
    parser = ReplyParser()
    replies: list[Reply] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    assert not parser.pending, "bytes left over after a complete reply sequence"
    return replies


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split data at the given offsets (any order, duplicates allowed)."""
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=20).map(lambda cuts: split_at(data, cuts))


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------- ReplyParser


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        pytest.param(
            b"220 mx.example.org ESMTP ready\r\n", Reply(220, ("mx.example.org ESMTP ready",)), id="single"
        ),
        pytest.param(b"250-a\r\n250-b\r\n250 c\r\n", Reply(250, ("a", "b", "c")), id="multi-line"),
        pytest.param(b"250-a\n250-b\n250 c\n", Reply(250, ("a", "b", "c")), id="bare-lf"),
        pytest.param(b"250-a\r\n250-b\n250 c\r\n", Reply(250, ("a", "b", "c")), id="mixed-eol"),
        pytest.param(b"250\r\n", Reply(250, ("",)), id="no-text"),
        pytest.param(b"250 \r\n", Reply(250, ("",)), id="space-no-text"),
        pytest.param(b"354 go ahead\n", Reply(354, ("go ahead",)), id="354-bare-lf"),
        pytest.param(b"550 5.1.1  two  spaces \r\n", Reply(550, ("5.1.1  two  spaces ",)), id="text-kept"),
        pytest.param(b"250-\r\n250 last\r\n", Reply(250, ("", "last")), id="empty-continuation"),
    ],
)
def test_reply_parser_parses_one_reply(wire: bytes, expected: Reply) -> None:
    assert parse_all(wire) == [expected]
    assert parse_all(*one_byte_at_a_time(wire)) == [expected]


def test_multi_line_reply_is_one_reply_with_three_lines() -> None:
    parser = ReplyParser()
    parser.feed(b"250-a\r\n250-b\r\n250 c\r\n")
    reply = parser.next_reply()
    assert reply is not None
    assert reply.code == 250
    assert reply.lines == ("a", "b", "c")
    assert parser.next_reply() is None
    assert not parser.pending


def test_reply_fed_one_byte_at_a_time_is_returned_only_when_complete() -> None:
    wire = b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    parser = ReplyParser()
    for i, byte in enumerate(one_byte_at_a_time(wire)):
        parser.feed(byte)
        reply = parser.next_reply()
        if i < len(wire) - 1:
            assert reply is None, f"reply returned early at byte {i}"
            assert parser.pending
        else:
            assert reply == Reply(250, ("mx.example.org", "PIPELINING", "8BITMIME"))
    assert not parser.pending


def test_two_replies_in_one_feed_come_out_one_by_one() -> None:
    parser = ReplyParser()
    parser.feed(b"250 first\r\n354-second\r\n354 start\r\n221 par")
    assert parser.next_reply() == Reply(250, ("first",))
    assert parser.pending
    assert parser.next_reply() == Reply(354, ("second", "start"))
    # The start of the third reply stays buffered until the rest arrives.
    assert parser.next_reply() is None
    assert parser.pending
    parser.feed(b"tial\r\n")
    assert parser.next_reply() == Reply(221, ("partial",))
    assert parser.next_reply() is None
    assert not parser.pending


def test_pending_tracks_unfinished_multi_line_reply() -> None:
    parser = ReplyParser()
    assert not parser.pending
    parser.feed(b"250-a\r\n")
    assert parser.next_reply() is None
    assert parser.pending  # a continuation line was consumed, reply not finished
    parser.feed(b"250 b\r\n")
    assert parser.next_reply() == Reply(250, ("a", "b"))
    assert not parser.pending


@pytest.mark.parametrize(
    "line",
    [
        b"hello",
        b"",
        b"25 x",
        b"25",
        b"2500 x",
        b"099 x",
        b"199 x",
        b"650 x",
        b"250x",
        b"250\tx",
        b" 250 x",
        b"abc x",
        b"2x0 x",
    ],
)
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_malformed_reply_line_raises(line: bytes, eol: bytes) -> None:
    parser = ReplyParser()
    parser.feed(line + eol)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_malformed_continuation_line_raises() -> None:
    parser = ReplyParser()
    parser.feed(b"250-ok\r\ngarbage\r\n")
    with pytest.raises(ProtocolError):
        parser.next_reply()


@pytest.mark.parametrize(
    "wire",
    [b"250-a\r\n251 b\r\n", b"250-a\r\n550 b\r\n", b"250-a\r\n250-b\r\n450-c\r\n450 d\r\n"],
)
def test_code_changing_inside_multi_line_reply_raises(wire: bytes) -> None:
    parser = ReplyParser()
    parser.feed(wire)
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_protocol_error_is_a_greenmail_smtp_error() -> None:
    parser = ReplyParser()
    parser.feed(b"hello\r\n")
    with pytest.raises(ProtocolError) as info:
        parser.next_reply()
    assert isinstance(info.value, GreenmailError)
    assert info.value.reason == "protocol"


@pytest.mark.parametrize("prefix", [b"", b"250 "], ids=["junk", "after-code"])
def test_endless_line_raises_on_feed_soon_after_max_line(prefix: bytes) -> None:
    """A 10 MB line without newline is refused on feed, long before it is all buffered."""
    chunk = b"x" * 1000
    total = 10 * 1024 * 1024
    parser = ReplyParser()
    fed = 0
    with pytest.raises(ProtocolError):
        fed += len(prefix)
        parser.feed(prefix)
        while fed < total:
            fed += len(chunk)  # counted before the feed that raises
            parser.feed(chunk)
    assert MAX_LINE < fed <= MAX_LINE + len(chunk)


def test_feed_of_one_huge_chunk_without_newline_raises() -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"250 " + b"x" * (10 * 1024 * 1024))


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_max_line_boundary_is_the_same_whole_or_byte_by_byte(eol: bytes) -> None:
    # MAX_LINE bytes before the LF (CR included) is the longest line accepted.
    fits = b"250 " + b"x" * (MAX_LINE - 4 - (len(eol) - 1)) + eol
    assert fits.index(b"\n") == MAX_LINE
    expected = [Reply(250, ("x" * (MAX_LINE - 4 - (len(eol) - 1)),))]
    assert parse_all(fits) == expected
    assert parse_all(*one_byte_at_a_time(fits)) == expected

    too_long = b"250 x" + fits[4:]
    with pytest.raises(ProtocolError):
        parse_all(too_long)
    with pytest.raises(ProtocolError):
        parse_all(*one_byte_at_a_time(too_long))


@pytest.mark.parametrize("drain_first", [True, False], ids=["next-reply", "feed-without-drain"])
def test_overlong_partial_line_after_a_complete_reply_raises(drain_first: bool) -> None:
    """A partial line over MAX_LINE is refused even when a complete reply precedes it.

    Without this, a relay that sends a good reply followed by >MAX_LINE bytes
    without newline and then goes quiet makes the client wait (a timeout)
    instead of failing with a protocol error, and repeated feeds between
    next_reply() calls grow the buffer without bound.
    """
    parser = ReplyParser()
    if drain_first:
        with pytest.raises(ProtocolError):  # at the feed or, at the latest, the next look
            parser.feed(b"220 hi\r\n" + b"x" * (MAX_LINE + 100))
            assert parser.next_reply() == Reply(220, ("hi",))
            parser.next_reply()
    else:
        parser.feed(b"220 hi\r\n")
        with pytest.raises(ProtocolError):
            for _ in range(100):  # 100 kB of one line, never drained
                parser.feed(b"x" * 1000)


def test_endless_multi_line_reply_raises_once_over_max_lines() -> None:
    parser = ReplyParser()
    lines_fed = 0
    with pytest.raises(ProtocolError):
        for _ in range(100_000):
            parser.feed(b"250-x\r\n")
            lines_fed += 1
            assert parser.next_reply() is None
    assert lines_fed == MAX_LINES + 1


def test_endless_multi_line_reply_in_one_feed_raises() -> None:
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * (MAX_LINES * 5))
    with pytest.raises(ProtocolError):
        parser.next_reply()


def test_reply_of_exactly_max_lines_is_accepted() -> None:
    wire = b"250-x\r\n" * (MAX_LINES - 1) + b"250 end\r\n"
    [reply] = parse_all(wire)
    assert len(reply.lines) == MAX_LINES
    assert reply.lines[-1] == "end"


def test_reply_over_max_reply_bytes_raises() -> None:
    line = b"250-" + b"y" * 3000 + b"\r\n"
    count = MAX_REPLY // len(line) + 2
    assert count < MAX_LINES  # it is the byte cap that must trip, not the line cap
    parser = ReplyParser()
    parser.feed(line * count + b"250 end\r\n")
    with pytest.raises(ProtocolError):
        parser.next_reply()


@pytest.mark.parametrize(
    ("reply", "cls", "text", "enhanced", "as_str"),
    [
        (Reply(220, ("mx ESMTP",)), 2, "mx ESMTP", None, "220 mx ESMTP"),
        (Reply(250), 2, "", None, "250"),
        (Reply(250, ("",)), 2, "", None, "250"),
        (Reply(250, ("a", "b", "c")), 2, "a b c", None, "250 a b c"),
        (Reply(250, ("a", "", "c")), 2, "a c", None, "250 a c"),
        (Reply(354, ("go ahead",)), 3, "go ahead", None, "354 go ahead"),
        (Reply(421, ("4.3.2 shutting down",)), 4, "4.3.2 shutting down", "4.3.2", "421 4.3.2 shutting down"),
        (Reply(550, ("5.1.1 no such user",)), 5, "5.1.1 no such user", "5.1.1", "550 5.1.1 no such user"),
        (Reply(550, ("5.1.1",)), 5, "5.1.1", "5.1.1", "550 5.1.1"),
        (
            Reply(552, ("5.3.4 too big", "really")),
            5,
            "5.3.4 too big really",
            "5.3.4",
            "552 5.3.4 too big really",
        ),
        (Reply(250, ("2.0.0 ok",)), 2, "2.0.0 ok", "2.0.0", "250 2.0.0 ok"),
        (Reply(451, ("4.123.456 x",)), 4, "4.123.456 x", "4.123.456", "451 4.123.456 x"),
        (Reply(550, ("no such user 5.1.1",)), 5, "no such user 5.1.1", None, "550 no such user 5.1.1"),
        (Reply(550, ("3.1.1 bad class",)), 5, "3.1.1 bad class", None, "550 3.1.1 bad class"),
        (Reply(550, ("5.1.1x",)), 5, "5.1.1x", None, "550 5.1.1x"),
        (Reply(550, ("5.1",)), 5, "5.1", None, "550 5.1"),
        (Reply(550, ("5.1234.1 x",)), 5, "5.1234.1 x", None, "550 5.1234.1 x"),
    ],
)
def test_reply_properties(reply: Reply, cls: int, text: str, enhanced: str | None, as_str: str) -> None:
    assert reply.cls == cls
    assert reply.text == text
    assert reply.enhanced == enhanced
    assert str(reply) == as_str


def test_enhanced_code_from_parsed_reply() -> None:
    [reply] = parse_all(b"550 5.1.1 no such user\r\n")
    assert reply.enhanced == "5.1.1"
    assert reply.cls == 5
    [reply] = parse_all(b"250 ok\r\n")
    assert reply.enhanced is None


# Reply text: anything but CR/LF (a trailing CR would be an EOL), no surrogates.
_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=40,
)


@st.composite
def reply_sequences(draw: st.DrawFn) -> tuple[bytes, list[Reply]]:
    replies = draw(
        st.lists(
            st.builds(
                Reply,
                st.integers(200, 599),
                st.lists(_text, min_size=1, max_size=5).map(tuple),
            ),
            max_size=6,
        )
    )
    wire = bytearray()
    for reply in replies:
        for i, line in enumerate(reply.lines):
            last = i == len(reply.lines) - 1
            eol = draw(st.sampled_from([b"\r\n", b"\n"]))
            sep = b" " if last else b"-"
            if last and not line and draw(st.booleans()):
                sep = b""  # "250\r\n" with no text at all
            wire += str(reply.code).encode() + sep + line.encode("utf-8") + eol
    return bytes(wire), replies


@HYPOTHESIS
@given(st.data())
def test_any_chunking_of_valid_replies_parses_to_the_same_replies(data: st.DataObject) -> None:
    wire, replies = data.draw(reply_sequences())
    chunks = data.draw(chunkings(wire))
    assert b"".join(chunks) == wire
    assert parse_all(wire) == replies
    assert parse_all(*chunks) == replies


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (command("EHLO", "client.example.org"), b"EHLO client.example.org\r\n"),
        (command("DATA"), b"DATA\r\n"),
        (command("QUIT"), b"QUIT\r\n"),
        (command("RSET", None), b"RSET\r\n"),
        (mail_from("a@b"), b"MAIL FROM:<a@b>\r\n"),
        (mail_from(""), b"MAIL FROM:<>\r\n"),
        (rcpt_to("user@example.org"), b"RCPT TO:<user@example.org>\r\n"),
        (rcpt_to("j\u00f6rg@b\u00fccher.example"), "RCPT TO:<j\u00f6rg@b\u00fccher.example>\r\n".encode()),
    ],
)
def test_command_encoding(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected


_BAD = ["\r", "\n", "\x00", "\r\n"]


@pytest.mark.parametrize("bad", _BAD, ids=["cr", "lf", "nul", "crlf"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize(
    "encode",
    [
        lambda arg: command("EHLO", arg),
        mail_from,
        rcpt_to,
    ],
    ids=["command", "mail_from", "rcpt_to"],
)
def test_command_refuses_cr_lf_nul(bad: str, where: str, encode) -> None:
    arg = {"start": bad + "a@b", "middle": "a" + bad + "@b", "end": "a@b" + bad}[where]
    with pytest.raises(CommandError) as info:
        encode(arg)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):
        encode(arg)


@pytest.mark.parametrize("bad", _BAD, ids=["cr", "lf", "nul", "crlf"])
def test_command_refuses_cr_lf_nul_in_verb(bad: str) -> None:
    with pytest.raises(CommandError):
        command("NOOP" + bad)


def test_command_injection_example() -> None:
    with pytest.raises(CommandError):
        rcpt_to("victim@example.org>\r\nRCPT TO:<attacker@example.org")


@HYPOTHESIS
@given(st.text(max_size=30), st.text(max_size=30))
def test_command_either_encodes_one_line_or_refuses(prefix: str, suffix: str) -> None:
    arg = prefix + suffix
    if re.search(r"[\r\n\x00]", arg):
        with pytest.raises(CommandError):
            mail_from(arg)
    else:
        try:
            line = mail_from(arg)
        except UnicodeEncodeError:  # lone surrogates cannot go on the wire at all
            return
        assert line == b"MAIL FROM:<" + arg.encode("utf-8") + b">\r\n"
        assert line.count(b"\n") == 1
        assert line.count(b"\r") == 1
        assert b"\x00" not in line


# --------------------------------------------------------------------------- dot-stuffing


def stuff_chunks(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b".hello\n", b"..hello\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\rb", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"\r", b"\r\n.\r\n"),
        (b"\r\r", b"\r\n\r\n.\r\n"),
        (b"\n\r", b"\r\n\r\n.\r\n"),
        (b"a\r\n\nb", b"a\r\n\r\nb\r\n.\r\n"),
        (b"..x\r\n", b"...x\r\n.\r\n"),
        (b"x.\r\n.y", b"x.\r\n..y\r\n.\r\n"),
        (b"\r.\r.", b"\r\n..\r\n..\r\n.\r\n"),
        (b"a.b\n", b"a.b\r\n.\r\n"),
    ],
)
def test_stuff_examples(body: bytes, wire: bytes) -> None:
    assert stuff(body) == wire
    assert stuff_chunks(one_byte_at_a_time(body)) == wire
    assert unstuff(wire) == normalise(body)


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        pytest.param([b"a\r", b"\nb"], b"a\r\nb\r\n.\r\n", id="cr|lf-is-one-crlf"),
        pytest.param([b"a\r", b"", b"\nb"], b"a\r\nb\r\n.\r\n", id="cr|empty|lf"),
        pytest.param([b"a\r", b"\r\nb"], b"a\r\n\r\nb\r\n.\r\n", id="cr|crlf"),
        pytest.param([b"a\r", b"b"], b"a\r\nb\r\n.\r\n", id="bare-cr-at-chunk-end"),
        pytest.param([b"a\r"], b"a\r\n.\r\n", id="cr-at-very-end"),
        pytest.param([b"a\n", b".b"], b"a\r\n..b\r\n.\r\n", id="lf|dot"),
        pytest.param([b"a\r\n", b".b"], b"a\r\n..b\r\n.\r\n", id="crlf|dot"),
        pytest.param([b"a\r", b".b"], b"a\r\n..b\r\n.\r\n", id="cr|dot"),
        pytest.param([b"a\r", b"\n", b".b"], b"a\r\n..b\r\n.\r\n", id="cr|lf|dot"),
        pytest.param([b"a\n", b"", b"."], b"a\r\n..\r\n.\r\n", id="lf|empty|dot"),
        pytest.param([b"a", b".b"], b"a.b\r\n.\r\n", id="no-eol|dot-not-stuffed"),
        pytest.param([b".", b"."], b"...\r\n.\r\n", id="dot|dot"),
    ],
)
def test_dot_stuffer_across_chunk_boundaries(chunks: list[bytes], wire: bytes) -> None:
    assert stuff_chunks(chunks) == wire
    assert stuff(b"".join(chunks)) == wire


def test_dot_stuffer_holds_a_trailing_cr_until_it_knows_what_follows() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r") == b"a"
    assert stuffer.feed(b"\n") == b"\r\n"
    assert stuffer.feed(b".x") == b"..x"
    assert stuffer.finish() == b"\r\n.\r\n"


def assert_valid_data_payload(wire: bytes, body: bytes) -> None:
    # Ends with the terminator (the whole of it for an empty body).
    if body == b"":
        assert wire == b".\r\n"
    else:
        assert wire.endswith(b"\r\n.\r\n")
    # No bare CR, no bare LF.
    assert re.search(rb"\r(?!\n)", wire) is None, "bare CR in output"
    assert re.search(rb"(?<!\r)\n", wire) is None, "bare LF in output"
    # No premature "." line; every other line starting with "." was stuffed.
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    assert lines[-2] == b"."
    for line in lines[:-2]:
        assert line != b"."
        if line.startswith(b"."):
            assert line.startswith(b"..")


# Bytes rich in the interesting characters, plus arbitrary binary.
_bodies = st.one_of(
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\x00", b"\xff"]), max_size=40).map(
        b"".join
    ),
    st.binary(max_size=200),
)


@HYPOTHESIS
@given(st.data())
def test_dot_stuffer_any_chunking_matches_stuff_of_whole_input(data: st.DataObject) -> None:
    body = data.draw(_bodies)
    chunks = data.draw(chunkings(body))
    assert b"".join(chunks) == body
    assert stuff_chunks(chunks) == stuff(body)


@HYPOTHESIS
@given(_bodies)
@example(b"")
@example(b".")
@example(b"\r")
@example(b"\r\n.\r\n")
@example(b".\r\n.")
def test_unstuff_inverts_stuff_up_to_normalisation(body: bytes) -> None:
    assert unstuff(stuff(body)) == normalise(body)


@HYPOTHESIS
@given(st.data())
def test_stuffed_output_is_a_valid_data_payload(data: st.DataObject) -> None:
    body = data.draw(_bodies)
    chunks = data.draw(chunkings(body))
    assert_valid_data_payload(stuff_chunks(chunks), body)


@pytest.mark.parametrize("body", [b"", b".", b"a\r", b"\n.\n", b".\r\n.\r\n", b"x\r\r\n\n."])
def test_stuffed_output_is_a_valid_data_payload_examples(body: bytes) -> None:
    assert_valid_data_payload(stuff(body), body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", b""),
        (b"a", b"a\r\n"),
        (b"a\n", b"a\r\n"),
        (b"a\r", b"a\r\n"),
        (b"a\r\n", b"a\r\n"),
        (b"a\rb\nc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
        (b"\n\r", b"\r\n\r\n"),
    ],
)
def test_normalise(body: bytes, expected: bytes) -> None:
    assert normalise(body) == expected


# --------------------------------------------------------------------------- un-stuffing


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"a\r\n",
        b"a\r\nb\r\n",
        b"..\r\n",  # a stuffed dot is not the terminator
        b"a\r\n.",  # dot without its line ending
        b"a\r\n. \r\n",
        b"a\r\n.x\r\n",
    ],
)
def test_unstuff_without_terminating_dot_raises(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        unstuff(wire)


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b".\r\n", b""),
        (b".\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...x\r\n.\r\n", b"..x\r\n"),
        (b"a\r\n.\r\nignored\r\n", b"a\r\n"),
    ],
)
def test_unstuff_examples(wire: bytes, expected: bytes) -> None:
    assert unstuff(wire) == expected


def test_dot_unstuffer_feed_line() -> None:
    u = DotUnstuffer()
    assert u.feed_line(b"hello\r\n") is False
    assert u.feed_line(b"..dot\r\n") is False
    assert u.feed_line(b"\r\n") is False
    assert u.data() == b"hello\r\n.dot\r\n\r\n"
    assert u.size == len(u.data())
    assert u.feed_line(b".\r\n") is True
    assert u.data() == b"hello\r\n.dot\r\n\r\n"


# -- long lines are broken at 998 octets (CRLF SP inserted), the same whatever the chunking ---------

LONG_PIECES = st.sampled_from(
    [b"x" * 997, b"y" * 998, b"z" * 999, b"w" * 1995, b"\n", b"\r\n", b"\r", b".", b"ab"]
)
LONG_BODIES = st.lists(LONG_PIECES, max_size=12).map(b"".join)


@given(body=LONG_BODIES, cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=8))
@example(body=b"a" * 2500 + b"\n", cuts=[998, 999])
@example(body=b"." + b"b" * 997 + b"\n", cuts=[1])  # 998 octets of text: a stuffed dot does not fold it
def test_long_lines_are_broken_the_same_whatever_the_chunking(body: bytes, cuts: list[int]) -> None:
    for cls in (LineNormaliser, DotStuffer):
        s = cls()
        out, pos = b"", 0
        for cut in sorted(set(cuts)):
            out += s.feed(body[pos:cut])
            pos = max(pos, cut)
        out += s.feed(body[pos:]) + s.finish()
        expected = normalise(body)
        if cls is DotStuffer:
            assert unstuff(out) == expected
            lines = out.split(b"\r\n")
            assert all(len(line) <= 998 or (line.startswith(b"..") and len(line) == 999) for line in lines)
        else:
            assert out == expected
            assert all(len(line) <= 998 for line in out.split(b"\r\n"))


def test_a_2500_octet_line_on_the_wire() -> None:
    assert (
        normalise(b"a" * 2500 + b"\n") == b"a" * 998 + b"\r\n " + b"a" * 997 + b"\r\n " + b"a" * 505 + b"\r\n"
    )


CRLF_PIECES = st.sampled_from([b"a" * 996, b"b" * 998, b"c" * 999, b"\r\n", b"\r", b"\n", b"d"])


@given(data=st.lists(CRLF_PIECES, max_size=10).map(b"".join), pos=st.integers(min_value=0, max_value=3000))
@example(data=b"x" * 998 + b"\r\n" + b"y" * 998, pos=0)
@example(data=b"x" * 999 + b"\r\n", pos=0)
def test_the_long_line_check_agrees_with_splitting_every_line(data: bytes, pos: int) -> None:
    """The folder's quick check (one search per 998 octets) says what splitting at every CRLF says."""
    from greenmail import wire

    pos = min(pos, len(data))
    assert wire._short_lines(data, pos) == (max(map(len, data[pos:].split(b"\r\n"))) <= 998)
