"""The periodic check and the wake-ups: when to open SMTP sessions.

Owns: the check every ``check_interval`` (the queue's full look, expiry,
the queue's housekeeping, the heartbeat; a check that fails on the file
system is run again soon), acting on the queue's wake-ups (new mail, a poke
from `queue retry`), how many sessions to open (min(due, max_connections -
active)), and the seed's tries rule: after ``connect_tries`` failed connects
in one check, open nothing more, but try again after a short wait that
doubles up to ``check_interval`` (the relay's outage is told to the queue,
so `queue list` can say why mail waits). While no connect of this check has
succeeded, only one session probes.
Must not touch: claims (sessions take them from the outbox), sockets, the
queue's storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool

from greenmail.config import Config
from greenmail.errors import SpoolError
from greenmail.metrics import Metrics
from greenmail.outbox import Outbox
from greenmail.queue import DeliveryQueue
from greenmail.shaping import Throttle

log = logging.getLogger("greenmail.scheduler")
RECONNECT_FIRST = 1.0  # seconds before the first new try after a check's connects all failed (doubling)
CHECK_RETRY = 1.0  # seconds before a failed periodic check runs again

SessionFactory = Callable[[Callable[..., None]], Callable[[], None]]  # given on_greeted(ok, why)


class Scheduler:
    def __init__(
        self,
        config: Config,
        queue: DeliveryQueue,
        outbox: Outbox,
        metrics: Metrics,
        new_session: SessionFactory,
        throttle: Throttle | None = None,
        reconnect: bool = True,
        slots: Any = None,
    ) -> None:
        self.cfg = config
        self.slots = slots  # the cluster's connection slots (a shared queue's), or None: no such limit
        self.queue = queue
        self.outbox = outbox
        self.metrics = metrics
        self.new_session = new_session
        self.pool = Pool()  # sized by the throttle, whose limit a reload may change
        self.throttle = throttle or Throttle(config.delivery.max_connections)
        self.stopping = False
        self.last_check = 0.0
        self._tick = Event()
        self._failures = 0
        self._greeted = False
        self._probing = 0
        self._starting = 0  # sessions opened that have not yet taken their first message
        self.reconnect = reconnect  # after connect_tries failures: try again soon (not in --once)
        self._retry: gevent.Greenlet | None = None
        self._retry_delay = RECONNECT_FIRST
        self.outage: tuple[float, str] | None = None  # (since, why) while the relay cannot be reached
        self.problem: str | None = None  # why the last periodic check failed (for /healthz)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """The periodic check, forever (until stop()); a check that fails on the file system runs again soon.

        (Out of file descriptors, the spool removed, a full disk: the daemon
        goes on, /healthz says why, and delivery resumes when the cause goes.)
        """
        interval = self.cfg.delivery.check_interval
        while not self.stopping:
            try:
                self.check()
                wait = self._sleep_time(interval)
                if self.problem is not None:
                    log.warning("the periodic check works again")
                self.problem = None
            except (OSError, SpoolError) as e:
                if self.problem is None:
                    log.error("the periodic check failed: %s; trying again every %gs", e, CHECK_RETRY)
                self.problem = f"the periodic check failed: {e}"
                wait = min(interval, CHECK_RETRY)
            self._tick.clear()
            self._tick.wait(wait)

    def _sleep_time(self, interval: float) -> float:
        nxt = self.queue.next_due()
        wait = interval if nxt is None else min(interval, max(0.0, nxt - time.time()) + 0.01)
        return max(wait, 0.05)

    def check(self) -> None:
        """One periodic check: the queue's full look, expiry, sessions, housekeeping, heartbeat."""
        self.queue.refresh()
        self.metrics.count("scan", "periodic")
        self.outbox.expire_old()
        self._cancel_retry()
        self._failures = 0
        self._greeted = False
        self.fill()
        self.queue.maintain()
        self.last_check = time.time()
        self.metrics.heartbeat = self.last_check

    def watch(self) -> None:
        """The queue's wake-ups, for as long as the daemon runs."""
        self.queue.watch(self._woken, self.poke)

    def _woken(self) -> None:
        self.metrics.count("scan", "wakeup")
        self.metrics.count("received", "local", self.queue.take_arrivals())
        self.fill()

    def poke(self) -> None:
        """The queue is to be tried now (`queue retry`, `sendmail -q`): failed connects are forgotten."""
        log.info("asked to try the queue now")
        self.queue.refresh()
        self._try_again()

    def _try_again(self) -> None:
        self._cancel_retry()
        self._failures = 0
        self._greeted = False
        self.fill()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.kill(block=False)
            self._retry = None

    def stop(self) -> None:
        self.stopping = True
        self.queue.stopping = True
        self._cancel_retry()
        self._tick.set()

    # -- sessions ----------------------------------------------------------------

    def fill(self) -> int:
        """Open sessions for due messages, within the limits; returns how many."""
        if self.stopping or self._failures >= self.cfg.delivery.connect_tries:
            return 0
        free = self.throttle.current - len(self.pool)
        want = min(self.queue.due() - self._starting, free)
        if not self._greeted:
            want = min(want, 1 - self._probing)
        if self.slots is not None:  # what this node may have open of the cluster's connections
            want = min(want, self.slots.grant(len(self.pool) + max(0, want)) - len(self.pool))
        for _ in range(max(0, want)):
            probe = not self._greeted
            self._probing += probe
            self._starting += 1
            self.pool.spawn(self._session, probe).link(self._on_session_end)
        return max(0, want)

    def _session(self, probe: bool) -> None:
        reported = False

        def greeted(ok: bool, why: str | None = None) -> None:
            nonlocal reported, probe
            reported = True
            self._starting -= 1
            if probe:
                self._probing -= 1
                probe = False
            self._on_greeted(ok, why)

        try:
            self.new_session(greeted)()
        finally:
            if not reported:
                greeted(False, "the session ended before greeting the relay")

    def _on_greeted(self, ok: bool, why: str | None = None) -> None:
        if ok:
            self._greeted = True
            self._retry_delay = RECONNECT_FIRST
            if self.outage is not None:
                log.info("the relay can be reached again")
                self.outage = None
                self.queue.relay_status(None)
        else:
            self._failures += 1
            if self._failures == self.cfg.delivery.connect_tries:
                self._unreachable(why or "connection failed")
        self.fill()

    def _unreachable(self, why: str) -> None:
        """This check's connects all failed: try again after a short, doubling wait while mail waits."""
        interval = self.cfg.delivery.check_interval
        if self.outage is None:
            self.outage = (time.time(), why)
            self.queue.relay_status(self.outage)
        if not self.reconnect or self.stopping:
            log.warning("%d failed connects to the relay; next try in %gs", self._failures, interval)
            return
        delay = min(self._retry_delay, interval)
        log.warning("%d failed connects to the relay (%s); next try in %gs", self._failures, why, delay)
        self._retry_delay = min(self._retry_delay * 2, interval)
        self._cancel_retry()
        self._retry = gevent.spawn_later(delay, self._try_again)

    def _on_session_end(self, greenlet: gevent.Greenlet) -> None:
        if not greenlet.successful() and not isinstance(greenlet.exception, gevent.GreenletExit):
            log.error("session ended with an error: %r", greenlet.exception)
        if not self.stopping:
            self.fill()

    @property
    def active(self) -> int:
        return len(self.pool)

    def idle(self) -> bool:
        """No session is open and nothing more will be opened in this check."""
        if len(self.pool):
            return False
        return self.queue.due() == 0 or self._failures >= self.cfg.delivery.connect_tries
