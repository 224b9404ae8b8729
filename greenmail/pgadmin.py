"""The shared queue for enqueue and the operator's commands (queue.QueueAdmin on PostgreSQL).

Owns: ``greenmail enqueue``/``sendmail`` into the shared queue, and `queue
list|show|delete|hold|release|retry` as short SQL statements on one
connection, each safe while any number of nodes deliver (a message a node
has claimed is never changed underneath it: MessageBusy), and the NOTIFY
that wakes the nodes. Blocking calls: commands, not the daemon's hub.
Must not touch: claims and leases (pgqueue.py), files of the spool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from greenmail import pgdb, pgschema
from greenmail.addresses import Rewriter
from greenmail.errors import MessageBusy, NotFound, QueueUnavailable
from greenmail.pgstore import MESSAGE_COLUMNS, PgIncoming, info, open_body
from greenmail.queue import Message, MessageInfo, relay_waiting

ALIVE = 120  # seconds since a node's last heartbeat for it to count as running (wake())


class PgAdmin:
    """QueueAdmin on one PostgreSQL connection (opened on first use)."""

    where = "postgresql"

    def __init__(self, dsn: str, password_file: Path | None = None, rewriter: Rewriter | None = None) -> None:
        self.dsn = dsn
        self.password_file = password_file
        self.rewriter = rewriter
        self._conn: Any = None
        self._checked = False

    @contextlib.contextmanager
    def connection(self, check: bool = True) -> Iterator[Any]:
        """The command's connection; a lost connection is QueueUnavailable (and is opened again next time).

        ``check``: ConfigError unless the schema is this greenmail's version (checked once per connection).
        """
        if self._conn is None or self._conn.closed:
            self._conn = pgdb.connect(self.dsn, self.password_file, "greenmail command")
            self._checked = False
        pg = pgdb.psycopg(False)
        try:
            if check and not self._checked:
                pgschema.check(self._conn)
                self._checked = True
            yield self._conn
        except pg.OperationalError as e:
            self.close()
            raise QueueUnavailable(f"PostgreSQL is unavailable: {pgdb.first_line(e)}") from None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def init(self) -> tuple[int, int]:
        with self.connection(check=False) as conn:
            return pgschema.init(conn)

    # -- enqueue -----------------------------------------------------------------------

    def incoming(self, sender: str, recipients: Sequence[str], trace: Any = None) -> PgIncoming:
        return PgIncoming(self.connection, sender, recipients, trace, self.rewriter, os.getuid())

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        """One message: through libpq alone when it can (pgsubmit.py: no psycopg to import), else psycopg."""
        if self._conn is not None:  # a connection is open already: use it
            return self.enqueue_stream(sender, recipients, message)
        from greenmail.pgsubmit import Submitter

        pf = str(self.password_file) if self.password_file else None
        return Submitter(self.dsn, pf, self.rewriter, self.enqueue_stream).enqueue(
            sender, recipients, message
        )

    def enqueue_stream(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        """One message through psycopg, read in chunks."""
        return self.enqueue_many([(sender, recipients, message)])[0]

    def enqueue_many(self, messages: Iterable[Message]) -> list[str]:
        """Every message stored, or none (one transaction)."""
        written = []
        for sender, recipients, message in messages:
            incoming = self.incoming(sender, recipients)
            try:
                if isinstance(message, bytes | bytearray | memoryview):
                    incoming.write(bytes(message))
                else:
                    while chunk := message.read(65536):
                        incoming.write(chunk)
            except BaseException:
                incoming.abort()
                raise
            written.append(incoming)
        with self.connection() as conn, conn.transaction():
            for incoming in written:
                incoming.connect = _same(conn)
                incoming.commit()
        return [i.id for i in written]

    # -- listing -------------------------------------------------------------------------

    def list(self) -> list[MessageInfo]:
        with self.connection() as conn:
            waiting = _waiting(conn)
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM greenmail_messages m ORDER BY m.queued_at, m.id"
            )
            return [info(r, waiting) for r in rows.fetchall()]

    def show(self, qid: str) -> tuple[MessageInfo, BinaryIO]:
        with self.connection() as conn:
            row = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM greenmail_messages m WHERE m.id = %s", (qid,))
            found = row.fetchone()
        if found is None:
            raise NotFound(f"{qid}: no such message in the queue")
        return info(found), open_body(self.connection, qid, found[2])

    # -- changes ---------------------------------------------------------------------------

    def _status(self, conn: Any, qid: str) -> str:
        row = conn.execute(
            "SELECT status FROM greenmail_messages WHERE id = %s FOR UPDATE", (qid,)
        ).fetchone()
        if row is None:
            raise NotFound(f"{qid}: no such message in the queue")
        if row[0] == "active":
            raise MessageBusy(f"{qid}: being delivered right now; try again when the attempt is over")
        return str(row[0])

    def delete(self, qid: str) -> None:
        with self.connection() as conn, conn.transaction():
            self._status(conn, qid)
            conn.execute("DELETE FROM greenmail_messages WHERE id = %s", (qid,))

    def delete_failed(self) -> int:
        with self.connection() as conn:
            return conn.execute("DELETE FROM greenmail_messages WHERE status = 'failed'").rowcount

    def hold(self, qid: str) -> bool:
        with self.connection() as conn, conn.transaction():
            status = self._status(conn, qid)
            if status == "held":
                return False
            if status == "failed":
                raise MessageBusy(f"{qid}: is failed")
            conn.execute("UPDATE greenmail_messages SET status = 'held' WHERE id = %s", (qid,))
            return True

    def release_hold(self, qid: str) -> bool:
        with self.connection() as conn, conn.transaction():
            if self._status(conn, qid) != "held":
                return False
            conn.execute("UPDATE greenmail_messages SET status = 'queued' WHERE id = %s", (qid,))
            conn.execute("SELECT pg_notify(%s, '')", (pgschema.CHANNEL,))
            return True

    def retry(self, qid: str) -> bool:
        """Due now (False: it was due already); a failed message goes back for its failed recipients."""
        with self.connection() as conn, conn.transaction():
            status = self._status(conn, qid)
            if status == "held":
                raise MessageBusy(f"{qid}: is on hold; release it first")
            if status == "failed":
                conn.execute(
                    "UPDATE greenmail_recipients SET state = 'pending', bounced = false"
                    " WHERE message_id = %s AND state = 'failed'",
                    (qid,),
                )
            changed = conn.execute(
                "UPDATE greenmail_messages SET status = 'queued', next_attempt = '-infinity'"
                " WHERE id = %s AND (status = 'failed' OR next_attempt > clock_timestamp())",
                (qid,),
            ).rowcount
            return bool(changed)

    def retry_all(self) -> int:
        with self.connection() as conn:
            return conn.execute(
                "UPDATE greenmail_messages SET next_attempt = '-infinity'"
                " WHERE status = 'queued' AND next_attempt > clock_timestamp()"
            ).rowcount

    def wake(self) -> bool:
        """Running nodes look at the queue now (an outage forgotten); whether any node runs."""
        with self.connection() as conn:
            conn.execute("SELECT pg_notify(%s, 'wake')", (pgschema.CHANNEL,))
            row = conn.execute(
                "SELECT count(*) FROM greenmail_nodes"
                " WHERE seen > clock_timestamp() - %s * interval '1 second'",
                (ALIVE,),
            ).fetchone()
            return bool(row[0])


def _same(conn: Any) -> Any:
    """A connect() that hands out ``conn`` itself (several messages in the caller's one transaction)."""

    @contextlib.contextmanager
    def connect() -> Iterator[Any]:
        yield conn

    return connect


def _waiting(conn: Any) -> str | None:
    """Why due messages wait, when a node that ran lately cannot reach the relay."""
    row = conn.execute(
        "SELECT extract(epoch FROM outage_since)::float8, outage FROM greenmail_nodes"
        " WHERE outage_since IS NOT NULL AND seen > clock_timestamp() - %s * interval '1 second'"
        " ORDER BY outage_since LIMIT 1",
        (ALIVE,),
    ).fetchone()
    return relay_waiting(row[0], row[1]) if row else None
