"""The shared queue's rows: a new message written in, a message's body read out, its state.

Owns: ``PgIncoming`` (a message fed chunk by chunk through a bounded buffer,
with the spool's checks and added headers (dropoff.py), then written with its
envelope in one transaction: COPY of 64 KiB chunks, so nothing is half-written
and memory stays bounded), ``ChunkReader`` (a body read back a chunk at a
time), and the ``State`` / ``MessageInfo`` a message's rows make.
Must not touch: claims and leases (pgqueue.py), the operator's commands (pgadmin.py), gevent.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from greenmail import layout
from greenmail.addresses import Rewriter
from greenmail.dropoff import Envelope, Head
from greenmail.queue import MessageInfo, State, iso_time

CHUNK = 64 * 1024  # bytes per row of greenmail_chunks
IN_MEMORY = 1024 * 1024  # a message being written stays in memory up to this size, then in a temp file
Connect = Callable[[], AbstractContextManager[Any]]  # a connection for the duration of a with block

MESSAGE_COLUMNS = (
    "m.id, m.sender, m.size, m.eight_bit, extract(epoch FROM m.queued_at)::float8, m.status,"
    " m.attempts, CASE WHEN m.next_attempt = '-infinity' THEN 0 ELSE"
    " extract(epoch FROM m.next_attempt)::float8 END, m.last_error, m.warned, m.uid,"
    " (SELECT coalesce(json_agg(json_build_array(r.address, r.state, r.reply, r.bounced)"
    " ORDER BY r.position), '[]') FROM greenmail_recipients r WHERE r.message_id = m.id)"
)


class PgIncoming:
    """One message being written; ``commit`` stores it durably (one transaction), ``abort`` forgets it."""

    def __init__(
        self,
        connect: Connect,
        sender: str,
        recipients: Sequence[str],
        trace: Callable[[str], bytes] | None = None,
        rewriter: Rewriter | None = None,
        uid: int | None = None,
        source: str = "local",
    ) -> None:
        self.connect = connect
        self.uid = uid  # the submitting user (a command's), for the queue-entry log line
        self.source = source  # "smtp": the listener's (counted as received when it took it)
        env = Envelope(sender, recipients, rewriter)
        self.sender, self.recipients = env.sender, env.recipients
        self.id = layout.new_id()
        self._file = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY)  # noqa: SIM115 - closed by commit/abort
        self._body = Head(self._file, trace(self.id) if trace is not None else b"", self.id, env)
        self.write = self._body.write

    def commit(self) -> str:
        """The message and its envelope, stored in one transaction; the queue id. A failure leaves nothing."""
        try:
            self._body.finish()
            size = self._file.tell()
            self._file.seek(0)
            with self.connect() as conn, conn.transaction():
                store(
                    conn,
                    self.id,
                    self.sender,
                    self.recipients,
                    self._file,
                    size,
                    self._body.eight_bit,
                    self.uid,
                    self.source,
                )
        finally:
            self._file.close()
        return self.id

    def abort(self) -> None:
        self._file.close()


def store(
    conn: Any,
    qid: str,
    sender: str,
    recipients: list[str],
    body: Any,
    size: int,
    eight_bit: bool,
    uid: int | None = None,
    source: str = "local",
) -> None:
    """Insert one message's rows (inside the caller's transaction); ``body`` is read in chunks."""
    conn.execute(
        "INSERT INTO greenmail_messages (id, sender, size, eight_bit, uid, source)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (qid, sender, size, eight_bit, uid, source),
    )
    conn.execute(
        "INSERT INTO greenmail_recipients (message_id, position, address)"
        " SELECT %s, n - 1, r FROM unnest(%s::text[]) WITH ORDINALITY AS u(r, n)",
        (qid, recipients),
    )
    with conn.cursor().copy("COPY greenmail_chunks (message_id, seq, data) FROM STDIN") as copy:
        seq = 0
        while chunk := body.read(CHUNK):
            copy.write_row((qid, seq, chunk))
            seq += 1


class ChunkReader(io.RawIOBase):
    """A stored message's body, fetched one chunk (one short query) at a time."""

    def __init__(self, connect: Connect, qid: str, size: int, first: bytes | None = None) -> None:
        self.connect = connect
        self.qid = qid
        self._left = size  # bytes not yet fetched: no query once the whole message came
        self._seq = 0
        self._pending = b""
        if first is not None:
            self._pending, self._seq, self._left = first, 1, size - len(first)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending and self._left > 0:
            with self.connect() as conn:
                row = conn.execute(
                    "SELECT data FROM greenmail_chunks WHERE message_id = %s AND seq = %s",
                    (self.qid, self._seq),
                    binary=True,
                ).fetchone()
            if row is None:
                return 0
            self._pending, self._seq = bytes(row[0]), self._seq + 1
            self._left -= len(self._pending)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def open_body(connect: Connect, qid: str, size: int, first: bytes | None = None) -> io.BufferedReader:
    return io.BufferedReader(ChunkReader(connect, qid, size, first), CHUNK)


def state_of(rows: list[list[Any]], last_error: str | None, warned: bool, uid: int | None) -> State:
    """The delivery State of a message's recipient rows ([address, state, reply, bounced], in order)."""
    return State(
        recipients={a: s for a, s, _, _ in rows if s != "pending"},
        last_error=last_error,
        errors={a: r for a, _, r, _ in rows if r is not None},
        bounced=[a for a, _, _, b in rows if b],
        warned=warned,
        uid=uid,
    )


def info(row: Sequence[Any], waiting: str | None = None) -> MessageInfo:
    """A MessageInfo from a row of MESSAGE_COLUMNS."""
    qid, sender, size, _, queued_at, status, attempts, next_at, last_error, _, _, rcpts = row
    kind = ("deferred" if attempts else "queued") if status == "queued" else status
    return MessageInfo(
        id=qid,
        state=kind,
        sender=sender,
        recipients=[r[0] for r in rcpts],
        size=size,
        attempts=attempts,
        queued_at=iso_time(queued_at),
        next_attempt=iso_time(next_at) if next_at and status == "queued" else None,
        last_error=last_error,
        recipient_states={r[0]: r[1] for r in rcpts},
        waiting=waiting if status == "queued" else None,
    )
