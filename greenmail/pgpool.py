"""Connections to the shared queue for the daemon's greenlets: a small pool that cooperates with gevent.

Owns: handing each greenlet a connection of its own for one ``with`` block (a
psycopg connection serialises its users with a thread lock, which would block
the hub if two greenlets shared one), opening them lazily up to a bound,
dropping broken ones, and a deadline on every use, so that a database that
stops answering is QueueUnavailable, never a hang. psycopg_pool is not used:
its workers are threads, which the daemon does not patch.
Must not touch: the schema and the queue's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gevent
from gevent.lock import BoundedSemaphore

from greenmail import pgdb
from greenmail.errors import QueueUnavailable

USE_TIMEOUT = (
    pgdb.STATEMENT_TIMEOUT / 1000 + 15
)  # seconds one with block may take (a statement, and then some)


class Pool:
    def __init__(
        self,
        dsn: str,
        password_file: Path | None,
        size: int,
        application: str,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.settings = settings  # of every connection's session
        self.password_file = password_file
        self.application = application
        self._slots = BoundedSemaphore(size)
        self._idle: list[Any] = []
        self.pg = pgdb.psycopg(cooperative=True)

    def open(self) -> Any:
        """A new connection of its own (the caller closes it)."""
        return pgdb.connect(self.dsn, self.password_file, self.application, True, self.settings)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A connection for this block; OperationalError and a deadline become QueueUnavailable."""
        if not self._slots.acquire(timeout=USE_TIMEOUT):
            raise QueueUnavailable("no connection to PostgreSQL is free")
        conn = None
        timeout = gevent.Timeout(USE_TIMEOUT)
        timeout.start()
        try:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self.open()
            yield conn
        except gevent.Timeout as t:
            if t is not timeout:
                raise
            self._discard(conn)
            conn = None
            raise QueueUnavailable(f"PostgreSQL did not answer within {USE_TIMEOUT:g}s") from None
        except self.pg.OperationalError as e:
            self._discard(conn)
            conn = None
            raise QueueUnavailable(f"PostgreSQL is unavailable: {pgdb.first_line(e)}") from None
        finally:
            timeout.close()
            if conn is not None:
                if not conn.closed and conn.info.transaction_status == self.pg.pq.TransactionStatus.IDLE:
                    self._idle.append(conn)
                else:
                    self._discard(conn)
            self._slots.release()

    def _discard(self, conn: Any) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        while self._idle:
            self._discard(self._idle.pop())
