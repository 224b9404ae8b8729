"""Limits for the whole cluster on the shared queue: the relay's message rate, the connections.

Owns: ``SharedRate``, a drop-in for shaping.RateLimiter whose slots come from a row of
greenmail_limits (the generic cell rate algorithm: the row holds the theoretical arrival time of
the next message; each send moves it on by 1/rate in one short statement and waits until its
slot), so ``relay.rate_limit`` is a total over every node and delivery process; and
``SharedSlots``, the connections a node may have open under ``delivery.cluster_max_connections``
(one row per node, granted under an advisory lock, a lease its heartbeat renews). While
PostgreSQL cannot be reached a process paces itself at the full rate locally (logged once) and
keeps the connections it was granted, opening no more.
Must not touch: claims and settlements (pgqueue.py), SMTP.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent

from greenmail.errors import GreenmailError
from greenmail.pgschema import SLOTS_LOCK
from greenmail.shaping import RateLimiter

log = logging.getLogger("greenmail.shaping")

NOW = "extract(epoch FROM clock_timestamp())"
NEXT_SLOT = (  # the row moved on by one message; returns how long until this message's slot
    f"INSERT INTO greenmail_limits AS l (name, tat) VALUES (%(name)s, {NOW} + %(t)s)"
    f" ON CONFLICT (name) DO UPDATE SET tat = greatest(l.tat, {NOW}) + %(t)s"
    f" RETURNING l.tat - %(t)s - {NOW}"
)


class SharedRate:
    """At most ``rate`` messages per second over all sessions of all nodes (0 = no limit)."""

    def __init__(self, pool: Any, rate: float, name: str = "relay") -> None:
        self.pool = pool
        self.rate = rate
        self.name = name
        self._local = RateLimiter(rate)
        self._alone = False  # pacing locally while PostgreSQL is away

    def wait(self) -> None:
        if not self.rate:
            return
        try:
            with self.pool.connection() as conn:
                (delay,) = conn.execute(NEXT_SLOT, {"name": self.name, "t": 1.0 / self.rate}).fetchone()
        except GreenmailError as e:
            if not self._alone:
                log.warning("the cluster's rate limit is unavailable (%s): this process paces itself", e)
                self._alone = True
            self._local.rate = self.rate
            self._local.wait()
            return
        if self._alone:
            log.info("the cluster's rate limit is back")
            self._alone = False
        if delay > 0:
            gevent.sleep(delay)


class SharedSlots:
    """How many connections this node may have open: its share of ``limit`` for the cluster."""

    def __init__(self, pool: Any, node: str, limit: int, lease: float) -> None:
        self.pool = pool
        self.node = node
        self.limit = limit
        self.lease = lease
        self.held = 0

    def grant(self, want: int) -> int:
        """Ask for ``want`` connections in all (fewer gives the rest back); how many this node has now."""
        if want == self.held:
            return self.held
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SLOTS_LOCK,))
                conn.execute("DELETE FROM greenmail_slots WHERE until < clock_timestamp()")
                (others,) = conn.execute(
                    "SELECT coalesce(sum(n), 0) FROM greenmail_slots WHERE node <> %s", (self.node,)
                ).fetchone()
                n = max(0, min(want, self.limit - int(others)))
                conn.execute(
                    "INSERT INTO greenmail_slots (node, n, until)"
                    " VALUES (%s, %s, clock_timestamp() + %s * interval '1 second')"
                    " ON CONFLICT (node) DO UPDATE SET n = excluded.n, until = excluded.until",
                    (self.node, n, self.lease),
                )
        except GreenmailError as e:
            log.warning("the cluster's connection slots are unavailable (%s): no new connections", e)
            return min(self.held, want)
        self.held = n
        return n
