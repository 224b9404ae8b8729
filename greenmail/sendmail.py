"""The sendmail interface: what cron, PHP and git pass to /usr/sbin/sendmail.

Owns: parsing sendmail's options (-t, -f, -r, -F, -i/-oi, -bp, -bm, -q,
-C, recipients as arguments; other -o options and -v/-B/-N/-V/-X ignored as
Postfix does), reading the message (up to a lone "." line unless -i),
collecting recipients from To/Cc/Bcc with -t, removing Bcc, and adding a
From: header when missing. Enqueueing is the spool's job.
Must not touch: sockets, gevent, exit codes (the CLI maps errors).
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import BinaryIO

from greenmail.errors import GreenmailError
from greenmail.queuefile import HOST


class UsageError(GreenmailError):
    """A sendmail command line we cannot honour."""


class DataError(GreenmailError):
    """The message itself is unusable (e.g. an unparseable recipient header)."""


_IGNORED_WITH_ARG = {"-B", "-N", "-V", "-X", "-R", "-L", "-O"}
_IGNORED = {"-v", "-m", "-n", "-U", "-bm", "-Am", "-Ac"}
_HEADER_START = re.compile(rb"([!-9;-~]+):")


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    extract: bool = False
    dot_ends: bool = True
    mode: str = "send"  # send | list | queue
    config: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options:
    """sendmail's command line; UsageError for what we do not support."""
    o = Options()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            o.recipients.extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            o.recipients.append(arg)
        elif arg.startswith("--config="):
            o.config = arg.split("=", 1)[1]
        elif arg in ("-f", "-r", "-F", "-C", "--config") or arg in _IGNORED_WITH_ARG:
            value = next(args, None)
            if value is None:
                raise UsageError(f"option {arg} needs an argument")
            _set(o, arg, value)
        elif arg[:2] in ("-f", "-r", "-F", "-C"):
            _set(o, arg[:2], arg[2:])
        else:
            _flag(o, arg)
    return o


def _set(o: Options, opt: str, value: str) -> None:
    if opt in ("-f", "-r"):
        o.sender = value
    elif opt == "-F":
        o.full_name = value
    elif opt in ("-C", "--config"):
        o.config = value


def _flag(o: Options, arg: str) -> None:
    if arg == "-t":
        o.extract = True
    elif arg in ("-i", "-oi"):
        o.dot_ends = False
    elif arg == "-bp":
        o.mode = "list"
    elif arg.startswith("-q"):
        o.mode = "queue"
    elif arg.startswith("-o") or arg in _IGNORED or arg[:2] in _IGNORED_WITH_ARG:
        pass  # -odi, -oem, -oQ...: delivery-mode options that have no meaning here
    else:
        raise UsageError(f"unsupported option {arg}")


def default_sender() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "nobody"
    return f"{user}@{HOST}"


def read_message(stdin: BinaryIO, dot_ends: bool) -> bytes:
    """The message on stdin; without -i a line holding only "." ends it."""
    if not dot_ends:
        return stdin.read()
    lines = []
    for line in stdin:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def split_headers(message: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines) and everything after them."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        line = message[pos : len(message) if end < 0 else end + 1]
        if line.strip(b"\r\n") == b"":
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER_START.match(line):
            fields.append(line)
        else:
            break
        pos += len(line)
    return fields, message[pos:]


def prepare(o: Options, message: bytes) -> tuple[str, list[str], bytes]:
    """(sender, recipients, message) to enqueue, per the options."""
    sender = o.sender if o.sender is not None else default_sender()
    fields, rest = split_headers(message)
    recipients = list(o.recipients)
    if o.extract:
        recipients += _header_recipients(fields)
        fields = [f for f in fields if _name(f) not in (b"bcc", b"resent-bcc")]
    if not recipients:
        raise UsageError("no recipients specified")
    recipients = list(dict.fromkeys(recipients))  # the same address in To and Cc: one RCPT
    if not any(_name(f) == b"from" for f in fields):
        eol = b"\r\n" if message.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
        if not fields and rest and not rest.startswith((b"\n", b"\r\n")):
            rest = eol + rest  # no header section at all: the text is body, set apart
        author = sender if sender not in ("", "<>") else default_sender()  # a null sender writes as its user
        shown = f'"{o.full_name}" <{author}>' if o.full_name else f"<{author}>"
        fields.insert(0, f"From: {shown}".encode() + eol)
    if not rest and fields and not fields[-1].endswith(b"\n"):
        fields[-1] += b"\n"
    return sender, recipients, b"".join(fields) + rest


def _name(field_line: bytes) -> bytes:
    return field_line.split(b":", 1)[0].strip().lower()


def _header_recipients(fields: list[bytes]) -> list[str]:
    values = []
    for f in fields:
        if _name(f) in (b"to", b"cc", b"bcc"):
            text = f.split(b":", 1)[1].decode("utf-8", "replace")
            values.append(" ".join(text.split()))
    found = [addr for _, addr in getaddresses(values) if addr]
    if values and not found:
        raise DataError("no usable address in the To/Cc/Bcc headers")
    return found
