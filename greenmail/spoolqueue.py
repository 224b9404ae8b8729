"""The spool as the daemon's delivery queue (queue.DeliveryQueue on spool.py).

Owns: the in-memory index of waiting and due messages (rebuilt by full
scans, grown by cheap wake-up scans and by the names inotify reports),
claiming for sessions, settling a claim by its state (retired when
delivered, to failed/, or back to outgoing/ with its next attempt time) and
putting one back untouched, settlements that could not be written (a full
disk) tried again until they are, removal of retired files in batches, the
wake-up watch on outgoing/ (inotify, else polling), the housekeeping of each
periodic check (recovery, stale files, this daemon's lock file), and the
queue's gauges. Every blocking spool call goes through ``offload`` (the
hub's threadpool in the daemon); claims are taken on the hub (a rename and
a short read).
Must not touch: SMTP, backoff and notifications (the outbox decides when),
metrics.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent.lock import Semaphore

from greenmail.errors import CorruptQueueFile, SpoolError
from greenmail.layout import MAILDROP, OUTGOING, TMP, id_time
from greenmail.layout import is_own_id as layout_is_own_id
from greenmail.pickup import pickup
from greenmail.queue import Claim
from greenmail.queuefile import Entry, parse_name, share
from greenmail.spool import WAKE, Spool, SpoolClaim
from greenmail.watch import Inotify

log = logging.getLogger("greenmail.queue")
YIELD_EVERY = 2000
SYNC_GATHER = 0.02  # seconds removals wait to share one batch (an rm process) and one directory fsync
WAKE_POLL = 0.2  # seconds between looks at outgoing/'s mtime
FORCED_WAKE = 0.8  # seconds between looks for new names even when the mtime did not change
FORCED_WAKE_NOTIFIED = 10.0  # the same, while inotify reports the changes
KEEP_OWNER = 1.0  # seconds between checks that this daemon's lock file is still there
WATCH_RETRY = 1.0  # seconds between tries to watch a spool that went away
T = TypeVar("T")
Offload = Callable[..., Any]


def direct(fn: Callable[..., T], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> T:
    """Run a spool call right here (tests, one-shot commands)."""
    return fn(*args, **(kwargs or {}))


class SpoolQueue:
    """The delivery side of one spool for this process (its share of it, with several processes)."""

    def __init__(
        self,
        spool: Spool,
        offload: Offload = direct,
        clock: Callable[[], float] = time.time,
        worker: tuple[int, int] = (0, 1),
        prune_after: float = 0,
    ) -> None:
        self.spool = spool
        self.prune_after = prune_after  # seconds failed/ and corrupt/ keep a file (0: for ever)
        self.offload = offload
        self.clock = clock
        self.worker = worker  # (k, n): this process sends the messages of share k of n
        self.stopping = False
        self._due: deque[Entry] = deque()
        self._waiting: list[tuple[int, str, Entry]] = []
        self._known: set[str] = set()
        self._fresh = self._retried = 0  # indexed messages never tried / tried before
        self._claims: dict[str, SpoolClaim] = {}  # ours, being delivered
        self._unsettled: dict[str, tuple[SpoolClaim, float, bool]] = {}  # settlements not yet written
        self._listed = {"failed": 0, "held": 0}
        self._retired: list[str] = []  # retired files to unlink (then fsync outgoing_active/)
        self._syncer: gevent.Greenlet | None = None
        self.watch_problem: str | None = None  # why wake-ups do not work now
        # One scan at a time: two would both adopt foreign names, and a full scan that ends
        # last would drop what the other indexed. Names that inotify reports during a full
        # scan are kept aside and indexed again after it (they may be newer than its listing).
        self._scanning = Semaphore()
        self._during: list[Entry] | None = None
        # new messages seen arriving (metrics: received{source="local"}); what the listener wrote
        # and what went back untouched are not new
        self._arrivals = 0
        self._not_new: set[str] = set()

    # -- life cycle ----------------------------------------------------------------

    def open(self) -> int:
        """Before delivery starts: the directories, this daemon's locks, recovery; claims returned."""
        self.spool.ensure()
        self.offload(self.spool.lock_owner)
        return self.offload(self.spool.recover)

    def close(self) -> None:
        self.offload(self.spool.unlock_owner)

    def problem(self) -> str | None:
        """Why the queue cannot take mail now, if it cannot."""
        if not os.path.isdir(self.spool.path):
            return f"spool {self.spool.path} is missing or not a directory"
        if not os.access(self.spool.dir(TMP), os.W_OK):
            return "spool not writable"
        return self.watch_problem

    @property
    def where(self) -> str:
        return f"spool={self.spool.path}"

    # -- the index ---------------------------------------------------------------

    def refresh(self) -> int:
        """Full scan of outgoing/ (a removed spool is made again first): rebuild the index; the number due."""
        with self._scanning:
            self._during = []
            try:
                self.offload(self.spool.ensure)
                self.offload(pickup, (self.spool,))
                entries = self.offload(self.spool.scan)
            finally:
                during, self._during = self._during, None
            self._due.clear()
            self._waiting = []
            self._known = set()
            self._fresh = self._retried = 0
            self._add(entries)
            self._add(during)
        return self.due()

    def wakeup(self) -> int:
        """Cheap scan: index the names that appeared since the last look."""
        with self._scanning:
            self.offload(pickup, (self.spool,))
            self._add(self.offload(self.spool.scan, (frozenset(self._known),)), arrivals=True)
        return self.due()

    def arrived(self, names: list[str]) -> int:
        """Index names reported new in outgoing/ (no listing); a foreign name means a scan."""
        entries = []
        for name in names:
            if name.startswith("."):
                continue
            entry = parse_name(name)
            if entry is None:
                return self.wakeup()  # giving a foreign name an id renames it: the scan does that
            entries.append(entry)
        self._add(entries, arrivals=True)
        return self.due()

    def take_arrivals(self) -> int:
        """How many new messages arrived since the last call (not those the listener wrote)."""
        n, self._arrivals = self._arrivals, 0
        return n

    def _add(self, entries: list[Entry], arrivals: bool = False) -> None:
        """Index entries (in name order: oldest first); yields to other greenlets now and then."""
        if self._during is not None:
            self._during.extend(entries)
        now = self.clock()
        k, n = self.worker
        for i, e in enumerate(entries):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                gevent.sleep(0)  # 100,000 names must not stall the sessions
            if e.name in self._known:
                continue
            self._known.add(e.name)
            if share(e.id, n) != k:
                continue  # another delivery process's message
            if arrivals and not e.attempts:
                if e.id in self._not_new:
                    self._not_new.discard(e.id)
                else:
                    self._arrivals += 1
            self._count(e, 1)
            if e.due(now):
                self._due.append(e)
            else:
                heapq.heappush(self._waiting, (e.next_at, e.name, e))

    def _count(self, e: Entry, delta: int) -> None:
        if e.attempts:
            self._retried += delta
        else:
            self._fresh += delta

    def _promote(self) -> None:
        now = self.clock()
        while self._waiting and self._waiting[0][0] <= now:
            self._due.append(heapq.heappop(self._waiting)[2])

    def due(self) -> int:
        self._promote()
        return len(self._due)

    def next_due(self) -> float | None:
        """When the earliest waiting message becomes due, if any."""
        return self._waiting[0][0] if self._waiting else None

    # -- claims --------------------------------------------------------------------

    def take(self) -> Claim | None:
        """Claim the next due message, or None when nothing is due (or stopping)."""
        while not self.stopping and self.due():
            try:
                claim = self._claim(self._due.popleft())
            except OSError as e:
                log.error("cannot take a message now: %s", e)
                return None
            if claim is not None:
                return claim
        return None

    def take_older(self, than: float) -> list[Claim]:
        """Claim every due message enqueued before ``than`` (expiry while the relay is unreachable)."""
        self._promote()
        old = [e for e in self._due if (t := id_time(e.id)) is not None and t < than]
        if not old:
            return []
        gone = {e.name for e in old}
        self._due = deque(e for e in self._due if e.name not in gone)
        claims = []
        for e in old:
            try:
                claim = self._claim(e)
            except OSError as err:
                log.error("cannot take a message now: %s", err)
                continue
            if claim is not None:
                claims.append(claim)
        return claims

    def _claim(self, entry: Entry) -> SpoolClaim | None:
        self._known.discard(entry.name)
        self._count(entry, -1)
        try:  # on the hub: a rename and a short read, and never lost to a kill
            claim = self.spool.claim(entry)
        except CorruptQueueFile as e:
            log.error("%s", e)
            return None
        except OSError:  # out of file descriptors, say: back in outgoing/, found again by the next scan
            raise
        if claim is not None:
            self._claims[claim.id] = claim
        return claim

    def settle(self, claim: Claim, next_at: float) -> str:
        """Write the claim's outcome by its state: "delivered", "failed", or "deferred" until ``next_at``.

        If it cannot be written now (a full disk), the claim stays ours in
        outgoing_active/ and ``maintain`` tries again until it is.
        """
        assert isinstance(claim, SpoolClaim)
        claim.settled = True
        pending = bool(claim.pending())
        failed = "failed" in claim.state.recipients.values()
        if not pending and not failed:
            self._retire(claim)
            return "delivered"
        self._write(claim, next_at, True, pending)
        return "deferred" if pending else "failed"

    def release(self, claim: Claim) -> None:
        """Put a claim back untouched: no attempt counted, due as before."""
        assert isinstance(claim, SpoolClaim)
        claim.settled = True
        self._not_new.add(claim.id)
        self._write(claim, claim.entry.next_at, False, True)

    def _write(self, claim: SpoolClaim, next_at: float, attempt: bool, back: bool) -> None:
        """Put a settled claim back in outgoing/ (``back``) or into failed/; if that fails, keep it."""
        try:
            if back:
                state = bool(claim.state.recipients or claim.state.last_error)
                kwargs = {"attempt": attempt, "state": state}
                self._add([self.offload(self.spool.requeue, (claim, int(next_at)), kwargs)])
            else:
                self.offload(self.spool.fail, (claim,))
                self._listed["failed"] += 1
        except OSError as e:
            log.error("%s: cannot record the attempt (%s); kept, tried again at the next check", claim.id, e)
            self._unsettled[claim.id] = (claim, next_at, attempt)
            return
        self._claims.pop(claim.id, None)
        self._unsettled.pop(claim.id, None)

    def _retire(self, claim: SpoolClaim) -> None:
        """Retire a delivered message now; unlink it and make that durable in the background.

        The retiring rename happens here, on the hub (a metadata operation,
        like the claim's rename), so outgoing_active/ always tells the truth
        and a kill can never send it again. The unlinks and the directory
        fsync run in the threadpool, one batch at a time, covering every
        retirement made before it started.
        """
        try:
            self._retired.extend(self.spool.retire(claim))
        except OSError as e:
            log.error("%s: delivered, but cannot be taken out of the queue (%s); tried again", claim.id, e)
            self._unsettled[claim.id] = (claim, 0, True)
            return
        self._claims.pop(claim.id, None)
        self._unsettled.pop(claim.id, None)
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

    def incoming(self, sender: str, recipients: Any, trace: Any = None) -> Any:
        """A message to be written chunk by chunk (the listener; blocking: call it offloaded)."""
        incoming = self.spool.incoming(sender, recipients, trace)
        if len(self._not_new) > 10_000:  # ids of aborted messages never arrive: bounded
            self._not_new.clear()
        self._not_new.add(incoming.id)  # counted as received{source="smtp"} by the listener
        return incoming

    def enqueue(self, sender: str, recipients: Any, message: bytes) -> str:
        return self.offload(self.spool.enqueue, (sender, recipients, message))

    # -- housekeeping and gauges -------------------------------------------------------

    def maintain(self) -> None:
        """The periodic housekeeping: unsettled claims, stale files, dead daemons' claims, counts."""
        for claim, next_at, attempt in list(self._unsettled.values()):
            if not os.path.exists(claim.path):  # the move itself was done; what failed came after it
                self._unsettled.pop(claim.id, None)
                self._claims.pop(claim.id, None)
            elif attempt and not claim.pending() and "failed" not in claim.state.recipients.values():
                self._retire(claim)
            else:
                self._write(claim, next_at, attempt, not attempt or bool(claim.pending()))
        self.offload(self.spool.clean_tmp)
        if self.prune_after and self.worker[0] == 0:  # one process prunes
            self.offload(self.spool.prune, (self.prune_after,))
        self.offload(self.spool.recover)
        self.offload(self.spool.keep_owner)
        self._listed = self.offload(self.spool.counts)

    def gauges(self) -> tuple[dict[str, int], float]:
        """Messages by state (this process's share; failed and held counted by process 0) and the oldest."""
        first = self.worker[0] == 0
        counts = {
            "queued": self._fresh,
            "deferred": self._retried,
            "active": len(self._claims),
            "failed": self._listed["failed"] if first else 0,
            "held": self._listed["held"] if first else 0,
        }
        times = [t for e in self._entries() if (t := id_time(e.id)) is not None]
        times += [id_time(c.id) or c.queued_at for c in self._claims.values()]  # as while queued (not mtime)
        return counts, min(times, default=0.0)

    def relay_status(self, outage: tuple[float, str] | None) -> None:
        """Tell `queue list` that the relay cannot be reached (since when, why), or can again."""
        try:
            self.offload(self.spool.write_relay_status, (outage,))
        except OSError as e:
            log.warning("cannot record the relay's status: %s", e)

    def _entries(self) -> list[Entry]:
        return [*self._due, *(w[2] for w in self._waiting)]

    # -- wake-ups ------------------------------------------------------------------------

    def watch(self, woken: Callable[[], None], poked: Callable[[], None]) -> None:
        """Wake-ups, for as long as the daemon runs; a spool that vanishes is waited for (and recreated)."""
        while not self.stopping:
            try:
                self._watch(woken, poked)
            except (OSError, SpoolError) as e:
                if self.watch_problem is None:
                    log.error("watching the spool failed: %s; trying again every %gs", e, WATCH_RETRY)
                self.watch_problem = f"watching the spool failed: {e}"
                gevent.sleep(WATCH_RETRY)
                with contextlib.suppress(OSError, SpoolError):
                    self.offload(self.spool.ensure)  # a removed spool is made again
                    self.offload(self.spool.keep_owner)

    def _watch(self, woken: Callable[[], None], poked: Callable[[], None]) -> None:
        """Wake-ups: a new file in outgoing/ is seen at once (inotify) or within a second.

        With inotify the names it reports go straight into the index, and
        every change of outgoing/'s mtime is explained by an event. A change
        no event explains (another host on a shared filesystem) means a scan,
        as does an inotify overflow. Without inotify, the mtime is looked at
        every WAKE_POLL seconds and new names looked for at least every
        FORCED_WAKE seconds, since an mtime can stay the same across a change
        (coarse timestamps, NFS attribute caches, two renames in one tick).
        ``woken`` is called after new names were indexed, ``poked`` when
        outgoing/.wake was written (`queue retry`, `sendmail -q`). Raises
        OSError when outgoing/ is gone or is another directory than the one
        watched.
        """
        directory = self.spool.dir(OUTGOING)
        maildrop = self.spool.dir(MAILDROP)
        dropped = None
        watched = os.stat(directory).st_ino
        notify = Inotify.open(directory, layout_is_own_id)
        seen = wake = None
        last = owner_check = 0.0
        events = 0
        try:
            while not self.stopping:
                names = notify.wait(WAKE_POLL) if notify is not None else gevent.sleep(WAKE_POLL)
                if names:
                    self.arrived(names)
                    woken()
                st = os.stat(directory)
                if st.st_ino != watched:
                    raise FileNotFoundError(f"{directory} was replaced")
                now = st.st_mtime_ns
                if notify is None:
                    due = now != seen or time.monotonic() - last >= FORCED_WAKE
                else:  # an mtime change that no event explains, or lost events
                    due = notify.overflowed or (now != seen and notify.events == events)
                    due = due or time.monotonic() - last >= FORCED_WAKE_NOTIFIED
                    events = notify.events
                    notify.overflowed = False
                with contextlib.suppress(OSError):  # another local user's submission (pickup.py)
                    drop_mtime = os.stat(maildrop).st_mtime_ns
                    due = due or (dropped is not None and drop_mtime != dropped)
                    dropped = drop_mtime
                if due:
                    last = time.monotonic()
                    self.wakeup()
                    woken()
                poke = bool(names) and WAKE in names
                if poke or due:
                    stamp = self.spool.wake_mtime()
                    if poke or (wake is not None and stamp != wake):
                        poked()
                    wake = stamp
                seen = now
                if time.monotonic() - owner_check >= KEEP_OWNER:
                    owner_check = time.monotonic()
                    self.offload(self.spool.keep_owner)
                if self.watch_problem is not None:
                    log.warning("watching the spool works again")
                    self.watch_problem = None
        finally:
            if notify is not None:
                try:  # closing an inotify descriptor waits for the kernel (RCU): not on the hub
                    self.offload(notify.close)
                except BaseException:
                    notify.close()
                    raise
