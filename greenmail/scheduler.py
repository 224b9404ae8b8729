"""The periodic check and the wake-ups: when to open SMTP sessions.

Owns: the check every ``check_interval`` (the queue's full look, expiry,
the queue's housekeeping, the heartbeat), acting on the queue's wake-ups (new
mail, a poke from `queue retry`), how many sessions to open
(min(due, max_connections - active)), and the seed's tries rule: after
``connect_tries`` failed connects in one check, open nothing until the next.
While no connect of this check has succeeded, only one session probes.
Must not touch: claims (sessions take them from the outbox), sockets, the
queue's storage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.pool import Pool

from greenmail.config import Config
from greenmail.metrics import Metrics
from greenmail.outbox import Outbox
from greenmail.queue import DeliveryQueue
from greenmail.shaping import Throttle

log = logging.getLogger("greenmail.scheduler")

SessionFactory = Callable[[Callable[[bool], None]], Callable[[], None]]


class Scheduler:
    def __init__(
        self,
        config: Config,
        queue: DeliveryQueue,
        outbox: Outbox,
        metrics: Metrics,
        new_session: SessionFactory,
        throttle: Throttle | None = None,
    ) -> None:
        self.cfg = config
        self.queue = queue
        self.outbox = outbox
        self.metrics = metrics
        self.new_session = new_session
        self.pool = Pool(config.delivery.max_connections)
        self.throttle = throttle or Throttle(config.delivery.max_connections)
        self.stopping = False
        self.last_check = 0.0
        self._tick = Event()
        self._failures = 0
        self._greeted = False
        self._probing = 0
        self._starting = 0  # sessions opened that have not yet taken their first message

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """The periodic check, forever (until stop())."""
        interval = self.cfg.delivery.check_interval
        while not self.stopping:
            self.check()
            self._tick.clear()
            self._tick.wait(self._sleep_time(interval))

    def _sleep_time(self, interval: float) -> float:
        nxt = self.queue.next_due()
        wait = interval if nxt is None else min(interval, max(0.0, nxt - time.time()) + 0.01)
        return max(wait, 0.05)

    def check(self) -> None:
        """One periodic check: the queue's full look, expiry, sessions, housekeeping, heartbeat."""
        self.queue.refresh()
        self.metrics.count("scan", "periodic")
        self.outbox.expire_old()
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
        self.fill()

    def poke(self) -> None:
        """The queue is to be tried now (`queue retry`, `sendmail -q`): failed connects are forgotten."""
        log.info("asked to try the queue now")
        self._failures = 0
        self._greeted = False
        self.queue.refresh()
        self.fill()

    def stop(self) -> None:
        self.stopping = True
        self.queue.stopping = True
        self._tick.set()

    # -- sessions ----------------------------------------------------------------

    def fill(self) -> int:
        """Open sessions for due messages, within the limits; returns how many."""
        if self.stopping or self._failures >= self.cfg.delivery.connect_tries:
            return 0
        free = min(self.pool.free_count(), self.throttle.current - len(self.pool))
        want = min(self.queue.due() - self._starting, free)
        if not self._greeted:
            want = min(want, 1 - self._probing)
        for _ in range(max(0, want)):
            probe = not self._greeted
            self._probing += probe
            self._starting += 1
            self.pool.spawn(self._session, probe).link(self._on_session_end)
        return max(0, want)

    def _session(self, probe: bool) -> None:
        reported = False

        def greeted(ok: bool) -> None:
            nonlocal reported, probe
            reported = True
            self._starting -= 1
            if probe:
                self._probing -= 1
                probe = False
            self._on_greeted(ok)

        try:
            self.new_session(greeted)()
        finally:
            if not reported:
                greeted(False)

    def _on_greeted(self, ok: bool) -> None:
        if ok:
            self._greeted = True
        else:
            self._failures += 1
            if self._failures == self.cfg.delivery.connect_tries:
                log.warning(
                    "%d failed connects to the relay in this check; next try in %gs",
                    self._failures,
                    self.cfg.delivery.check_interval,
                )
        self.fill()

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
