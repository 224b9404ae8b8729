"""One SMTP session to the relay, run by one greenlet: a small I/O loop over the client protocol.

Owns: taking due messages from the outbox one after another on one
connection (opened, secured and authenticated by connection.py); for each,
its transactions: sending what the protocol (protocol.py) allows now, in one
write (with PIPELINING: MAIL, the RCPTs and DATA together, and the next
message's behind the end of this one), reading the replies it expects, the
body dot-stuffed after DATA or in BDAT chunks with CHUNKING, and the
per-recipient results reported to the outbox; QUIT when nothing is due. One
try/except per message guarantees each claim ends delivered, requeued or
failed exactly once, whatever happens.
Must not touch: delivery state and where a message lives (the outbox and the
queue decide), the schedule.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from gevent import GreenletExit

from greenmail import esmtp, maillog, wire
from greenmail.connection import Connection, Transport
from greenmail.errors import LeaseLost, SmtpError
from greenmail.outbox import Attempt, Outbox
from greenmail.protocol import Cmd, Phase, Rcpt, Transaction
from greenmail.queue import Claim
from greenmail.shaping import RateLimiter

log = logging.getLogger("greenmail.session")
CHUNK = 64 * 1024
STATUS = {Rcpt.DELIVERED: "sent", Rcpt.DEFERRED: "deferred", Rcpt.FAILED: "bounced"}


def _read_here(f: BinaryIO, size: int) -> bytes:
    return f.read(size)


@dataclass(eq=False)
class Taken:
    """A message this session took: its transaction under way (maybe sent ahead) and the results so far."""

    claim: Claim
    txn: Transaction | None = None
    attempt: Attempt = field(default_factory=Attempt)


class Session:
    """Deliver due messages over one connection; ``run()`` is the greenlet body."""

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        on_greeted: Callable[..., None] = lambda ok, why=None: None,
        limiter: RateLimiter | None = None,
        offload: Callable[..., Any] | None = None,
    ) -> None:
        self.tp = transport
        self.outbox = outbox
        self.metrics = transport.metrics
        self.on_greeted = on_greeted
        self.limiter = limiter
        self.offload = offload
        self.conn = Connection(transport)
        self.client = self.conn.client  # the connection's protocol state (a new one per connect)
        self._sent = 0  # messages delivered on this connection
        self._connected = 0.0  # when the connection began to be opened (time.time(), for delays=)
        self._began = 0.0  # when the message being delivered began its turn
        self._inflight: deque[Taken] = deque()  # taken, in order; the head is being delivered

    @property
    def relay(self) -> str:
        return self.conn.relay

    def run(self) -> None:
        started = time.monotonic()
        self._connected = time.time()
        self.metrics.active += 1
        try:
            try:
                self.conn.open()
            except SmtpError as e:
                log.warning("connect to %s: %s", self.relay, e)
                self.on_greeted(False, str(e))
                return
            self.client = self.conn.client
            self._deliver_all()
        finally:
            self.conn.close()
            self.metrics.active -= 1
            self.metrics.observe("session", time.monotonic() - started)

    # -- messages ----------------------------------------------------------------

    def _deliver_all(self) -> None:
        claim = self.outbox.take()
        self.on_greeted(True)  # after the first take: the scheduler counts due messages
        if claim is not None:
            self._inflight.append(Taken(claim))
        cap = self.tp.relay.max_messages_per_connection
        reason = "connection"
        try:
            while self._inflight:
                fit = self._deliver(self._inflight[0])
                self._inflight.popleft()
                if not fit:
                    return
                self._sent += 1
                if cap and self._sent >= cap:
                    break
                if not self._inflight and (nxt := self.outbox.take()) is not None:
                    self._inflight.append(Taken(nxt))
            self.conn.quit()
        except GreenletExit:
            reason = "shutdown"
            raise
        finally:
            for taken in self._inflight:  # taken, perhaps sent ahead, no reply read: never attempted
                if not taken.claim.settled:
                    self.outbox.release(taken.claim, reason)
            self._inflight.clear()

    def _deliver(self, taken: Taken) -> bool:
        """One message; True when the connection is fit for the next one."""
        self._began = time.time()
        claim = taken.claim
        try:
            if not claim.pending():  # settled before a crash: nothing to send
                self.outbox.finish(claim)
                return True
            try:
                self._attempt(taken)
            except SmtpError as e:
                self._connection_failed(taken, e)
                return False
            self.outbox.finish(claim, taken.attempt)
        except LeaseLost as e:  # the message is no longer ours: the connection ends before its final dot
            log.warning("%s; not sent (the connection is closed before the final dot)", e)
            self._interrupted(taken, e)
            return False
        except BaseException as e:
            self._interrupted(taken, e)
            raise
        txn = taken.txn
        assert txn is not None
        if self.client.closing is not None:
            return False  # after a 421 the connection is over: no RSET, no QUIT
        if txn.count(Rcpt.DELIVERED) == len(txn.recipients) or not txn.opened or len(self._inflight) > 1:
            return True  # (after the final dot the transaction is over: the next MAIL may be sent already)
        return self._rset()

    def _interrupted(self, taken: Taken, e: BaseException) -> None:
        """A kill or a bug in the middle of a message: its claim still ends exactly once."""
        claim, txn = taken.claim, taken.txn
        if txn is not None and txn.final_sent and txn.final is None:
            log.warning("%s: stopped while waiting for the final reply: may be delivered twice", claim.id)
        if claim.settled:
            return
        if isinstance(e, GreenletExit) and not taken.attempt.results:
            self.outbox.release(claim, "shutdown")
            return
        if isinstance(e, LeaseLost):
            taken.attempt.error = str(e)
        elif not isinstance(e, GreenletExit):
            log.error("%s: internal error, requeued: %r", claim.id, e)
            taken.attempt.error = f"internal error: {e!r}"
        taken.attempt.reason = "shutdown" if isinstance(e, GreenletExit) else "connection"
        self.outbox.finish(claim, taken.attempt)  # what the relay accepted so far is never sent again

    def _attempt(self, taken: Taken) -> None:
        """As many transactions as the relay's 452 "too many recipients" asks for; their results."""
        claim, attempt = taken.claim, taken.attempt
        while True:
            if taken.txn is None:
                taken.txn = self._begin(claim, [r for r in claim.pending() if r not in attempt.results])
            txn = taken.txn
            self._run(claim, txn)
            self._record(claim, txn, attempt)
            if not (txn.overflow and txn.count(Rcpt.DELIVERED)) or self.client.closing is not None:
                return
            taken.txn = None

    def _begin(self, claim: Claim, recipients: list[str]) -> Transaction:
        """A claim's next transaction, with its commands planned (none: nothing to send)."""
        ext = self.conn.extensions
        txn = Transaction(tuple(recipients))
        utf8 = esmtp.precheck(txn, ext, claim.size, claim.sender)
        if txn.to_send:
            params = esmtp.mail_params(ext, claim.size, "8BITMIME" in ext and claim.eight_bit, utf8)
            txn.plan(wire.command("MAIL", f"FROM:<{claim.sender}>{params}"), data=not self._chunking())
        return txn

    def _pipelining(self) -> bool:
        return self.client.pipelining

    def _chunking(self) -> bool:
        return self.tp.relay.chunking and "CHUNKING" in self.conn.extensions

    def _run(self, claim: Claim, txn: Transaction) -> None:
        """The transaction's commands and replies; then its message, and the final reply."""
        if txn.planned and self.limiter is not None:
            self.limiter.wait()
        self._exchange(txn)
        if self.client.closing is not None:
            return
        if txn.data_ok:
            self._dot_body(claim, txn)
        elif self._chunking() and txn.mail_ok and txn.wants_data and txn.opened:
            self._bdat(claim, txn)
        elif self.client.phase is Phase.BODY:  # DATA accepted with no recipient: end the empty message
            self.conn.send(self.conn.push(Cmd.END, b".\r\n", txn), "message", self.tp.timeouts.data_block)
            self._exchange(txn)
            return
        else:
            return
        self._exchange(txn)

    def _exchange(self, txn: Transaction) -> None:
        """Send what the protocol allows of ``txn``'s commands; read until none of its replies is due."""
        while True:
            out, label = self._commands(txn)
            if out:
                self.conn.send(out, label)
            if not txn.outstanding:
                return
            expect, reply = self.conn.read()
            if expect.txn is not None:
                expect.txn.on_reply(expect, reply)
            closing = self.client.closing
            if closing is not None:  # 421: what is unsettled is deferred; nothing more is read
                txn.defer_rest(closing)
                return

    def _commands(self, txn: Transaction) -> tuple[bytes, str]:
        """The transaction's planned commands that may go now (recorded as sent), and the first one's stage.

        No DATA once every RCPT was refused.
        """
        planned, out, label = txn.planned, b"", ""
        while planned:
            p = planned[0]
            if p.cmd is Cmd.DATA and not txn.outstanding and not txn.wants_data:
                planned.clear()  # every recipient refused: no DATA
                break
            data = self.conn.offer(p.cmd, p.line, txn, p.rcpt)
            if data is None:
                break
            planned.popleft()
            out += data
            label = label or p.cmd.value
        return out, label

    def _ahead(self, txn: Transaction) -> bytes:
        """The next message's commands, to go in the same write as this message's end (RFC 2920 3.1).

        Only when nothing has to happen in between: pipelining, no recipient
        of this message left for another transaction (452), no rate limit,
        the per-connection cap not reached.
        """
        cap = self.tp.relay.max_messages_per_connection
        if (
            txn.overflow
            or not self._pipelining()
            or (self.limiter is not None and self.limiter.rate)
            or (cap and self._sent + 1 >= cap)
            or len(self._inflight) > 1
        ):
            return b""
        claim = self.outbox.take()
        if claim is None:
            return b""
        nxt = self._begin(claim, list(claim.pending()))
        nxt.ahead = True
        self._inflight.append(Taken(claim, nxt))
        return self._commands(nxt)[0]

    def _open_body(self, claim: Claim) -> tuple[BinaryIO, Callable[[BinaryIO, int], bytes]]:
        """The message, and how to read it: off the hub unless it is in memory."""
        offload = self.offload
        if offload is None or claim.in_memory:
            return claim.open_body(), _read_here
        return offload(claim.open_body), lambda fh, size: offload(fh.read, (size,))

    def _dot_body(self, claim: Claim, txn: Transaction) -> None:
        self.metrics.stage("message")
        self.client.body()
        stuffer = wire.DotStuffer()
        t = self.tp.timeouts.data_block
        f, read = self._open_body(claim)
        with f:
            chunk = read(f, CHUNK)
            while True:
                nxt = read(f, CHUNK) if chunk else b""
                out = stuffer.feed(chunk)
                if not nxt:  # the last chunk goes with the final dot (and the next MAIL), in one write
                    claim.keep()  # still ours to send (a shared queue's lease)
                    out += self.conn.push(Cmd.END, stuffer.finish(), txn)
                    txn.final_sent = True
                    out += self._ahead(txn)
                self.conn.send(out, "message", t)
                if not nxt:
                    break
                chunk = nxt

    def _bdat(self, claim: Claim, txn: Transaction) -> None:
        """RFC 3030 CHUNKING: the body in BDAT chunks, line endings normalised, no dot-stuffing."""
        self.metrics.stage("data")
        self.metrics.stage("message")
        norm = wire.LineNormaliser()
        t = self.tp.timeouts.data_block
        f, read = self._open_body(claim)
        with f:
            raw = read(f, CHUNK)
            while True:
                nxt = read(f, CHUNK) if raw else b""
                data = norm.feed(raw)
                if not nxt:  # the last chunk: BDAT ... LAST (a small message: the only one)
                    break
                if data:
                    chunk = self.conn.push(Cmd.BDAT, f"BDAT {len(data)}\r\n".encode() + data, txn)
                    self.conn.send(chunk, "data", t)
                    self._exchange(txn)
                    if txn.final is not None or self.client.closing is not None:
                        return  # the relay refused the message part-way
                raw = nxt
            data += norm.finish()
            claim.keep()  # still ours to send (a shared queue's lease)
            last = self.conn.push(Cmd.BDAT_LAST, f"BDAT {len(data)} LAST\r\n".encode() + data, txn)
            txn.final_sent = True
            self.conn.send(last + self._ahead(txn), "data", t)

    def _record(self, claim: Claim, txn: Transaction, attempt: Attempt) -> None:
        """A transaction's per-recipient results into the attempt, and the delivery log lines."""
        logged = log.isEnabledFor(logging.INFO)
        for rcpt, result in txn.results.items():
            reply = txn.replies[rcpt]
            text = str(reply)
            attempt.results[rcpt] = (result.value, text)
            if logged:
                self._log_rcpt(claim, rcpt, STATUS[result], reply.enhanced or f"{reply.cls}.0.0", text)
        if txn.error is not None:
            attempt.error = str(txn.error)

    def _connection_failed(self, taken: Taken, e: SmtpError) -> None:
        """The connection failed during this message: requeued with backoff (untouched if sent ahead)."""
        claim, txn = taken.claim, taken.txn
        if txn is not None and txn.ahead and not txn.answered:
            self.outbox.release(claim, e.reason)  # its commands went behind the last message's end: not tried
            return
        if txn is not None and txn.final_sent and txn.final is None:
            log.warning("%s: connection lost after the final dot: may be delivered twice", claim.id)
        error = f"{e} (stage {e.stage})"
        pending = [r for r in claim.pending() if r not in taken.attempt.results]
        taken.attempt.results.update((r, ("deferred", error)) for r in pending)
        taken.attempt.error, taken.attempt.reason = error, e.reason
        self.outbox.finish(claim, taken.attempt)
        for rcpt in pending:
            self._log_rcpt(claim, rcpt, "deferred", "4.4.2", error)

    def _rset(self) -> bool:
        try:
            self.conn.send(self.conn.push(Cmd.RSET, b"RSET\r\n"), "mail")
            _, reply = self.conn.read()  # not a stage: neither reached nor its reply counted
        except SmtpError as e:
            log.info("RSET to %s failed: %s", self.relay, e)
            return False
        return reply.cls == 2

    def _log_rcpt(self, claim: Claim, rcpt: str, status: str, dsn: str, reply: str) -> None:
        """The Postfix-style line for one recipient of one attempt (fields also for --log-format json)."""
        timing = maillog.Timing(
            claim.queued_at, self.outbox.started, self._connected, self._sent == 0, self._began
        )
        line, fields = maillog.delivery(
            claim.id, rcpt, self.conn.relay, timing, (dsn, status, reply), claim.attempts + 1
        )
        maillog.emit(log, line, fields)
