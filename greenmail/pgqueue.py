"""The shared queue as one node's delivery queue (queue.DeliveryQueue on PostgreSQL).

Owns: claims as leases (due messages taken in batches by one short
transaction, ``FOR UPDATE SKIP LOCKED``, committed before any SMTP traffic;
one claim at a time for all the node's sessions; a plan that walks the due index),
the heartbeat that renews this node's leases (a node that could not renew in
time stops before the final dot: ``Claim.keep``), settlements fenced by the
claim's lease token (a zero-row settlement is logged as a possible
duplicate), returning expired leases of any node, the node's row (its name
held by an advisory lock, so two daemons never share one), wake-ups by
LISTEN/NOTIFY with polling as the safety net, and the gauges of the whole
queue. Calls run on the hub: psycopg's waits yield to gevent (pgdb.py).
Must not touch: SMTP, backoff and notifications (the outbox decides), files of the spool.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gevent
from gevent.event import AsyncResult

from greenmail import layout, maillog, pgschema
from greenmail.errors import GreenmailError, LeaseLost, QueueUnavailable, SpoolError
from greenmail.pgpool import USE_TIMEOUT, Pool
from greenmail.pgsettle import Settler
from greenmail.pgstore import MESSAGE_COLUMNS, PgIncoming, open_body, state_of
from greenmail.queue import Claim

log = logging.getLogger("greenmail.queue")
BATCH = 64  # messages claimed in one round trip at most
EXPIRE = 256  # messages claimed in one round trip to be expired
POLL = 1.0  # seconds between looks for due mail when no notification came
COUNT_CAP = 10_000  # due messages counted at most (more than any node opens sessions for)
IN_CLAIM = 32 * 1024  # messages up to this size come with their claim (one chunk)
MARGIN = 0.2  # of a lease: a claim is given up this long before the lease would end
RETRY = 1.0  # seconds between tries while PostgreSQL cannot be reached
# A claim walks the due index in order and stops after n. The planner, whose statistics lag
# behind a burst (a queue filled since the last ANALYZE looks nearly empty), may prefer to fetch
# every due row and sort them: a cost that grows with the queue, paid by every claim.
SESSION = {"enable_sort": "off"}
_CLAIM = (  # {older}: an extra condition on the due messages (expiry's)
    "WITH picked AS (SELECT id, seen FROM greenmail_messages WHERE status = 'queued'"
    " AND next_attempt <= clock_timestamp(){older} ORDER BY next_attempt, queued_at"
    " LIMIT %(n)s FOR UPDATE SKIP LOCKED)"
    " UPDATE greenmail_messages m SET status = 'active', lease_owner = %(node)s,"
    " lease_until = clock_timestamp() + %(lease)s * interval '1 second',"
    " lease_token = nextval('greenmail_lease_tokens'), seen = true"
    " FROM picked WHERE m.id = picked.id"
    f" RETURNING {MESSAGE_COLUMNS}, m.lease_token,"
    " (SELECT c.data FROM greenmail_chunks c WHERE c.message_id = m.id AND c.seq = 0"
    "  AND m.size <= %(small)s), NOT picked.seen, m.source"
)
CLAIM = _CLAIM.format(older="")  # the due messages
CLAIM_OLDER = _CLAIM.format(older=" AND queued_at < to_timestamp(%(older)s)")  # expiry's
UNLEASE = "status = 'queued', lease_owner = NULL, lease_until = NULL, lease_token = NULL"  # claim returned


@dataclass(eq=False, kw_only=True)
class PgClaim(Claim):
    token: int
    queue: PgQueue
    first: bytes | None = None  # the whole message, when small enough to come with the claim
    next_at: float = 0.0
    taken: float = 0.0  # monotonic time of the claim
    lost: bool = False  # the heartbeat found its lease gone (expired and returned, or taken over)

    @property
    def in_memory(self) -> bool:
        """Reading never blocks the hub: short cooperative queries (or the bytes that came with the claim)."""
        return True

    def open_body(self) -> BinaryIO:
        return open_body(self.queue.pool.connection, self.id, self.size, self.first)

    def keep(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.id}: this node's lease on it ended (another node may have it)")
        if not self.queue.leases_valid():
            raise LeaseLost(f"{self.id}: this node's lease could not be renewed in time")


class PgQueue:
    """The delivery side of the shared queue for one node (one delivery process)."""

    def __init__(
        self,
        dsn: str,
        password_file: Path | None,
        lease: float,
        worker: tuple[int, int] = (0, 1),
        node: str | None = None,
        connections: int = 10,
        batch: int = BATCH,
    ) -> None:
        self.batch = max(1, min(batch, BATCH))  # claimed ahead: no more than the sessions will take
        self.slot_lease = min(lease, 30.0)  # a dead node's connection slots come back sooner than its mail
        self.node = f"{node or layout.HOST}/{worker[0]}"  # one name per delivery process
        self.lease = lease
        self.worker = worker
        self.pool = Pool(dsn, password_file, connections, f"greenmail {self.node}", SESSION)
        self.settler = Settler(self.pool, self._settled, self._trouble)
        self.stopping = False
        self._buffer: deque[PgClaim] = deque()  # claimed, not yet handed to a session
        self._claiming: AsyncResult | None = None  # the claim under way: True once it succeeded
        self._claims: dict[int, PgClaim] = {}  # ours by lease token: in the buffer or being delivered
        self._due = 0  # due messages in the queue, as last counted
        self._arrivals = 0  # received{source="local"}, not yet reported
        self._next_due: float | None = None
        self._renewed = 0.0  # monotonic time of the last renewal of our leases (or of the claims)
        self._control: Any = None  # holds the node's advisory lock; LISTENs
        self._recovered = False  # the claims of this node's previous run went back
        self._heartbeat: gevent.Greenlet | None = None
        self._gauges: tuple[dict[str, int], float] = ({}, 0.0)
        self.problem_text: str | None = None

    where = property(lambda self: f"postgresql node={self.node}")

    # -- life cycle ----------------------------------------------------------------

    def open(self) -> int:
        """Check the schema, take the node's name, return the claims a previous run of it left.

        PostgreSQL unreachable: the node starts anyway (unhealthy) and the watch connects later.
        """
        self._heartbeat = gevent.spawn(self._beat)
        try:
            return self._register(recover=True)
        except QueueUnavailable as e:
            self._trouble(e)
            return 0

    def _register(self, recover: bool) -> int:
        """The control connection: the schema checked, the node's name locked, its row; with
        ``recover``, the claims this node's previous run left go back to the queue."""
        self._control = self.pool.open()
        try:
            pgschema.check(self._control)
            self._lock_name()
            with self.pool.connection() as conn, conn.transaction():
                conn.execute(
                    "INSERT INTO greenmail_nodes (name, started, seen) VALUES (%s, now(), now())"
                    " ON CONFLICT (name) DO UPDATE SET seen = now(), outage_since = NULL, outage = NULL",
                    (self.node,),
                )
                back = 0
                if recover:
                    back = conn.execute(
                        f"UPDATE greenmail_messages SET {UNLEASE}"
                        " WHERE status = 'active' AND lease_owner = %s",
                        (self.node,),
                    ).rowcount
        except BaseException as e:
            self._control.close()
            self._control = None
            if isinstance(e, self.pool.pg.OperationalError):
                raise QueueUnavailable(f"PostgreSQL is unavailable: {e}") from None
            raise
        self._renewed = time.monotonic()
        self._recovered = True
        self._fine()
        return back

    def _lock_name(self) -> None:
        row = self._control.execute(
            "SELECT pg_try_advisory_lock(hashtext('greenmail node ' || %s))", (self.node,)
        ).fetchone()
        if not row[0]:
            raise SpoolError(f"another daemon runs as node {self.node} on this queue")

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.kill()
        while self._buffer:
            claim = self._buffer.popleft()
            self._put_back(claim)
        try:
            with self.pool.connection() as conn:
                conn.execute(
                    "UPDATE greenmail_nodes SET seen = now() - interval '1 day' WHERE name = %s", (self.node,)
                )
                conn.execute("DELETE FROM greenmail_slots WHERE node = %s", (self.node,))
        except GreenmailError as e:
            log.warning("cannot record this node's stop: %s", e)
        if self._control is not None:
            self._control.close()
        self.pool.close()

    def problem(self) -> str | None:
        return self.problem_text

    def _trouble(self, e: Exception) -> None:
        if self.problem_text is None:
            log.error("the shared queue: %s; trying again", e)
        self.problem_text = str(e)

    def _fine(self) -> None:
        if self.problem_text is not None:
            log.warning("PostgreSQL answers again")
            self.problem_text = None

    # -- what is due ---------------------------------------------------------------

    def refresh(self) -> int:
        """Count what is due, up to COUNT_CAP (and when the next waiting message is): two index scans."""
        with self.pool.connection() as conn:
            due, nxt = conn.execute(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM greenmail_messages WHERE status = 'queued'"
                "  AND next_attempt <= clock_timestamp() LIMIT %s) AS d),"
                " (SELECT extract(epoch FROM min(next_attempt))::float8 FROM greenmail_messages"
                "  WHERE status = 'queued' AND next_attempt > clock_timestamp())",
                (COUNT_CAP,),
            ).fetchone()
        self._due, self._next_due = int(due), nxt
        return self.due()

    def due(self) -> int:
        return len(self._buffer) + self._due

    def next_due(self) -> float | None:
        return self._next_due

    def take_arrivals(self) -> int:
        """New messages not taken by a listener, first claimed here since the last call (metrics)."""
        n, self._arrivals = self._arrivals, 0
        return n

    # -- claims --------------------------------------------------------------------

    def take(self) -> Claim | None:
        """The next claimed message. One claim at a time fills the buffer for every session that
        asks meanwhile (claims side by side would only skip each other's locked rows)."""
        while not self.stopping and not self._buffer and self._due > 0:
            if self._claiming is not None:
                if not self._claiming.wait(timeout=USE_TIMEOUT):  # it failed (or hung): none now
                    break
                continue  # its messages may all be taken already
            self._claiming = claiming = AsyncResult()
            ok = False
            try:
                self._claim(self._batch_size(), None)
                ok = True
            except GreenmailError as e:
                self._trouble(e)
            finally:
                self._claiming = None
                claiming.set(ok)
        return self._buffer.popleft() if self._buffer and not self.stopping else None

    def _batch_size(self) -> int:
        """How many to claim now: the sessions' worth, more when much is due (fewer round trips;
        a small burst is still shared between the nodes)."""
        return min(self._due, max(self.batch, min(BATCH, self._due // 8)))

    def take_older(self, than: float) -> Iterator[Claim]:
        """Expiry's claims: every due message queued before ``than``, EXPIRE at a time (as they are
        used: the bodies that come with claims stay few in memory)."""
        while True:
            try:
                got = self._claim(EXPIRE, than)
            except GreenmailError as e:
                self._trouble(e)
                return
            yield from got
            if len(got) < EXPIRE:
                return

    def _claim(self, n: int, older: float | None) -> list[PgClaim]:
        """Lease up to ``n`` due messages (oldest first) in one statement; buffered unless ``older``."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                CLAIM if older is None else CLAIM_OLDER,
                {"n": n, "node": self.node, "lease": self.lease, "older": older, "small": IN_CLAIM},
                binary=True,  # the body as bytes, not hex
            ).fetchall()
        self._fine()
        claims = [self._make(r) for r in sorted(rows, key=lambda r: (r[7], r[4]))]
        if older is None:
            self._due = 0 if len(claims) < n else max(0, self._due - len(claims))
            self._buffer.extend(claims)
        return claims

    def _make(self, row: Sequence[Any]) -> PgClaim:
        qid, sender, size, eight_bit, queued_at, _, attempts, next_at, last_error, warned, uid, rcpts = row[
            :12
        ]
        claim = PgClaim(
            id=qid,
            sender=sender,
            recipients=tuple(r[0] for r in rcpts),
            state=state_of(rcpts, last_error, warned, uid),
            size=size,
            queued_at=queued_at,
            attempts=attempts,
            eight_bit=eight_bit,
            token=row[12],
            queue=self,
            first=bytes(row[13]) if row[13] is not None else None,
            next_at=next_at,
            taken=time.monotonic(),
        )
        self._claims[claim.token] = claim
        if row[14]:  # entering the queue: the first claim by any node
            maillog.emit(log, *maillog.queue_entry(qid, sender, size, len(claim.recipients), uid))
            self._arrivals += row[15] == "local"  # the listener's were counted as it took them
        return claim

    def leases_valid(self) -> bool:
        """Whether our leases certainly still hold (renewed recently enough)."""
        return time.monotonic() < self._renewed + self.lease * (1 - MARGIN)

    def settle(self, claim: Claim, next_at: float) -> str:
        """Record an attempt by the claim's state: "delivered", "failed", or "deferred" until ``next_at``."""
        assert isinstance(claim, PgClaim)
        claim.settled = True
        pending = bool(claim.pending())
        if not pending and "failed" not in claim.state.recipients.values():
            self.settler.retire(claim)
            return "delivered"
        self.settler.requeue(claim, "queued" if pending else "failed", next_at if pending else 0, 1)
        return "deferred" if pending else "failed"

    def release(self, claim: Claim) -> None:
        """Back untouched: no attempt counted, due as before."""
        assert isinstance(claim, PgClaim)
        claim.settled = True
        self._put_back(claim)

    def _put_back(self, claim: PgClaim) -> None:
        self.settler.requeue(claim, "queued", claim.next_at, 0)

    def _settled(self, claim: PgClaim) -> None:
        self._claims.pop(claim.token, None)
        self._fine()

    def flush(self) -> None:
        self.settler.flush()

    # -- enqueue (the queue's own notifications; the listener) ----------------------

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        incoming = PgIncoming(self.pool.connection, sender, recipients)
        incoming.write(message if isinstance(message, bytes) else message.read())
        return incoming.commit()

    def incoming(self, sender: str, recipients: Sequence[str], trace: Any = None) -> PgIncoming:
        """A message written chunk by chunk (the listener, in a thread: its own connection to commit)."""
        return PgIncoming(self._own_connection, sender, recipients, trace, source="smtp")

    def _own_connection(self) -> Any:
        return self.pool.open()

    # -- the heartbeat, housekeeping, wake-ups, gauges ------------------------------------

    def _beat(self) -> None:
        """Renew this node's leases every third of a lease (at most every 10 s); retry settlements."""
        every = max(0.5, min(self.lease / 3, 10.0))
        while True:
            gevent.sleep(every)
            started = time.monotonic()
            try:
                with self.pool.connection() as conn:
                    held = conn.execute(
                        "UPDATE greenmail_messages"
                        " SET lease_until = clock_timestamp() + %s * interval '1 second'"
                        " WHERE status = 'active' AND lease_owner = %s RETURNING id, lease_token",
                        (self.lease, self.node),
                    ).fetchall()
                    conn.execute("UPDATE greenmail_nodes SET seen = now() WHERE name = %s", (self.node,))
                    conn.execute(
                        "UPDATE greenmail_slots SET until = clock_timestamp() + %s * interval '1 second'"
                        " WHERE node = %s",
                        (self.slot_lease, self.node),
                    )
                self._renewed = started
                self._mark_lost(set(map(tuple, held)), started)
                self.flush()
            except GreenmailError as e:
                self._trouble(e)

    def _mark_lost(self, held: set[tuple[Any, ...]], renewal: float) -> None:
        """Our claims taken before a renewal that the renewal did not find are no longer ours."""
        for claim in list(self._claims.values()):
            if claim.taken < renewal and (claim.id, claim.token) not in held and not claim.settled:
                claim.lost = True
                if claim in self._buffer:  # never handed out: forgotten (the queue has it again)
                    self._buffer.remove(claim)
                    self._claims.pop(claim.token, None)

    def maintain(self) -> None:
        """Every node's expired leases back to the queue; nodes gone a week forgotten; settlements retried."""
        self.flush()
        with self.pool.connection() as conn:
            back = conn.execute(
                f"UPDATE greenmail_messages SET {UNLEASE} WHERE status = 'active'"
                " AND lease_until < clock_timestamp()"
            ).rowcount
            conn.execute("DELETE FROM greenmail_nodes WHERE seen < now() - interval '7 days'")
        if back:
            log.warning("%d messages whose node's lease ended are back in the queue", back)

    def watch(self, woken: Callable[[], None], poked: Callable[[], None]) -> None:
        """Notifications wake the node at once; without them, due mail is looked for every POLL seconds."""
        while not self.stopping:
            try:
                if self._control is None or self._control.closed:
                    self._register(recover=not self._recovered)
                conn = self._control
                conn.execute(f"LISTEN {pgschema.CHANNEL}")
                while not self.stopping:
                    payloads = [n.payload for n in conn.notifies(timeout=POLL)]
                    if "wake" in payloads:
                        poked()
                    before = self.due()
                    if self.refresh() > before or (payloads and self.due()) or self._arrivals:
                        woken()  # (which also reports the arrivals)
                    self._fine()
            except (GreenmailError, self.pool.pg.Error) as e:
                self._trouble(e if isinstance(e, GreenmailError) else QueueUnavailable(str(e).strip()))
                if self._control is not None:
                    self._control.close()
                    self._control = None
                gevent.sleep(RETRY)

    def gauges(self) -> tuple[dict[str, int], float]:
        """Messages by state in the whole queue (delivery process 0 reports them) and the oldest's time."""
        if self.worker[0] != 0:
            return {}, 0.0
        try:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'queued' AND attempts = 0),"
                    " count(*) FILTER (WHERE status = 'queued' AND attempts > 0),"
                    " count(*) FILTER (WHERE status = 'active'), count(*) FILTER (WHERE status = 'failed'),"
                    " count(*) FILTER (WHERE status = 'held'), extract(epoch FROM min(queued_at))::float8"
                    " FROM greenmail_messages"
                ).fetchone()
            names = ("queued", "deferred", "active", "failed", "held")
            self._gauges = (dict(zip(names, map(int, row[:5]), strict=True)), row[5] or 0.0)
        except GreenmailError as e:
            self._trouble(e)
        return self._gauges

    def relay_status(self, outage: tuple[float, str] | None) -> None:
        since, why = outage if outage is not None else (None, None)
        try:
            with self.pool.connection() as conn:
                conn.execute(
                    "UPDATE greenmail_nodes SET outage_since = to_timestamp(%s), outage = %s WHERE name = %s",
                    (since, why, self.node),
                )
        except GreenmailError as e:
            log.warning("cannot record the relay's status: %s", e)
