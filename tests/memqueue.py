"""A queue backend in memory (queue.DeliveryQueue plus the admin calls the tests use): dicts, no files.

It keeps the spool's rules where sessions and the scheduler can see them:
a message enqueued is indexed (counted as due) only by ``refresh()`` or by a
wake-up of ``watch()``, a settled claim goes back into the index at once,
and ``take()`` gives the oldest due message first. Messages up to
``memory_limit`` bytes are handed out as ``in_memory`` claims; bigger ones
are claims whose ``open_body()`` the session must treat as blocking I/O
(they are still bytes here, so both of the session's body paths run).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from gevent.event import Event

from greenmail.layout import format_name, new_id
from greenmail.queue import Claim, Message, State

MEMORY_LIMIT = 32 * 1024  # as the spool: messages up to this size are read with the envelope


def _copy(state: State) -> State:
    return State.from_bytes(state.to_bytes())


@dataclass
class Record:
    """One stored message. ``place``: outgoing | active | failed."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes
    queued_at: float
    attempts: int = 0
    next_at: int = 0
    place: str = "outgoing"
    state: State | None = None  # None: no state stored (the spool's "no file in meta/")
    indexed: bool = False  # known to the delivery side (due() counts it)
    eight_bit: bool = False  # recorded at enqueue, as the spool does

    @property
    def name(self) -> str:
        return format_name(self.id, self.attempts, self.next_at)


@dataclass(eq=False, kw_only=True)
class MemClaim(Claim):
    body: bytes
    memory: bool = True
    opened: list[int] = field(default_factory=list)  # the threads open_body() was called in, for tests

    @property
    def in_memory(self) -> bool:
        return self.memory

    def open_body(self) -> BinaryIO:
        self.opened.append(threading.get_ident())
        return io.BytesIO(self.body)


class MemQueue:
    """DeliveryQueue in dicts; also ``retry``, ``wake``, ``write_state``, ``read_state`` (admin side)."""

    def __init__(self, clock: Callable[[], float] = time.time, memory_limit: int = MEMORY_LIMIT) -> None:
        self.clock = clock
        self.memory_limit = memory_limit
        self.stopping = False
        self.where = "memory"
        self.records: dict[str, Record] = {}  # insertion order is enqueue order: oldest first
        self.claims: dict[str, MemClaim] = {}
        self.outage: tuple[float, str] | None = None
        self.maintained = 0
        self._arrived = Event()
        self._poked = False

    # -- life cycle --------------------------------------------------------------

    def open(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def problem(self) -> str | None:
        return None

    # -- enqueue and the index ----------------------------------------------------

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        body = bytes(message) if isinstance(message, bytes | bytearray | memoryview) else message.read()
        qid = new_id()
        rcpts = tuple(recipients)
        self.records[qid] = Record(qid, sender, rcpts, body, self.clock(), eight_bit=not body.isascii())
        self._arrived.set()
        return qid

    def enqueue_many(self, messages: Iterable[Message]) -> list[str]:
        return [self.enqueue(*m) for m in messages]

    def refresh(self) -> int:
        for r in self.records.values():
            r.indexed = r.place == "outgoing"
        return self.due()

    def _due(self) -> list[Record]:
        now = self.clock()
        return [r for r in self.records.values() if r.indexed and r.place == "outgoing" and r.next_at <= now]

    def take_arrivals(self) -> int:
        return 0

    def due(self) -> int:
        return len(self._due())

    def next_due(self) -> float | None:
        now = self.clock()
        waiting = [r.next_at for r in self.records.values() if r.indexed and r.place == "outgoing"]
        return min((t for t in waiting if t > now), default=None)

    # -- claims ----------------------------------------------------------------------

    def take(self) -> Claim | None:
        if self.stopping:
            return None
        due = self._due()
        return self._claim(due[0]) if due else None

    def take_older(self, than: float) -> list[Claim]:
        return [self._claim(r) for r in self._due() if r.queued_at < than]

    def _claim(self, r: Record) -> MemClaim:
        r.place = "active"
        claim = MemClaim(
            id=r.id,
            sender=r.sender,
            recipients=r.recipients,
            state=_copy(r.state) if r.state is not None else State(),
            size=len(r.body),
            queued_at=r.queued_at,
            attempts=r.attempts,
            eight_bit=r.eight_bit,
            body=r.body,
            memory=len(r.body) <= self.memory_limit,
        )
        self.claims[r.id] = claim
        return claim

    def settle(self, claim: Claim, next_at: float) -> str:
        claim.settled = True
        r = self.records[claim.id]
        del self.claims[claim.id]
        failed = "failed" in claim.state.recipients.values()
        if not claim.pending() and not failed:
            del self.records[claim.id]
            return "delivered"
        r.attempts += 1
        r.state = _copy(claim.state)
        if claim.pending():
            self._back(r, int(next_at))
            return "deferred"
        r.place, r.next_at = "failed", 0
        return "failed"

    def release(self, claim: Claim) -> None:
        claim.settled = True
        r = self.records[claim.id]
        del self.claims[claim.id]
        if claim.state.recipients or claim.state.last_error:
            r.state = _copy(claim.state)
        self._back(r, r.next_at)

    def _back(self, r: Record, next_at: int) -> None:
        r.place, r.next_at, r.indexed = "outgoing", next_at, True

    # -- wake-ups, housekeeping, gauges ------------------------------------------------

    def watch(self, woken: Callable[[], None], poked: Callable[[], None]) -> None:
        """New messages are indexed and ``woken`` called; a ``wake()`` calls ``poked``."""
        while not self.stopping:
            self._arrived.wait(0.2)
            if not self._arrived.is_set():
                continue
            self._arrived.clear()
            if self._poked:
                self._poked = False
                poked()
            fresh = [r for r in self.records.values() if r.place == "outgoing" and not r.indexed]
            if fresh:
                for r in fresh:
                    r.indexed = True
                woken()

    def maintain(self) -> None:
        self.maintained += 1

    def gauges(self) -> tuple[dict[str, int], float]:
        waiting = [r for r in self.records.values() if r.place == "outgoing" and r.indexed]
        counts = {
            "queued": sum(1 for r in waiting if not r.attempts),
            "deferred": sum(1 for r in waiting if r.attempts),
            "active": len(self.claims),
            "failed": sum(1 for r in self.records.values() if r.place == "failed"),
            "held": 0,
        }
        return counts, min((r.queued_at for r in self.records.values()), default=0.0)

    def relay_status(self, outage: tuple[float, str] | None) -> None:
        self.outage = outage

    def flush(self) -> None:
        pass

    # -- the admin calls the tests use ---------------------------------------------------

    def retry(self, qid: str) -> bool:
        """Make one message due now (False: it was due already); a failed one goes back."""
        r = self.records[qid]
        if r.place == "outgoing" and not r.next_at:
            return False
        if r.place == "failed" and r.state is not None:
            r.state.recipients = {k: v for k, v in r.state.recipients.items() if v != "failed"}
            r.state.bounced = []
        r.place, r.next_at = "outgoing", 0
        return True

    def wake(self) -> bool:
        """Running daemons look at the queue now (`queue retry`, `sendmail -q`)."""
        self._poked = True
        self._arrived.set()
        return True

    def write_state(self, qid: str, state: State) -> None:
        self.records[qid].state = _copy(state)

    def read_state(self, qid: str) -> State:
        r = self.records.get(qid)
        return _copy(r.state) if r is not None and r.state is not None else State()

    def backdate(self, qid: str, when: float) -> None:
        self.records[qid].queued_at = when
