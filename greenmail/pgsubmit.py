"""``greenmail enqueue`` and ``sendmail`` into the shared queue at the cost of a spool submission.

A process per message pays for every import: psycopg and the full configuration cost about
ten times the spool's whole submission (bench/README.md). This path uses neither: the
settings come from the submission cache (confcache.py), the message gets the spool's checks
and added headers (dropoff.Envelope, dropoff.Head) in memory, and one statement through
libpq's C API (ctypes, the system's libpq.so.5: PQconnectdbParams, PQexecParams with the body
as a binary parameter, PQclear, PQfinish) stores the message row, its recipients and its chunks
in one transaction. Without libpq.so.5, for a message over IN_MEMORY bytes, or with a password
in the DSN (which the cache, readable by all, never holds), the caller takes the psycopg path.
Owns: that statement and the few libpq calls it needs (pgadmin.py uses it for every enqueue when
libpq.so.5 is there; submit.py reaches pgadmin.py from the cache, without the configuration).
Must not touch: the daemon, claims, gevent, psycopg.
"""

from __future__ import annotations

import ctypes
import os

from greenmail import layout
from greenmail.dropoff import Envelope, Head
from greenmail.errors import ConfigError, QueueUnavailable
from greenmail.pgdb import keywords

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import BinaryIO

    from greenmail.addresses import Rewriter

IN_MEMORY = 8 * 1024 * 1024  # bytes a message may have on this path (bigger: streamed by psycopg)
CONNECTION_OK, PGRES_TUPLES_OK, PG_DIAG_SQLSTATE = 0, 2, ord("C")
STORE = (  # $1 id, $2 sender, $3 size, $4 eight_bit, $5 uid, $6 recipients (one per line), $7 the message
    "WITH m AS (INSERT INTO greenmail_messages (id, sender, size, eight_bit, uid)"
    " VALUES ($1, $2, $3::bigint, $4::boolean, $5::integer) RETURNING id),"
    " r AS (INSERT INTO greenmail_recipients (message_id, position, address)"
    "  SELECT m.id, n - 1, a FROM m, unnest(string_to_array($6, E'\\n')) WITH ORDINALITY AS u(a, n)),"
    " c AS (INSERT INTO greenmail_chunks (message_id, seq, data)"
    "  SELECT m.id, i, substring($7::bytea FROM i * 65536 + 1 FOR 65536)"
    "  FROM m, generate_series(0, (length($7::bytea) - 1) / 65536) AS i)"
    " SELECT id FROM m"
)


class TooBig(Exception):
    """The message does not fit this path: ``read`` holds what was read of it."""

    def __init__(self, read: bytes) -> None:
        self.read = read


def libpq() -> ctypes.CDLL | None:
    """The system's libpq, its functions typed; None when it cannot be loaded."""
    try:
        lib = ctypes.CDLL("libpq.so.5")
    except OSError:
        return None
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.PQconnectdbParams.restype = vp
    lib.PQconnectdbParams.argtypes = [ctypes.POINTER(cp), ctypes.POINTER(cp), ctypes.c_int]
    lib.PQstatus.argtypes = [vp]
    lib.PQerrorMessage.restype, lib.PQerrorMessage.argtypes = cp, [vp]
    lib.PQexecParams.restype = vp
    lib.PQexecParams.argtypes = [
        vp, cp, ctypes.c_int, vp, ctypes.POINTER(cp), ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int), ctypes.c_int,
    ]  # fmt: skip
    lib.PQresultStatus.argtypes = [vp]
    lib.PQresultErrorMessage.restype, lib.PQresultErrorMessage.argtypes = cp, [vp]
    lib.PQresultErrorField.restype, lib.PQresultErrorField.argtypes = cp, [vp, ctypes.c_int]
    lib.PQclear.argtypes = [vp]
    lib.PQfinish.argtypes = [vp]
    return lib


def read_message(message: BinaryIO, envelope: Envelope, qid: str) -> bytes:
    """The message as stored (the added headers in front); TooBig past IN_MEMORY."""
    import io

    out = io.BytesIO()
    head = Head(out, b"", qid, envelope)
    got = []
    while chunk := message.read(65536):
        got.append(chunk)
        if head.size + len(chunk) > IN_MEMORY:
            raise TooBig(b"".join(got))
        head.write(chunk)
    head.finish()
    return out.getvalue()


def submit(
    lib: ctypes.CDLL,
    dsn: str,
    password_file: str | None,
    envelope: Envelope,
    message: BinaryIO,
) -> str:
    """Store one message; its queue id. QueueUnavailable (try later), ConfigError (no schema), TooBig."""
    qid = layout.new_id()
    body = read_message(message, envelope, qid)
    keys = {"dbname": dsn, **keywords(password_file, "greenmail command")}  # dbname: may be a DSN
    names = (ctypes.c_char_p * (len(keys) + 1))(*[k.encode() for k in keys], None)
    values = (ctypes.c_char_p * (len(keys) + 1))(*[v.encode() for v in keys.values()], None)
    conn = lib.PQconnectdbParams(names, values, 1)  # 1: dbname may be a connection string
    try:
        if lib.PQstatus(conn) != CONNECTION_OK:
            why = (lib.PQerrorMessage(conn) or b"").decode(errors="replace").strip().splitlines()
            raise QueueUnavailable(f"PostgreSQL is unavailable: {why[0] if why else 'cannot connect'}")
        return _store(lib, conn, qid, envelope, body)
    finally:
        lib.PQfinish(conn)


class Prefixed:
    """A message stream whose first bytes were read already (``TooBig``): those, then the rest."""

    def __init__(self, first: bytes, rest: BinaryIO) -> None:
        self.first, self.rest = first, rest

    def read(self, n: int = -1) -> bytes:
        if self.first:
            out, self.first = (
                (self.first, b"") if n < 0 or n >= len(self.first) else (self.first[:n], self.first[n:])
            )
            return out
        return self.rest.read(n)


def _store(lib: ctypes.CDLL, conn: int, qid: str, envelope: Envelope, body: bytes) -> str:
    uid = os.getuid()
    text = [qid, envelope.sender, str(len(body)), "t" if not body.isascii() else "f", str(uid)]
    params = [p.encode() for p in text] + ["\n".join(envelope.recipients).encode(), body]
    values = (ctypes.c_char_p * 7)(*params)
    lengths = (ctypes.c_int * 7)(*[len(p) for p in params])
    formats = (ctypes.c_int * 7)(0, 0, 0, 0, 0, 0, 1)  # the message as binary: no escaping
    res = lib.PQexecParams(conn, STORE.encode(), 7, None, values, lengths, formats, 0)
    try:
        if lib.PQresultStatus(res) != PGRES_TUPLES_OK:
            state = (lib.PQresultErrorField(res, PG_DIAG_SQLSTATE) or b"").decode()
            why = (lib.PQresultErrorMessage(res) or b"").decode(errors="replace").strip().splitlines()
            first = why[0] if why else "the statement failed"
            if state in ("42P01", "42703", "42883"):  # undefined table, column, function: the schema
                raise ConfigError(f"the queue's schema does not fit ({first}): run `greenmail queue init`")
            raise QueueUnavailable(f"PostgreSQL refused the message: {first}")
        return qid
    finally:
        lib.PQclear(res)


class Submitter:
    """QueueAdmin.enqueue for one message: through libpq when it can, else ``fallback`` (psycopg:
    pgadmin.PgAdmin, made when needed), which also takes what is too big to hold in memory."""

    def __init__(
        self,
        dsn: str,
        password_file: str | None,
        rewriter: Rewriter | None,
        fallback: Callable[[str, Sequence[str], BinaryIO], str] | None = None,
    ) -> None:
        self.dsn, self.password_file, self.rewriter = dsn, password_file, rewriter
        self.fallback = fallback

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        stream: BinaryIO
        if isinstance(message, bytes | bytearray | memoryview):
            import io

            stream = io.BytesIO(bytes(message))
        else:
            stream = message
        lib = libpq()
        if lib is not None:
            try:
                return submit(
                    lib, self.dsn, self.password_file, Envelope(sender, recipients, self.rewriter), stream
                )
            except TooBig as e:
                stream = Prefixed(e.read, stream)  # type: ignore[assignment]
        return self._fallback()(sender, recipients, stream)

    def _fallback(self) -> Callable[[str, Sequence[str], BinaryIO], str]:
        if self.fallback is None:
            from pathlib import Path

            from greenmail.pgadmin import PgAdmin

            pf = Path(self.password_file) if self.password_file else None
            self.fallback = PgAdmin(self.dsn, pf, self.rewriter).enqueue_stream
        return self.fallback
