"""The queue's operations as sessions and the scheduler see them.

Owns: the in-memory index of waiting and due messages (refreshed by full
scans and by cheap wake-up scans that only parse new names), handing claims
to sessions, and settling a claim as delivered, deferred (with backoff),
failed or released, with the matching counters and spool gauges.
Every spool call goes through ``offload`` (the hub's threadpool in the daemon).
Must not touch: sockets, SMTP replies (it sees only settled recipients),
directory paths (the Spool owns them). A second queue backend replaces this
module's Spool, not its callers.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import gevent

from greenmail import bounce
from greenmail.config import RetryConfig
from greenmail.errors import CorruptQueueFile
from greenmail.metrics import Metrics, SpoolGauges
from greenmail.queuefile import HOST, Entry, id_time, name_id, parse_name, share
from greenmail.spool import ACTIVE, FAILED, Claim, Spool

log = logging.getLogger("greenmail.queue")
YIELD_EVERY = 2000
SYNC_GATHER = 0.02  # seconds removals wait to share one batch (an rm process) and one directory fsync
T = TypeVar("T")
Offload = Callable[..., Any]


def direct(fn: Callable[..., T], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> T:
    """Run a spool call right here (tests, one-shot commands)."""
    return fn(*args, **(kwargs or {}))


def direct_call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class Outbox:
    def __init__(
        self,
        spool: Spool,
        retry: RetryConfig,
        metrics: Metrics,
        offload: Offload = direct,
        clock: Callable[[], float] = time.time,
        shield: Callable[..., Any] = direct_call,
        hostname: str = HOST,
        relay: str | None = None,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        self.spool = spool
        self.worker = worker  # (k, n): this process sends the messages of share k of n
        self.retry = retry
        self.hostname = hostname
        self.relay = relay
        self.metrics = metrics
        self.offload = offload
        self.clock = clock
        self.shield = shield  # runs a settling step so that a kill cannot cut it in half
        self._due: deque[Entry] = deque()
        self._waiting: list[tuple[int, str, Entry]] = []
        self._known: set[str] = set()
        self._retired: list[str] = []  # retired files to unlink (then fsync outgoing_active/)
        self._syncer: gevent.Greenlet | None = None
        self.stopping = False
        self.gauges = SpoolGauges(metrics)

    # -- the index ---------------------------------------------------------------

    def refresh(self) -> int:
        """Full scan of outgoing/: rebuild the index. Returns the number due."""
        entries = self.offload(self.spool.scan)
        self._due.clear()
        self._waiting = []
        self._known = set()
        self.gauges.reindex()
        self._add(entries)
        self.metrics.scans.labels(trigger="periodic").inc()
        return self.due_count()

    def wakeup(self) -> int:
        """Cheap scan: index the names that appeared since the last look."""
        entries = self.offload(self.spool.scan, (frozenset(self._known),))
        self._add(entries)
        self.metrics.scans.labels(trigger="wakeup").inc()
        return self.due_count()

    def arrived(self, names: list[str]) -> int:
        """Index names reported new in outgoing/ (no listing); a foreign name means a scan."""
        entries = []
        for name in names:
            if name.startswith("."):
                continue
            entry = parse_name(name)
            if entry is None:
                return self.wakeup()  # adopting a foreign name renames it: the scan does that
            entries.append(entry)
        self._add(entries)
        self.metrics.scans.labels(trigger="wakeup").inc()  # a wake-up, without a listing
        return self.due_count()

    def _add(self, entries: list[Entry]) -> None:
        """Index entries (in name order: oldest first); yields to other greenlets now and then."""
        now = self.clock()
        for i, e in enumerate(entries):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                gevent.sleep(0)  # 100,000 names must not stall the sessions
            if e.name in self._known:
                continue
            self._known.add(e.name)
            if share(e.id, self.worker[1]) != self.worker[0]:
                continue  # another delivery process's message
            self.gauges.indexed(e.id, e.attempts > 0, id_time(e.id))
            if e.due(now):
                self._due.append(e)
            else:
                heapq.heappush(self._waiting, (e.next_at, e.name, e))

    def _promote(self) -> None:
        now = self.clock()
        while self._waiting and self._waiting[0][0] <= now:
            self._due.append(heapq.heappop(self._waiting)[2])

    def due_count(self) -> int:
        self._promote()
        return len(self._due)

    def next_wakeup(self) -> float | None:
        """When the earliest waiting message becomes due, if any."""
        return self._waiting[0][0] if self._waiting else None

    def take(self) -> Claim | None:
        """Claim the next due message, or None when nothing is due (or stopping)."""
        while not self.stopping and self.due_count():
            entry = self._due.popleft()
            self._known.discard(entry.name)
            try:  # on the hub: a rename and a short read, and never lost to a kill
                claim = self.spool.claim(entry)
            except CorruptQueueFile as e:
                log.error("%s", e)
                self.gauges.dropped(entry.id, entry.attempts > 0)
                continue
            if claim is not None:
                self.gauges.claimed(entry.id, entry.attempts > 0)
                return claim
            self.gauges.dropped(entry.id, entry.attempts > 0)
        return None

    def expire_old(self) -> int:
        """Due messages older than max_lifetime fail now, even while the relay is unreachable."""
        limit = self.clock() - self.retry.max_lifetime
        old = [e for e in self._due if (t := id_time(e.id)) is not None and t < limit]
        if not old:
            return 0
        gone = {e.name for e in old}
        self._due = deque(e for e in self._due if e.name not in gone)
        expired = 0
        for entry in old:
            self._known.discard(entry.name)
            try:
                claim = self.spool.claim(entry)
            except CorruptQueueFile as e:
                log.error("%s", e)
                claim = None
            if claim is None:
                self.gauges.dropped(entry.id, entry.attempts > 0)
                continue
            self.gauges.claimed(entry.id, entry.attempts > 0)
            claim.state.last_error = claim.state.last_error or "the relay could not be reached"
            self.finish(claim)  # past max_lifetime: its pending recipients fail as expired
            expired += 1
        return expired

    # -- settling a claim -----------------------------------------------------------

    def finish(self, claim: Claim, reason: str = "temporary") -> str:
        """Settle a claim after a transaction (shielded from kills: see ``shield``)."""
        state = claim.state
        if not state.pending(claim.envelope) and "failed" not in state.recipients.values():
            return self._finish(claim, reason)  # delivered: nothing in it can switch, so no kill lands
        return self.shield(self._finish, claim, reason)

    def _finish(self, claim: Claim, reason: str) -> str:
        """Settle a claim after a transaction from the recipients' state.

        Returns "delivered", "deferred" or "failed" (the attempt's result).
        ``reason`` is the requeue reason if recipients are left to try.
        """
        pending = claim.state.pending(claim.envelope)
        age = self.clock() - claim.queued_at
        if pending and age > self.retry.max_lifetime:
            self._expire(claim, pending)
            pending = ()
        self._notify(claim, pending, age)
        claim.settled = True
        if pending:
            self._requeue(claim, reason, attempt=True)
            result = "deferred"
        elif "failed" in claim.state.recipients.values():
            self.offload(self.spool.fail, (claim,))
            result = "failed"
        else:
            self._commit_done(claim)
            result = "delivered"
        self.metrics.attempts.labels(result=result).inc()
        self.gauges.settled(claim.id, result)
        return result

    def _commit_done(self, claim: Claim) -> None:
        """Retire a delivered message now; unlink it and make that durable in the background.

        The retiring rename happens here, on the hub (a metadata operation,
        like the claim's rename), so outgoing_active/ always tells the truth
        and a kill can never send it again. The unlinks (slow: the kernel
        frees the blocks) and the directory fsync run in the threadpool, one
        batch at a time, covering every retirement made before it started.
        No session waits for the disk; ``flush()`` at shutdown waits for the
        last batch.
        """
        self._retired.extend(self.spool.retire(claim))
        if self._syncer is None or self._syncer.dead:
            self._syncer = gevent.spawn(self._sync_removals)

    def _sync_removals(self) -> None:
        while self._retired:
            gevent.sleep(SYNC_GATHER)  # let retirements gather: one batch, one fsync
            batch, self._retired = self._retired, []
            try:
                self.offload(self.spool.purge, (batch,))
            except OSError as e:
                log.error("removing delivered messages / fsync of outgoing_active/ failed: %s", e)

    def flush(self) -> None:
        """Wait until every removal so far is done and durable."""
        if self._syncer is not None:
            self._syncer.join()
        if self._retired:
            self._sync_removals()

    def release(self, claim: Claim, reason: str, attempt: bool | None = None) -> None:
        """Put a claim back: as an attempt, with backoff; or untouched, due as before.

        By default only a shutdown puts a claim back untouched.
        """
        self.shield(self._release, claim, reason, reason != "shutdown" if attempt is None else attempt)

    def _release(self, claim: Claim, reason: str, attempt: bool) -> None:
        claim.settled = True
        self._requeue(claim, reason, attempt=attempt)
        self.gauges.settled(claim.id, "released")

    def _requeue(self, claim: Claim, reason: str, attempt: bool) -> None:
        if attempt:
            next_at = math.ceil(self.clock() + self.jittered(claim.entry.attempts + 1))  # never early
        else:
            next_at = claim.entry.next_at
        save = bool(claim.state.recipients or claim.state.last_error)
        entry = self.offload(self.spool.requeue, (claim, next_at), {"attempt": attempt, "state": save})
        self.metrics.requeues.labels(reason=reason).inc()
        self._add([entry])

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: min_backoff doubling, capped (no jitter)."""
        r = self.retry
        return min(r.max_backoff, r.min_backoff * 2 ** max(0, min(attempts - 1, 60)))

    def jittered(self, attempts: int) -> float:
        """The backoff plus up to a quarter more, so deferrals do not retry in lockstep."""
        delay = self.backoff(attempts)
        return delay + random.uniform(0, delay / 4)

    # -- notifications ---------------------------------------------------------------

    def _notify(self, claim: Claim, pending: tuple[str, ...], age: float) -> None:
        """Bounce newly failed recipients; warn once about long-delayed ones."""
        state = claim.state
        failed = state.unreported_failures()
        if failed:
            self._dsn(claim, failed, "failed")
            state.bounced.extend(failed)
        elif pending and self.retry.delay_warning and age > self.retry.delay_warning and not state.warned:
            self._dsn(claim, list(pending), "delayed")
            state.warned = True

    def _dsn(self, claim: Claim, rcpts: list[str], action: str) -> None:
        sender = claim.envelope.sender
        if not self.retry.bounce or not sender:  # never bounce a bounce
            if not sender and action == "failed":
                log.info("%s: null sender: no notification for %d failed recipients", claim.id, len(rcpts))
            return
        errors = claim.state.errors
        failures = [
            bounce.Failure(r, errors.get(r) or claim.state.last_error or "unknown", self.relay) for r in rcpts
        ]
        headers = self.offload(bounce.original_headers, (str(claim.path), claim.envelope.body_offset))
        dsn = bounce.build(
            reporting_mta=self.hostname,
            original_sender=sender,
            queue_id=claim.id,
            arrival=claim.queued_at,
            failures=failures,
            original_headers=headers,
            action=action,
        )
        qid = self.offload(self.spool.enqueue, ("", [sender], dsn))
        if action == "failed":
            self.metrics.bounces.inc()
        log.info(
            "%s: sender %s notification: %s", claim.id, "non-delivery" if action == "failed" else "delay", qid
        )

    def _expire(self, claim: Claim, pending: tuple[str, ...]) -> None:
        days = self.retry.max_lifetime / 86400
        why = f"message expired: undeliverable for {days:g} days; last error: {claim.state.last_error}"
        for rcpt in pending:
            claim.state.recipients[rcpt] = "failed"
            claim.state.errors[rcpt] = why
        claim.state.last_error = why
        self.metrics.expired.inc()  # the session already counted these recipients for this attempt
        log.warning("%s: %s", claim.id, why)

    # -- gauges -------------------------------------------------------------------

    def update_gauges(self) -> None:
        """Resync the active/failed gauges from a listing (the rest follow every event)."""
        self.gauges.listed(*self.offload(_count_dirs, (self.spool, self.worker)))


def _count_dirs(spool: Spool, worker: tuple[int, int]) -> tuple[int, int]:
    """Claims of this process's share, and failed messages (counted by the first process only)."""
    k, n = worker
    active = os.listdir(spool.dir(ACTIVE))
    if n > 1:
        active = [name for name in active if share(name_id(name), n) == k]
    return len(active), len(os.listdir(spool.dir(FAILED))) if k == 0 else 0
