"""Unit tests of greenmail.sendmail: the command line, reading the message, and prepare().

The interface is the one cron, PHP, git and mail(1) use with /usr/sbin/sendmail:
-t, -f/-r (also glued: -fADDR), -F NAME, -i/-oi, -bp, -q, -C FILE/--config,
recipients as arguments, ``--``, other -o options ignored.
"""

from __future__ import annotations

import email
import email.policy
import io
from email.message import EmailMessage

import pytest

from greenmail import sendmail as sm
from greenmail.sendmail import DataError, Options, UsageError, parse, prepare, read_message

# -- parse() ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["a@example.net"], {"recipients": ["a@example.net"]}),
        (["a@example.net", "b@example.net"], {"recipients": ["a@example.net", "b@example.net"]}),
        (["-t"], {"extract": True}),
        (["-f", "s@example.org"], {"sender": "s@example.org"}),
        (["-fs@example.org"], {"sender": "s@example.org"}),
        (["-r", "s@example.org"], {"sender": "s@example.org"}),
        (["-rs@example.org"], {"sender": "s@example.org"}),
        (["-f", "<>"], {"sender": "<>"}),
        (["-F", "Jane Doe"], {"full_name": "Jane Doe"}),
        (["-FJane"], {"full_name": "Jane"}),
        (["-i"], {"dot_ends": False}),
        (["-oi"], {"dot_ends": False}),
        (["-bp"], {"mode": "list"}),
        (["-q"], {"mode": "queue"}),
        (["-q30m"], {"mode": "queue"}),
        (["-C", "/etc/g.toml"], {"config": "/etc/g.toml"}),
        (["-C/etc/g.toml"], {"config": "/etc/g.toml"}),
        (["--config", "/etc/g.toml"], {"config": "/etc/g.toml"}),
        (["--config=/etc/g.toml"], {"config": "/etc/g.toml"}),
        # delivery-mode and other -o options: accepted and ignored
        (["-odb", "-oem", "-oQ/var/spool", "-oee", "a@example.net"], {"recipients": ["a@example.net"]}),
        (["-v", "-bm", "a@example.net"], {"recipients": ["a@example.net"]}),
        (
            ["-B", "8BITMIME", "-N", "never", "-V", "envid", "a@example.net"],
            {"recipients": ["a@example.net"]},
        ),
        (["-B8BITMIME", "a@example.net"], {"recipients": ["a@example.net"]}),
        # everything after -- is a recipient, even when it looks like an option
        (
            ["-t", "--", "-weird@example.net", "-t"],
            {"extract": True, "recipients": ["-weird@example.net", "-t"]},
        ),
        # the usual cron / PHP / git command lines
        (
            ["-t", "-i", "-f", "app@example.org", "-F", "The App"],
            {"extract": True, "dot_ends": False, "sender": "app@example.org", "full_name": "The App"},
        ),
        (["-oi", "-t"], {"extract": True, "dot_ends": False}),
        (
            ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
            {"full_name": "CronDaemon", "dot_ends": False, "recipients": ["root"]},
        ),
        (["-fs@x.org", "-t", "a@x.org"], {"sender": "s@x.org", "extract": True, "recipients": ["a@x.org"]}),
        # getopt: bundled flags, a value glued to the last letter of a bundle, permuted recipients
        (["-ti"], {"extract": True, "dot_ends": False}),
        (["-it"], {"extract": True, "dot_ends": False}),
        (["-vti"], {"extract": True, "dot_ends": False}),
        (["-tfs@x.org"], {"extract": True, "sender": "s@x.org"}),
        (["-tf", "s@x.org"], {"extract": True, "sender": "s@x.org"}),
        (["-o", "i"], {"dot_ends": False}),
        (["root", "-i"], {"dot_ends": False, "recipients": ["root"]}),
        (["-i", "--", "-x@y.org"], {"dot_ends": False, "recipients": ["-x@y.org"]}),
        (["-bs"], {"mode": "smtp"}),
        (["-b", "s"], {"mode": "smtp"}),
        (["-bv", "root"], {"mode": "verify", "recipients": ["root"]}),
        (["-bi"], {"mode": "aliases"}),
        (["-I"], {"mode": "aliases"}),
        (["-bm", "a@x.org"], {"recipients": ["a@x.org"]}),
        (["-Am", "-U", "-G", "-n", "a@x.org"], {"recipients": ["a@x.org"]}),
        (["-h", "17", "-p", "local", "-L", "tag", "-R", "hdrs", "-X", "/dev/null"], {}),
    ],
)
def test_parse(argv: list[str], expected: dict[str, object]) -> None:
    o = parse(argv)
    want = Options()
    for key, value in expected.items():
        setattr(want, key, value)
    assert o == want


def test_last_sender_option_wins() -> None:
    assert parse(["-f", "a@x.org", "-r", "b@x.org"]).sender == "b@x.org"


def test_recipients_keep_their_order_around_options() -> None:
    assert parse(["a@x.org", "-i", "b@x.org", "-f", "s@x.org", "c@x.org"]).recipients == [
        "a@x.org",
        "b@x.org",
        "c@x.org",
    ]


@pytest.mark.parametrize(
    "argv",
    [["-f"], ["-r"], ["-F"], ["-C"], ["--config"], ["a@x.org", "-f"], ["-t", "-F"], ["-B"], ["-N"]],
)
def test_missing_argument(argv: list[str]) -> None:
    with pytest.raises(UsageError, match=argv[-1]):
        parse(argv)


@pytest.mark.parametrize("arg", ["-Z", "-bd", "-bz", "-x", "--frobnicate", "-tZ"])
def test_unknown_option_is_a_usage_error(arg: str) -> None:
    with pytest.raises(UsageError, match=arg):
        parse([arg, "a@example.net"])


def test_usage_error_is_a_greenmail_error() -> None:
    from greenmail.errors import GreenmailError

    assert issubclass(UsageError, GreenmailError)
    assert issubclass(DataError, GreenmailError)


# -- read_message() --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "dot_ends", "expected"),
    [
        (b"Subject: x\n\nbody\n", True, b"Subject: x\n\nbody\n"),
        (b"Subject: x\n\nbody\n.\nignored\n", True, b"Subject: x\n\nbody\n"),
        (b"Subject: x\r\n\r\nbody\r\n.\r\nignored\r\n", True, b"Subject: x\r\n\r\nbody\r\n"),
        (b"Subject: x\n\nbody\n.", True, b"Subject: x\n\nbody\n"),  # "." as the last line, no newline
        (b"Subject: x\n\nbody\n..\n. \n .\n.x\n", True, b"Subject: x\n\nbody\n..\n. \n .\n.x\n"),
        (b"Subject: x\n\n.\n", True, b"Subject: x\n\n"),
        (b".\nall of it ignored\n", True, b""),
        # -i / -oi: a lone dot is just a line
        (b"Subject: x\n\nbody\n.\nmore\n", False, b"Subject: x\n\nbody\n.\nmore\n"),
        (b"Subject: x\r\n\r\n.\r\n.\r\n", False, b"Subject: x\r\n\r\n.\r\n.\r\n"),
        (b"no newline at the end", False, b"no newline at the end"),
        (b"no newline at the end", True, b"no newline at the end"),
        (b"", True, b""),
        (b"", False, b""),
    ],
)
def test_read_message(data: bytes, dot_ends: bool, expected: bytes) -> None:
    assert read_message(io.BytesIO(data), dot_ends) == expected


def test_read_message_large_body_without_i() -> None:
    body = b"".join(b"line %d\n" % i for i in range(100_000))
    assert read_message(io.BytesIO(b"Subject: big\n\n" + body + b".\n"), True) == b"Subject: big\n\n" + body


# -- prepare() ----------------------------------------------------------------------------------------


def parsed(message: bytes) -> EmailMessage:
    msg = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def headers_of(message: bytes) -> list[str]:
    """Header names in order, from the raw bytes (to catch duplicates and leftovers)."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return [ln.split(b":", 1)[0].decode().lower() for ln in head.split(b"\n") if ln and ln[:1] not in b" \t"]


def opts(*argv: str) -> Options:
    return parse(list(argv))


def test_recipients_from_arguments() -> None:
    sender, rcpts, message = prepare(opts("-f", "s@example.org", "a@example.net"), b"Subject: x\n\nbody\n")
    assert sender == "s@example.org"
    assert rcpts == ["a@example.net"]
    assert parsed(message).get_content() == "body\n"


def test_extract_to_cc_bcc() -> None:
    msg = (
        b"From: s@example.org\n"
        b"To: a@example.net, b@example.net\n"
        b"Cc: c@example.net\n"
        b"Bcc: hidden@example.net\n"
        b"Subject: hi\n"
        b"\n"
        b"body\nTo: not-a-header@example.net\n"
    )
    _, rcpts, out = prepare(opts("-t"), msg)
    assert sorted(rcpts) == ["a@example.net", "b@example.net", "c@example.net", "hidden@example.net"]
    assert b"hidden@example.net" not in out
    assert "bcc" not in headers_of(out)
    m = parsed(out)
    assert m["To"] == "a@example.net, b@example.net"
    assert m["Cc"] == "c@example.net"
    assert m.get_content() == "body\nTo: not-a-header@example.net\n"


def test_extract_display_names_quoted_commas_and_groups() -> None:
    msg = (
        b'To: Alice Example <alice@example.net>, "Doe, John" <john@example.net>\n'
        b"Cc: friends: carol@example.net, Dave <dave@example.net>;, undisclosed-recipients:;\n"
        b"Bcc: Eve <eve@example.net>\n"
        b"Subject: names\n\nbody\n"
    )
    _, rcpts, out = prepare(opts("-t", "-f", "s@example.org"), msg)
    assert sorted(rcpts) == sorted(
        ["alice@example.net", "john@example.net", "carol@example.net", "dave@example.net", "eve@example.net"]
    )
    assert "bcc" not in headers_of(out)
    assert b"eve@example.net" not in out


def test_extract_folded_headers_and_case() -> None:
    msg = (
        b"TO: a@example.net,\n"
        b"  b@example.net\n"
        b"cc: c@example.net\n"
        b"BCC: d@example.net,\n"
        b"\te@example.net\n"
        b"Subject: folded\n\nbody\n"
    )
    _, rcpts, out = prepare(opts("-t"), msg)
    assert sorted(rcpts) == [f"{x}@example.net" for x in "abcde"]
    assert b"d@example.net" not in out and b"e@example.net" not in out  # the Bcc continuation too
    assert headers_of(out).count("subject") == 1
    assert parsed(out)["Subject"] == "folded"


def test_extract_several_to_headers() -> None:
    _, rcpts, _ = prepare(opts("-t"), b"To: a@example.net\nTo: b@example.net\nSubject: x\n\nbody\n")
    assert sorted(rcpts) == ["a@example.net", "b@example.net"]


def test_extract_adds_to_command_line_recipients() -> None:
    _, rcpts, _ = prepare(opts("-t", "arg@example.net"), b"To: hdr@example.net\n\nbody\n")
    assert sorted(rcpts) == ["arg@example.net", "hdr@example.net"]


def test_bcc_kept_without_t() -> None:
    """Without -t the headers are not looked at: the message goes as given."""
    msg = b"From: s@example.org\nTo: a@example.net\nBcc: b@example.net\n\nbody\n"
    _, rcpts, out = prepare(opts("x@example.net"), msg)
    assert rcpts == ["x@example.net"]
    assert out == msg


def test_resent_bcc_removed_with_t() -> None:
    msg = b"From: s@example.org\nTo: a@example.net\nResent-Bcc: r@example.net\n\nbody\n"
    _, _, out = prepare(opts("-t"), msg)
    assert b"r@example.net" not in out


def test_no_recipients_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        prepare(opts(), b"Subject: x\n\nbody\n")
    with pytest.raises(UsageError):
        prepare(opts("-t"), b"Subject: no recipient headers\n\nbody\n")


def test_unusable_recipient_headers_are_a_data_error() -> None:
    with pytest.raises(DataError):
        prepare(opts("-t"), b"To: ,,,\nSubject: x\n\nbody\n")


def test_headers_in_the_body_are_not_recipients() -> None:
    _, rcpts, _ = prepare(opts("-t"), b"To: a@example.net\n\nCc: body@example.net\nBcc: body2@example.net\n")
    assert rcpts == ["a@example.net"]


# From:


def test_from_added_when_missing() -> None:
    sender, _, out = prepare(opts("-f", "app@example.org", "a@example.net"), b"Subject: x\n\nbody\n")
    assert sender == "app@example.org"
    m = parsed(out)
    assert m["From"].addresses[0].addr_spec == "app@example.org"
    assert headers_of(out).count("from") == 1
    assert m["Subject"] == "x"
    assert m.get_content() == "body\n"


def test_from_added_with_full_name() -> None:
    _, _, out = prepare(
        opts("-f", "app@example.org", "-F", "The App", "a@example.net"), b"Subject: x\n\nbody\n"
    )
    addr = parsed(out)["From"].addresses[0]
    assert addr.addr_spec == "app@example.org"
    assert addr.display_name == "The App"


def test_from_uses_the_default_sender() -> None:
    sender, _, out = prepare(opts("-F", "Cron Daemon", "a@example.net"), b"Subject: x\n\nbody\n")
    assert sender == sm.default_sender()
    assert "@" in sender
    addr = parsed(out)["From"].addresses[0]
    assert addr.addr_spec == sender
    assert addr.display_name == "Cron Daemon"


def test_null_sender_gets_a_well_formed_from() -> None:
    """``-f '<>'`` (vacation programs, auto-replies): the envelope is the null sender, and the
    From: added for a message without one is not a doubled ``<<>>``."""
    sender, rcpts, out = prepare(opts("-f", "<>", "a@example.net"), b"Subject: auto reply\n\nbody\n")
    assert sender in ("", "<>")
    assert rcpts == ["a@example.net"]
    assert b"<<" not in out and b">>" not in out
    m = parsed(out)
    assert "From" in m
    assert m.get_content() == "body\n"


def test_existing_from_kept() -> None:
    msg = b"Subject: x\nfrom: Original <orig@example.org>\n\nbody\n"
    sender, _, out = prepare(opts("-f", "bounce@example.org", "-F", "Other", "a@example.net"), msg)
    assert sender == "bounce@example.org"  # the envelope follows -f ...
    assert out == msg  # ... the header is left alone
    assert headers_of(out).count("from") == 1


def test_message_without_headers_gets_a_from_and_keeps_its_body() -> None:
    """``echo hello | sendmail user@host``: the text is the body, not a header."""
    _, _, out = prepare(opts("-f", "s@example.org", "a@example.net"), b"hello world\nsecond line\n")
    m = parsed(out)
    assert m["From"].addresses[0].addr_spec == "s@example.org"
    assert not m.defects, m.defects
    assert m.get_content() == "hello world\nsecond line\n"


def test_headers_only_message() -> None:
    _, _, out = prepare(opts("-f", "s@example.org", "a@example.net"), b"Subject: only headers")
    m = parsed(out)
    assert m["Subject"] == "only headers"
    assert m["From"].addresses[0].addr_spec == "s@example.org"


# CRLF


def test_crlf_message() -> None:
    msg = (
        b"To: Alice <a@example.net>\r\n"
        b"Bcc: hidden@example.net,\r\n"
        b" hidden2@example.net\r\n"
        b"Subject: crlf\r\n"
        b"\r\n"
        b"line one\r\nline two\r\n"
    )
    _, rcpts, out = prepare(opts("-t", "-f", "s@example.org", "-F", "S"), msg)
    assert sorted(rcpts) == ["a@example.net", "hidden2@example.net", "hidden@example.net"]
    assert b"hidden" not in out
    assert b"\n" not in out.replace(b"\r\n", b"")  # every line still ends in CRLF, the added From too
    m = parsed(out)
    assert m["From"].addresses[0].addr_spec == "s@example.org"
    assert m["Subject"] == "crlf"
    assert m.get_content().replace("\r\n", "\n") == "line one\nline two\n"


def test_crlf_body_untouched() -> None:
    msg = b"To: a@example.net\r\nBcc: b@example.net\r\n\r\nbody\r\n.leading dot\r\n\r\n"
    _, _, out = prepare(opts("-t", "-f", "s@example.org"), msg)
    assert out.endswith(b"\r\n\r\nbody\r\n.leading dot\r\n\r\n")
