"""The periodic check and the wake-ups: when to open SMTP sessions.

Owns: the check every ``check_interval`` (a full scan, the heartbeat, the
spool gauges, stale tmp/ files), wake-ups within a second of a new file in
outgoing/ (the directory's mtime is polled), how many sessions to open
(min(due, max_connections - active)), and the seed's tries rule: after
``connect_tries`` failed connects in one check, open nothing until the next.
While no connect of this check has succeeded, only one session probes.
Must not touch: claims (sessions take them from the outbox), sockets.
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
from greenmail.shaping import Throttle
from greenmail.spool import OUTGOING, Spool
from greenmail.watch import Inotify

log = logging.getLogger("greenmail.scheduler")
WAKE_POLL = 0.2  # seconds between looks at outgoing/'s mtime
FORCED_WAKE = 0.8  # seconds between looks for new names even when the mtime did not change
FORCED_WAKE_NOTIFIED = 10.0  # the same, while inotify reports the changes

SessionFactory = Callable[[Callable[[bool], None]], Callable[[], None]]


class Scheduler:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        outbox: Outbox,
        metrics: Metrics,
        new_session: SessionFactory,
        throttle: Throttle | None = None,
    ) -> None:
        self.cfg = config
        self.spool = spool
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
        nxt = self.outbox.next_wakeup()
        wait = interval if nxt is None else min(interval, max(0.0, nxt - time.time()) + 0.01)
        return max(wait, 0.05)

    def check(self) -> None:
        """One periodic check: full scan, gauges, heartbeat, open sessions."""
        self.outbox.refresh()
        self.outbox.expire_old()
        self._failures = 0
        self._greeted = False
        self.fill()
        self.outbox.update_gauges()
        self.outbox.offload(self.spool.clean_tmp)
        self.outbox.offload(self.spool.recover)  # claims of daemons that died meanwhile
        self.last_check = time.time()
        self.metrics.heartbeat.set(self.last_check)

    def watch(self) -> None:
        """Wake-ups: a new file in outgoing/ is seen at once (inotify) or within a second.

        With inotify the names it reports go straight into the index, and
        every change of outgoing/'s mtime is explained by an event. A change
        no event explains (another host on a shared filesystem) means a scan,
        as does an inotify overflow. Without inotify, the mtime is looked at
        every WAKE_POLL seconds and new names looked for at least every
        FORCED_WAKE seconds, since an mtime can stay the same across a change
        (coarse timestamps, NFS attribute caches, two renames in one tick).
        """
        notify = Inotify.open(self.spool.dir(OUTGOING))
        seen = None
        last = 0.0
        events = 0
        try:
            while not self.stopping:
                names = notify.wait(WAKE_POLL) if notify is not None else gevent.sleep(WAKE_POLL)
                if names:
                    self.outbox.arrived(names)
                    self.fill()
                now = self.spool.outgoing_mtime()
                if notify is None:
                    due = now != seen or time.monotonic() - last >= FORCED_WAKE
                else:  # an mtime change that no event explains, or lost events
                    due = notify.overflowed or (now != seen and notify.events == events)
                    due = due or time.monotonic() - last >= FORCED_WAKE_NOTIFIED
                    events = notify.events
                    notify.overflowed = False
                if due:
                    last = time.monotonic()
                    self.outbox.wakeup()
                    self.fill()
                seen = now
        finally:
            if notify is not None:
                notify.close()

    def stop(self) -> None:
        self.stopping = True
        self.outbox.stopping = True
        self._tick.set()

    # -- sessions ----------------------------------------------------------------

    def fill(self) -> int:
        """Open sessions for due messages, within the limits; returns how many."""
        if self.stopping or self._failures >= self.cfg.delivery.connect_tries:
            return 0
        free = min(self.pool.free_count(), self.throttle.current - len(self.pool))
        want = min(self.outbox.due_count() - self._starting, free)
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
        return self.outbox.due_count() == 0 or self._failures >= self.cfg.delivery.connect_tries
