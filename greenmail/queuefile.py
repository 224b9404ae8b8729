"""The queue file format and the names files carry in the spool.

Owns: a queue file's envelope lines (line 1 sender, line 2 recipients),
the file-name grammar ``ID`` / ``ID,ATTEMPTS,NEXT`` (+ ``@OWNER`` while
claimed), the delivery state kept beside the message (meta/ID.json). What a
new file starts with (queue ids, envelope lines, the Date:/Message-ID:
headers enqueue adds) is written by dropoff.py, light for ``greenmail
enqueue``; it is re-exported here.
Must not touch: directories and renames (spool.py), sockets, gevent.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from greenmail import address, dropoff
from greenmail.dropoff import HOST as HOST
from greenmail.dropoff import added_headers as added_headers
from greenmail.dropoff import envelope_lines as envelope_lines
from greenmail.dropoff import new_id as new_id
from greenmail.dropoff import rfc5322_date as rfc5322_date
from greenmail.errors import AddressError, CorruptQueueFile

MAX_ENVELOPE = 1024 * 1024  # the two envelope lines together
MAX_HEADER_SCAN = dropoff.HEAD  # how far enqueue looks for Date:/Message-ID:

_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127})(?:,(?P<a>\d{1,9}),(?P<n>\d{1,12}))?")

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


def share(qid: str, processes: int) -> int:
    """Which of ``processes`` delivery processes sends the message ``qid`` (the same in every one)."""
    return zlib.crc32(qid.encode()) % processes if processes > 1 else 0


def name_id(name: str) -> str:
    """The queue id in a spool file name (``ID``, ``ID,ATTEMPTS,NEXT``, either ``@OWNER``)."""
    return name.partition("@")[0].partition(",")[0]


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
