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
import os
import pwd
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import BinaryIO

from greenmail.errors import GreenmailError
from greenmail.queuefile import HOST


class UsageError(GreenmailError):
    """A sendmail command line we cannot honour."""


class DataError(GreenmailError):
    """The message itself is unusable (e.g. an unparseable recipient header)."""


_WITH_ARG = frozenset("ABCFLNOR VXbefhopr".replace(" ", ""))  # letters that take a value, glued or next
_IGNORED_WITH_ARG = frozenset("ABLNORVXehp")  # accepted and ignored (-B8BITMIME, -N never, -V envid...)
_IGNORED = frozenset("mnvGUc")  # flags accepted and ignored (-v, -m, -U, -G, ...)
_MODES = {"m": "send", "p": "list", "s": "smtp", "v": "verify", "i": "aliases"}
_HEADER_START = re.compile(rb"([!-9;-~]+):")


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    extract: bool = False
    dot_ends: bool = True
    mode: str = "send"  # send | list | queue | smtp | verify | aliases
    config: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse(argv: list[str]) -> Options:
    """sendmail(8)'s command line with getopt's rules: bundled flags (-ti), values glued (-fme@x)
    or next (-f me@x), options and recipients in any order, ``--`` ends the options; UsageError
    for what we do not support (the accepted-and-ignored set never fails a caller)."""
    o = Options()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            o.recipients.extend(args)
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name != "--config":
                raise UsageError(f"unsupported option {arg}")
            o.config = value if eq else _value(args, name)
        elif not arg.startswith("-") or arg == "-":
            o.recipients.append(arg)
        else:
            _letters(o, arg, args)
    return o


def _value(args: Iterator[str], opt: str) -> str:
    value = next(args, None)
    if value is None:
        raise UsageError(f"option {opt} needs an argument")
    return value


def _letters(o: Options, arg: str, args: Iterator[str]) -> None:
    """One word of bundled option letters, e.g. -ti, -oem, -tfme@x.org, -q30m."""
    for i, letter in enumerate(arg[1:], 1):
        if letter == "q":  # -q, -q30m, -qR...: its value only ever glued
            o.mode = "queue"
            return
        if letter in _WITH_ARG:
            _set(o, letter, arg[i + 1 :] or _value(args, f"-{letter}"))
            return
        _flag(o, letter, arg)


def _set(o: Options, letter: str, value: str) -> None:
    if letter in "fr":
        o.sender = value
    elif letter == "F":
        o.full_name = value
    elif letter == "C":
        o.config = value
    elif letter == "o":
        if value == "i":
            o.dot_ends = False  # -oi; every other -o (-oem, -odb, -oQ/dir...) means nothing here
    elif letter == "b":
        if value in ("d", "D"):
            raise UsageError(f"-b{value}: greenmail does not receive mail this way; run 'greenmail run'")
        if value not in _MODES:
            raise UsageError(f"unsupported option -b{value}")
        o.mode = _MODES[value]


def _flag(o: Options, letter: str, arg: str) -> None:
    if letter == "t":
        o.extract = True
    elif letter == "i":
        o.dot_ends = False
    elif letter == "I":
        o.mode = "aliases"  # -I: as newaliases
    elif letter not in _IGNORED:
        raise UsageError(f"unsupported option -{letter}" + (f" (in {arg})" if len(arg) > 2 else ""))


def login_name() -> str:
    """The invoking user's login name (the sender without -f, as sendmail(8) has it)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        try:
            return getpass.getuser()
        except (KeyError, OSError):
            return "nobody"


def default_sender(origin: str = HOST) -> str:
    return f"{login_name()}@{origin}"


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


def prepare(o: Options, message: bytes, origin: str = HOST) -> tuple[str, list[str], bytes]:
    """(sender, recipients, message) to enqueue, per the options; ``origin`` qualifies bare names."""
    sender = o.sender if o.sender is not None else default_sender(origin)
    if sender not in ("", "<>") and "@" not in sender:
        sender = f"{sender}@{origin}"
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
        author = (
            sender if sender not in ("", "<>") else default_sender(origin)
        )  # a null sender writes as its user
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
