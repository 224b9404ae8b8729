"""Settling claims on the shared queue: what one attempt did, written fenced by the claim's lease.

Owns: a message back in the queue or failed (its row and its recipients' rows in one
statement, so one round trip and one commit), delivered messages removed in batches (those
settled within GATHER seconds share one DELETE and one commit, as the spool shares an fsync),
the fence (a write whose lease token no longer matches changes nothing and is logged as a
possible duplicate), and the settlements PostgreSQL could not take, kept and written later.
A delivered message waits at most GATHER seconds for its commit: a node killed in between
sends it again (the guarantee's one exception: a node dies between the relay's 250 and the commit).
Must not touch: claiming, leases' renewal (pgqueue.py), SMTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent

from greenmail.errors import GreenmailError

log = logging.getLogger("greenmail.queue")
GATHER = 0.01  # seconds delivered messages wait to share one DELETE

REQUEUE = (
    "WITH m AS (UPDATE greenmail_messages SET status = %(status)s, attempts = attempts + %(attempt)s,"
    " next_attempt = CASE WHEN %(next)s::float8 > 0 THEN to_timestamp(%(next)s) ELSE '-infinity' END,"
    " last_error = %(error)s, warned = %(warned)s, lease_owner = NULL, lease_until = NULL, lease_token = NULL"
    " WHERE id = %(id)s AND lease_token = %(token)s RETURNING id)"
    " UPDATE greenmail_recipients r SET state = v.state, reply = v.reply, bounced = v.bounced"
    " FROM m, unnest(%(rcpts)s::text[], %(states)s::text[], %(replies)s::text[], %(bounced)s::boolean[])"
    " AS v(address, state, reply, bounced) WHERE r.message_id = m.id AND r.address = v.address"
)  # every message has a recipient: no row updated means the fence held it back
RETIRE = (
    "DELETE FROM greenmail_messages m USING unnest(%s::text[], %s::bigint[]) AS v(id, token)"
    " WHERE m.id = v.id AND m.lease_token = v.token RETURNING m.lease_token"
)


def requeue_params(claim: Any, status: str, next_at: float, attempt: int) -> dict[str, Any]:
    """REQUEUE's parameters: the message ``status`` ("queued" or "failed"), due at ``next_at``."""
    s = claim.state
    rcpts = list(claim.recipients)
    return {
        "status": status,
        "attempt": attempt,
        "next": next_at,
        "error": s.last_error,
        "warned": s.warned,
        "id": claim.id,
        "token": claim.token,
        "rcpts": rcpts,
        "states": [s.recipients.get(r, "pending") for r in rcpts],
        "replies": [s.errors.get(r) for r in rcpts],
        "bounced": [r in s.bounced for r in rcpts],
    }


def _lost(qid: str) -> None:
    log.warning(
        "%s: this node's claim was lost (lease ended, another node may have it): "
        "this attempt's outcome is not recorded; a possible duplicate",
        qid,
    )


class Settler:
    """The settlements of one node; ``done(claim)`` once a claim's settlement is written (or fenced off)."""

    def __init__(self, pool: Any, done: Callable[[Any], None], trouble: Callable[[Exception], None]) -> None:
        self.pool = pool
        self.done = done
        self.trouble = trouble
        self._retiring: list[Any] = []
        self._gatherer: gevent.Greenlet | None = None
        self._unsettled: dict[
            int, tuple[Any, dict[str, Any] | None]
        ] = {}  # by token: (claim, REQUEUE params)

    def requeue(self, claim: Any, status: str, next_at: float, attempt: int) -> None:
        self._requeue(claim, requeue_params(claim, status, next_at, attempt))

    def _requeue(self, claim: Any, params: dict[str, Any]) -> None:
        try:
            with self.pool.connection() as conn:
                if conn.execute(REQUEUE, params).rowcount == 0:
                    _lost(claim.id)
        except GreenmailError as e:
            self.trouble(e)
            self._unsettled[claim.token] = (claim, params)
            return
        self._unsettled.pop(claim.token, None)
        self.done(claim)

    def retire(self, claim: Any) -> None:
        """A delivered message: removed with the others settled within GATHER seconds."""
        self._retiring.append(claim)
        if self._gatherer is None or self._gatherer.dead:
            self._gatherer = gevent.spawn(self._gather)

    def _gather(self) -> None:
        while self._retiring:
            gevent.sleep(GATHER)
            batch, self._retiring = self._retiring, []
            self._retire(batch)

    def _retire(self, batch: list[Any]) -> None:
        try:
            with self.pool.connection() as conn:
                rows = conn.execute(RETIRE, ([c.id for c in batch], [c.token for c in batch])).fetchall()
        except GreenmailError as e:
            self.trouble(e)
            for claim in batch:
                self._unsettled[claim.token] = (claim, None)
            return
        removed = {r[0] for r in rows}
        for claim in batch:
            if claim.token not in removed:
                _lost(claim.id)
            self._unsettled.pop(claim.token, None)
            self.done(claim)

    def flush(self) -> None:
        """Wait for the batch in progress; write what PostgreSQL could not take before."""
        if self._gatherer is not None:
            self._gatherer.join()
        if self._retiring:
            self._gather()
        waiting = list(self._unsettled.values())
        retire = [c for c, params in waiting if params is None]
        if retire:
            self._retire(retire)
        for claim, params in waiting:
            if params is not None:
                self._requeue(claim, params)

    def __len__(self) -> int:
        return len(self._unsettled) + len(self._retiring)
