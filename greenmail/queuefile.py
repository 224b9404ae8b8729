"""The queue file format and the names files carry in the spool.

Owns: a queue file's envelope lines (line 1 sender, line 2 recipients),
the file-name grammar ``ID`` / ``ID,ATTEMPTS,NEXT`` (+ ``@OWNER`` while
claimed), the delivery state kept beside the message (meta/ID.json), and the
Date:/Message-ID: headers enqueue adds.
Must not touch: directories and renames (spool.py), sockets, gevent.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from greenmail import address
from greenmail.errors import AddressError, CorruptQueueFile

MAX_ENVELOPE = 1024 * 1024  # the two envelope lines together
MAX_HEADER_SCAN = 256 * 1024  # how far enqueue looks for Date:/Message-ID:

_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})(?:,(?P<a>\d{1,9}),(?P<n>\d{1,12}))?")
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")
HOST = re.sub(r"[^A-Za-z0-9.-]", "-", os.uname().nodename) or "localhost"


def rfc5322_date(when: float | None = None) -> str:
    """The local time as an RFC 5322 date (without importing the email package: enqueue starts fast)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(when))


def new_id() -> str:
    """A fresh queue id: enqueue time in microseconds, pid and randomness, in hex."""
    return f"{time.time_ns() // 1000:013X}{os.getpid() & 0xFFFFF:05X}{os.urandom(3).hex().upper()}"


_OWN_ID = re.compile(r"[0-9A-F]{24}")


def id_time(qid: str) -> float | None:
    """The enqueue time written into one of our own ids; None for others."""
    return int(qid[:13], 16) / 1e6 if _OWN_ID.fullmatch(qid) else None


@dataclass(frozen=True, slots=True)
class Entry:
    """A message waiting in outgoing/ as its file name describes it."""

    name: str
    id: str
    attempts: int = 0
    next_at: int = 0  # epoch seconds; 0 = due now

    def due(self, now: float) -> bool:
        return self.next_at <= now

    def renamed(self, attempts: int, next_at: int) -> Entry:
        return Entry(format_name(self.id, attempts, next_at), self.id, attempts, next_at)


def format_name(qid: str, attempts: int, next_at: int) -> str:
    return f"{qid},{attempts},{next_at}" if attempts or next_at else qid


def parse_name(name: str) -> Entry | None:
    """The Entry a file name in outgoing/ (or failed/) stands for; None if foreign."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    return Entry(name, m.group("id"), int(m.group("a") or 0), int(m.group("n") or 0))


@dataclass(frozen=True)
class Envelope:
    sender: str  # "" is the null sender
    recipients: tuple[str, ...]
    body_offset: int  # where the message starts in the file


def read_envelope(f: BinaryIO) -> Envelope:
    """Parse the two envelope lines at the start of an open queue file."""
    lines: list[bytes] = []
    offset = 0
    while len(lines) < 2:
        line = f.readline(MAX_ENVELOPE - offset + 1)
        offset += len(line)
        if offset > MAX_ENVELOPE:
            raise CorruptQueueFile("envelope lines longer than 1 MiB")
        if not line.endswith(b"\n"):
            raise CorruptQueueFile("file ends inside the envelope lines")
        lines.append(line.rstrip(b"\r\n"))
    try:
        sender = address.lenient(lines[0].decode("utf-8"), null_ok=True)
        rcpts = tuple(address.lenient(r) for r in lines[1].decode("utf-8").split(","))
    except UnicodeDecodeError:
        raise CorruptQueueFile("envelope is not UTF-8") from None
    except AddressError as e:
        raise CorruptQueueFile(f"bad envelope: {e}") from None
    if not f.read(1):
        raise CorruptQueueFile("empty message")
    return Envelope(sender, rcpts, offset)


def envelope_lines(sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    return f"{sender}\n{','.join(recipients)}\n".encode()


def added_headers(head: bytes, qid: str) -> bytes:
    """Date:/Message-ID: lines for a message starting with ``head``, where missing.

    ``head`` is the first bytes of the message (its header block, or as much
    of it as was read). When the message does not start with a header line,
    the result ends with a blank line so that the added headers stand apart.
    """
    eol = b"\r\n" if head.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    if _HEADER_LINE.match(head):
        end = re.search(rb"\r?\n\r?\n", head)
        block = b"\n" + (head[: end.start()] if end else head)
    else:
        block = b""  # no header section: whatever looks like one is body
    lines = []
    if not re.search(rb"\ndate:", block, re.IGNORECASE):
        lines.append(b"Date: " + rfc5322_date().encode())
    if not re.search(rb"\nmessage-id:", block, re.IGNORECASE):
        lines.append(f"Message-ID: <{qid}@{HOST}>".encode())
    if not lines:
        return b""
    out = eol.join(lines) + eol
    if not _HEADER_LINE.match(head) and not head.startswith((b"\n", b"\r\n")):
        out += eol  # the message starts with body text: keep it apart from the headers
    return out


@dataclass
class State:
    """Delivery state of one message, kept in meta/ID.json beside it.

    ``recipients`` records the recipients that are settled for good
    ("delivered" or "failed"); any other recipient is still to be tried.
    ``bounced`` lists the failed recipients the sender was already told
    about; ``warned`` is set once a "still trying" notice went out.
    """

    recipients: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    errors: dict[str, str] = field(default_factory=dict)
    bounced: list[str] = field(default_factory=list)
    warned: bool = False

    def pending(self, envelope: Envelope) -> tuple[str, ...]:
        return tuple(r for r in envelope.recipients if r not in self.recipients)

    def unreported_failures(self) -> list[str]:
        return [r for r, s in self.recipients.items() if s == "failed" and r not in self.bounced]

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> State:
        try:
            raw = json.loads(data)
            return cls(
                dict(raw.get("recipients", {})),
                raw.get("last_error"),
                dict(raw.get("errors", {})),
                list(raw.get("bounced", [])),
                bool(raw.get("warned", False)),
            )
        except (ValueError, AttributeError, TypeError):
            raise CorruptQueueFile("unreadable delivery state") from None
