"""The queue interface: what delivery, the scheduler and the commands ask of a queue backend.

Owns: the types every backend shares (a message's delivery ``State``, the
``Claim`` a session delivers, the ``MessageInfo`` of a listing) and the two
interfaces: ``QueueAdmin`` (enqueue and the operator's commands, blocking
calls, as the CLI makes them) and ``DeliveryQueue`` (taking and settling
claims, wake-ups and housekeeping, as the daemon's greenlets make them).
The maildir spool (spool.py, spoolqueue.py) is one backend.
Must not touch: files, sockets, SMTP, gevent, metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

from greenmail.errors import CorruptQueueFile

SETTLED = ("delivered", "failed")  # a recipient in one of these states is never tried again


@dataclass
class State:
    """Delivery state of one message.

    ``recipients`` records the recipients that are settled for good
    ("delivered" or "failed"); any other recipient is still to be tried.
    ``errors`` holds each recipient's last reply; ``bounced`` lists the failed
    recipients the sender was already told about; ``warned`` is set once a
    "still trying" notice went out.
    """

    recipients: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    errors: dict[str, str] = field(default_factory=dict)
    bounced: list[str] = field(default_factory=list)
    warned: bool = False
    uid: int | None = None  # who submitted it, when not the queue file's owner (a local user's pickup)

    def pending(self, recipients: Iterable[str]) -> tuple[str, ...]:
        if not self.recipients:  # none settled yet (most messages, most of the time)
            return tuple(recipients)
        return tuple(r for r in recipients if r not in self.recipients)

    def unreported_failures(self) -> list[str]:
        return [r for r, s in self.recipients.items() if s == "failed" and r not in self.bounced]

    def to_bytes(self) -> bytes:
        raw = asdict(self)
        if raw["uid"] is None:
            del raw["uid"]
        return json.dumps(raw, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> State:
        try:
            raw = json.loads(data)
            return cls(
                dict(raw.get("recipients", {})),
                raw.get("last_error"),
                dict(raw.get("errors", {})),
                list(raw.get("bounced", [])),
                bool(raw.get("warned", False)),
                raw.get("uid") if isinstance(raw.get("uid"), int) else None,
            )
        except (ValueError, AttributeError, TypeError):
            raise CorruptQueueFile("unreadable delivery state") from None


@dataclass(eq=False)
class Claim:
    """A message taken for one delivery attempt. Only its queue moves it; the outbox updates ``state``."""

    id: str
    sender: str  # "" is the null sender
    recipients: tuple[str, ...]
    state: State
    size: int  # message bytes
    queued_at: float
    attempts: int  # attempts before this one
    eight_bit: bool  # the message has bytes outside ASCII (recorded at enqueue)
    settled: bool = False  # delivered, requeued or failed: nothing more may happen to it

    def pending(self) -> tuple[str, ...]:
        """The recipients still to be tried."""
        return self.state.pending(self.recipients)

    def open_body(self) -> BinaryIO:
        """The message, read from its start (blocking I/O, unless ``in_memory``)."""
        raise NotImplementedError

    @property
    def in_memory(self) -> bool:
        """Whether the message is held in memory: opening and reading it never blocks."""
        return False

    def keep(self) -> None:
        """Raise LeaseLost when this claim may no longer be sent (a shared queue's lease not renewed in
        time); the session asks just before the message's final dot. A spool's claim never expires."""

    def read_head(self, limit: int) -> bytes:
        """The first ``limit`` bytes of the message (for notifications); blocking I/O."""
        with self.open_body() as f:
            return f.read(limit)


def iso_time(ts: float) -> str:
    """A time as ``queue list`` shows it: ISO 8601, UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def relay_waiting(since: float, why: str) -> str:
    """MessageInfo.waiting while the relay cannot be reached."""
    return f"relay unreachable since {iso_time(since)}: {why}"


@dataclass
class MessageInfo:
    """One message as ``greenmail queue list`` shows it."""

    id: str
    state: str  # queued | deferred | active | failed | held
    sender: str
    recipients: list[str]
    size: int
    attempts: int
    queued_at: str
    next_attempt: str | None
    last_error: str | None
    recipient_states: dict[str, str]
    waiting: str | None = None  # why a due message is not being sent (the relay's outage), if known

    def as_json(self) -> dict[str, object]:
        return asdict(self)


Message = tuple[str, Sequence[str], bytes | BinaryIO]  # (sender, recipients, the message)


class QueueAdmin(Protocol):
    """Enqueue and the operator's commands; blocking calls, safe while daemons run."""

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str: ...

    def enqueue_many(self, messages: Iterable[Message]) -> list[str]: ...

    def incoming(
        self, sender: str, recipients: Sequence[str], trace: Any = None
    ) -> Any: ...  # write/commit/abort

    def list(self) -> list[MessageInfo]: ...

    def show(self, qid: str) -> tuple[MessageInfo, BinaryIO]: ...  # NotFound

    def delete(self, qid: str) -> None: ...  # NotFound, MessageBusy

    def delete_failed(self) -> int: ...

    def hold(self, qid: str) -> bool: ...  # False: was held already

    def release_hold(self, qid: str) -> bool: ...  # False: was not held

    def retry(self, qid: str) -> bool: ...  # False: was due already

    def retry_all(self) -> int: ...

    def wake(self) -> bool: ...  # running daemons look at the queue now (outage forgotten); any running?


class DeliveryQueue(Protocol):
    """The daemon's side: claims, their settlement, wake-ups and housekeeping (greenlet calls)."""

    stopping: bool  # once set, take() gives nothing more
    where: str  # for the start-up line, e.g. "spool=/var/spool/greenmail"

    def open(self) -> int: ...  # before delivery: set up, announce this daemon, recover; claims returned

    def close(self) -> None: ...

    def problem(self) -> str | None: ...  # why the queue cannot take mail now (for /healthz), if so

    def refresh(self) -> int: ...  # the periodic full look; returns how many are due

    def due(self) -> int: ...

    def next_due(self) -> float | None: ...  # when the next waiting message becomes due

    def take(self) -> Claim | None: ...

    def take_arrivals(self) -> int: ...  # new messages seen arriving since the last call (metrics)

    def take_older(self, than: float) -> Iterable[Claim]: ...  # due messages enqueued before ``than``

    def settle(self, claim: Claim, next_at: float) -> str: ...  # "delivered" | "deferred" | "failed"

    def release(self, claim: Claim) -> None: ...  # back untouched, due as before

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str: ...

    def watch(self, woken: Callable[[], None], poked: Callable[[], None]) -> None: ...  # runs forever

    def maintain(self) -> None: ...  # recovery of dead claims, stale files, unsettled claims

    def gauges(self) -> tuple[dict[str, int], float]: ...  # messages by state, oldest enqueue time

    def relay_status(self, outage: tuple[float, str] | None) -> None: ...  # (since, why), or None: reachable

    def flush(self) -> None: ...  # everything settled so far is durable
