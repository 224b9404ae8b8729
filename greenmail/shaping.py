"""Traffic shaping towards the relay: a message rate limit and the 421 back-off.

Owns: a token bucket shared by all sessions (``relay.rate_limit`` messages
per second) and the concurrency cut after a 421 ("service not available"),
restored after a while, so a relay that sheds load is not hammered.
Must not touch: sockets, claims, the spool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent

log = logging.getLogger("greenmail.shaping")
THROTTLE_SECONDS = 60.0


class RateLimiter:
    """At most ``rate`` messages per second over all sessions (0 = no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._next = 0.0

    def wait(self) -> None:
        if not self.rate:
            return
        now = self.clock()
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        if slot > now:
            gevent.sleep(slot - now)


class Throttle:
    """The connection limit, halved for a while after each 421 from the relay."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._current = limit
        self._until = 0.0

    def set_limit(self, limit: int) -> None:
        """A new configured limit (SIGHUP); a 421's halving in force stays until it ends."""
        self.limit = limit
        if not self._until:
            self._current = limit

    def on_421(self) -> None:
        self._current = max(1, self.current // 2)
        self._until = self.clock() + THROTTLE_SECONDS
        log.warning("relay answered 421: at most %d connections for %gs", self._current, THROTTLE_SECONDS)

    @property
    def current(self) -> int:
        if self._until and self.clock() >= self._until:
            self._current, self._until = self.limit, 0.0
        return self._current
