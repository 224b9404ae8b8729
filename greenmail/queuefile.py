"""The queue file format and the names files carry in the spool.

Owns: a queue file's envelope lines (line 1 sender, line 2 recipients), the
file-name grammar ``ID`` / ``ID,ATTEMPTS,NEXT`` (``@OWNER`` while claimed),
where ID is one of
greenmail's own ids (layout.py): any other name in outgoing/ was dropped in
from outside and is given an id first. The delivery state kept beside the
message (meta/ID.json) is queue.State.
Must not touch: directories and renames (spool.py), sockets, gevent.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from greenmail import address
from greenmail.errors import AddressError, CorruptQueueFile
from greenmail.layout import HOST as HOST
from greenmail.layout import MAX_ENVELOPE
from greenmail.layout import format_name as format_name
from greenmail.layout import id_time as id_time
from greenmail.layout import new_id as new_id
from greenmail.queue import State as State

_NAME = re.compile(r"(?P<id>[0-9A-F]{24})(?:,(?P<a>\d{1,9}),(?P<n>\d{1,12}))?")


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


def share(qid: str, processes: int) -> int:
    """Which of ``processes`` delivery processes sends the message ``qid`` (the same in every one)."""
    return zlib.crc32(qid.encode()) % processes if processes > 1 else 0


def name_id(name: str) -> str:
    """The queue id in a spool file name (``ID``, ``ID,ATTEMPTS,NEXT``, either ``@OWNER``)."""
    return name.partition("@")[0].partition(",")[0]


def parse_name(name: str) -> Entry | None:
    """The Entry a file name in outgoing/ (or failed/, hold/) stands for; None if not one of ours."""
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
