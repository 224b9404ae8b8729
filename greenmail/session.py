"""One SMTP session to the relay, run by one greenlet.

Owns: taking due messages from the outbox one after another on one
connection (opened, secured and authenticated by connection.py), each as a
transaction (pipelined when the relay offers PIPELINING; the body dot-stuffed
after DATA, or in BDAT chunks with CHUNKING), recording each recipient's
result, QUIT when nothing is due. One try/except per message guarantees each
claim ends delivered, requeued or failed exactly once, whatever happens.
Must not touch: directory paths and renames (the outbox does), the schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gevent import GreenletExit

from greenmail import esmtp, wire
from greenmail.connection import Connection, Transport
from greenmail.errors import ProtocolError, SmtpError
from greenmail.outbox import Outbox
from greenmail.protocol import Rcpt, Stage, Transaction
from greenmail.shaping import RateLimiter
from greenmail.spool import Claim

log = logging.getLogger("greenmail.session")
CHUNK = 64 * 1024
STATUS = {Rcpt.DELIVERED: "sent", Rcpt.DEFERRED: "deferred", Rcpt.FAILED: "bounced"}


class Session:
    """Deliver due messages over one connection; ``run()`` is the greenlet body."""

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        on_greeted: Callable[[bool], None] = lambda ok: None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.tp = transport
        self.t = transport.timeouts
        self.outbox = outbox
        self.metrics = transport.metrics
        self.on_greeted = on_greeted
        self.limiter = limiter
        self.conn = Connection(transport)
        self._mid_message = False  # the final dot is sent, its reply not yet read
        self._sent = 0  # messages delivered on this connection
        self._next: Claim | None = None  # claimed while the previous message was ending
        self._ahead: Transaction | None = None  # _next's transaction, its commands already sent

    @property
    def relay(self) -> str:
        return self.conn.relay

    def run(self) -> None:
        started = time.monotonic()
        self.metrics.active.inc()
        try:
            try:
                self.conn.open()
            except SmtpError as e:
                log.warning("connect to %s: %s", self.relay, e)
                self.on_greeted(False)
                return
            self._deliver_all()
        finally:
            self.conn.close()
            self.metrics.active.dec()
            self.metrics.session_duration.observe(time.monotonic() - started)

    # -- messages ----------------------------------------------------------------

    def _deliver_all(self) -> None:
        claim = self.outbox.take()
        self.on_greeted(True)  # after the first take: the scheduler counts due messages
        cap = self.tp.relay.max_messages_per_connection
        try:
            while claim is not None:
                if not self._deliver(claim):
                    return
                self._sent += 1
                if cap and self._sent >= cap:
                    break
                claim, self._next = self._next or self.outbox.take(), None
            self.conn.quit()
        except BaseException as e:
            if self._next is not None:  # claimed ahead, its commands perhaps sent, no reply read
                self._put_back(self._next, "shutdown" if isinstance(e, GreenletExit) else "connection")
            raise
        finally:
            if self._next is not None:
                self._put_back(self._next, "connection")

    def _put_back(self, claim: Claim, reason: str) -> None:
        """Return the message claimed ahead: never attempted, so due again at once."""
        self._next = self._ahead = None
        self.outbox.release(claim, reason, attempt=False)

    def _deliver(self, claim: Claim) -> bool:
        """One message; True when the connection is fit for the next one."""
        try:
            if not claim.state.pending(claim.envelope):  # settled before a crash: nothing to send
                self.outbox.finish(claim, "temporary")
                return True
            try:
                txn = self._transactions(claim)
            except SmtpError as e:
                self._connection_failed(claim, e)
                return False
            self.outbox.finish(claim, "temporary")
        except BaseException as e:
            if self._mid_message:
                log.warning("%s: stopped while waiting for the final reply: may be delivered twice", claim.id)
            if not claim.settled:
                reason = "shutdown" if isinstance(e, GreenletExit) else "connection"
                if reason != "shutdown":
                    log.error("%s: internal error, requeued: %r", claim.id, e)
                self.outbox.release(claim, reason)
            raise
        if self.conn.closing is not None:
            return False  # after a 421 the connection is over: no RSET, no QUIT
        if txn.count(Rcpt.DELIVERED) == len(txn.recipients) or not txn.opened or self._ahead is not None:
            return True  # (after the final dot the transaction is over: the next MAIL is already sent)
        return self._rset()

    def _transactions(self, claim: Claim) -> Transaction:
        """As many transactions as the relay's 452 "too many recipients" asks for."""
        while True:
            txn = self._transaction(claim)
            if not (txn.overflow and txn.count(Rcpt.DELIVERED)) or self.conn.closing is not None:
                return txn

    def _transaction(self, claim: Claim) -> Transaction:
        if self._ahead is not None:  # this is _next: its commands went with the last dot
            txn, self._ahead = self._ahead, None
            self._pipelined_replies(claim, txn)
        else:
            txn, mail = self._begin(claim)
            if mail is not None:
                if self.limiter is not None:
                    self.limiter.wait()
                if self._pipelining():
                    self.conn.send_commands(self._group(txn, mail))
                    self._pipelined_replies(claim, txn)
                else:
                    self._one_by_one(claim, txn, mail)
        self._apply(claim, txn)
        return txn

    def _begin(self, claim: Claim) -> tuple[Transaction, bytes | None]:
        """A claim's next transaction, and its MAIL command (None: nothing to send)."""
        env = claim.envelope
        ext = self.conn.extensions
        txn = Transaction(claim.state.pending(env))
        utf8 = esmtp.precheck(txn, ext, claim.size, env.sender)
        if not txn.to_send:
            return txn, None
        eight_bit = "8BITMIME" in ext and (
            claim.eight_bit if claim.eight_bit is not None else esmtp.is_8bit(claim.path, env.body_offset)
        )
        params = esmtp.mail_params(ext, claim.size, eight_bit, utf8)
        txn.opened = True
        return txn, wire.command("MAIL", f"FROM:<{env.sender}>{params}")

    def _pipelining(self) -> bool:
        return self.tp.relay.pipelining and "PIPELINING" in self.conn.extensions

    def _group(self, txn: Transaction, mail: bytes) -> list[tuple[bytes, Stage]]:
        """RFC 2920: MAIL, every RCPT (and DATA) in one write; replies matched in order."""
        lines = [(mail, Stage.MAIL)] + [(wire.rcpt_to(r), Stage.RCPT) for r in txn.to_send]
        if not self._chunking():
            lines.append((b"DATA\r\n", Stage.DATA))
        return lines

    def _next_group(self, txn: Transaction) -> bytes:
        """The next message's commands, to go in the same write as this message's end (RFC 2920 3.1).

        Only when nothing has to happen in between: pipelining, no recipient
        of this message left for another transaction (452), no rate limit,
        the per-connection cap not reached. The claim is kept in ``_next``.
        """
        cap = self.tp.relay.max_messages_per_connection
        if (
            txn.overflow
            or not self._pipelining()
            or (self.limiter is not None and self.limiter.rate)
            or (cap and self._sent + 1 >= cap)
        ):
            return b""
        claim = self._next = self.outbox.take()
        if claim is None:
            return b""
        nxt, mail = self._begin(claim)
        if mail is None:
            return b""  # nothing to send for it: settled as usual when its turn comes
        self._ahead = nxt
        return self.conn.encode_commands(self._group(nxt, mail))

    def _chunking(self) -> bool:
        return self.tp.relay.chunking and "CHUNKING" in self.conn.extensions

    def _one_by_one(self, claim: Claim, txn: Transaction, mail: bytes) -> None:
        if not txn.on_mail(self.conn.command(mail, Stage.MAIL, self.t.command)):
            return
        for rcpt in txn.to_send:
            if txn.overflow:  # the relay said 452: the rest go in the next transaction
                txn.overflow.append(rcpt)
            else:
                txn.on_rcpt(rcpt, self.conn.command(wire.rcpt_to(rcpt), Stage.RCPT, self.t.command))
                if self._closing(txn):
                    return
        if not txn.wants_data:
            return
        if self._chunking():
            self._bdat(claim, txn)
        elif txn.on_data(self.conn.command(b"DATA\r\n", Stage.DATA, self.t.data_init)):
            self._dot_body(claim, txn)

    def _pipelined_replies(self, claim: Claim, txn: Transaction) -> None:
        """The replies to a pipelined group, in order; then the message."""
        rcpts = txn.to_send
        chunking = self._chunking()
        mail_ok = txn.on_mail(self.conn.read(Stage.MAIL, self.t.command))
        if self._closing(txn):
            return
        for rcpt in rcpts:
            reply = self.conn.read(Stage.RCPT, self.t.command)
            if mail_ok:
                txn.on_rcpt(rcpt, reply)
            if self._closing(txn):
                return
        if chunking:
            if mail_ok and txn.wants_data:
                self._bdat(claim, txn)
            return
        reply = self.conn.read(Stage.DATA, self.t.data_init)
        if mail_ok and txn.wants_data:
            if txn.on_data(reply):
                self._dot_body(claim, txn)
        elif reply.cls == 3:  # DATA accepted with no recipient: end the empty message at once
            self.conn.send(b".\r\n", "message", self.t.data_block)
            self.conn.read(None, self.t.data_end)

    def _closing(self, txn: Transaction) -> bool:
        """After a 421 nothing more is read or sent: what is unsettled is deferred."""
        if self.conn.closing is None:
            return False
        txn.defer_rest(self.conn.closing)
        return True

    def _dot_body(self, claim: Claim, txn: Transaction) -> None:
        self.metrics.stage_reached.labels(stage="message").inc()
        if self.conn.parser.pending:
            raise ProtocolError("the relay sent a reply ahead of the message", "message")
        stuffer = wire.DotStuffer()
        with claim.open_body() as f:
            chunk = f.read(CHUNK)
            while True:
                nxt = f.read(CHUNK) if chunk else b""
                out = stuffer.feed(chunk)
                if not nxt:  # the last chunk goes with the final dot (and the next MAIL), in one write
                    out += stuffer.finish() + self._next_group(txn)
                self.conn.send(out, "message", self.t.data_block)
                if not nxt:
                    break
                chunk = nxt
        self._final_reply(txn)

    def _bdat(self, claim: Claim, txn: Transaction) -> None:
        """RFC 3030 CHUNKING: the body in BDAT chunks, line endings normalised, no dot-stuffing."""
        self.metrics.stage_reached.labels(stage="data").inc()
        self.metrics.stage_reached.labels(stage="message").inc()
        norm = wire.LineNormaliser()
        with claim.open_body() as f:
            raw = f.read(CHUNK)
            while True:
                nxt = f.read(CHUNK) if raw else b""
                data = norm.feed(raw)
                if not nxt:  # the last chunk: BDAT ... LAST (a small message: the only one)
                    break
                if data:
                    head = f"BDAT {len(data)}\r\n".encode()
                    self.conn.send_commands([(head + data, Stage.DATA)], count=False)
                    reply = self.conn.read(Stage.DATA, self.t.data_block)
                    if reply.cls != 2:
                        txn.on_message(reply)  # the relay refused the message part-way
                        return
                raw = nxt
            data += norm.finish()
            last = f"BDAT {len(data)} LAST\r\n".encode() + data
            self.conn.send_commands([(last + self._next_group(txn), Stage.DATA)], count=False)
        self._final_reply(txn)

    def _final_reply(self, txn: Transaction) -> None:
        self._mid_message = True
        txn.on_message(self.conn.read(Stage.MESSAGE, self.t.data_end))
        self._mid_message = False

    def _apply(self, claim: Claim, txn: Transaction) -> None:
        """Record a transaction's per-recipient results in the claim's state."""
        state = claim.state
        for rcpt, result in txn.results.items():
            reply = txn.replies[rcpt]
            if result is Rcpt.DELIVERED:
                state.recipients[rcpt] = "delivered"
            else:
                state.errors[rcpt] = str(reply)
                if result is Rcpt.FAILED:
                    state.recipients[rcpt] = "failed"
            self.metrics.recipients.labels(result=result.value).inc()
        if txn.error is not None:
            state.last_error = str(txn.error)
        if txn.count(Rcpt.DELIVERED):
            self.metrics.delay.observe(max(0.0, time.time() - claim.queued_at))
        self._log(claim, txn)

    def _connection_failed(self, claim: Claim, e: SmtpError) -> None:
        if self._mid_message:
            log.warning("%s: connection lost after the final dot: may be delivered twice", claim.id)
        claim.state.last_error = f"{e} (stage {e.stage})"
        for rcpt in claim.state.pending(claim.envelope):
            claim.state.errors[rcpt] = claim.state.last_error
            self.metrics.recipients.labels(result="deferred").inc()
        self.outbox.finish(claim, e.reason)
        for rcpt in claim.state.pending(claim.envelope):
            self._log_rcpt(claim, rcpt, "deferred", "4.4.2", claim.state.last_error)

    def _rset(self) -> bool:
        try:
            self.conn.send_commands([(b"RSET\r\n", Stage.MAIL)], count=False)
            reply = self.conn.read(None, self.t.command)  # not a stage: neither reached nor its reply counted
        except SmtpError as e:
            log.info("RSET to %s failed: %s", self.relay, e)
            return False
        return reply.cls == 2

    def _log(self, claim: Claim, txn: Transaction) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        for rcpt, result in txn.results.items():
            reply = txn.replies[rcpt]
            self._log_rcpt(claim, rcpt, STATUS[result], reply.enhanced or f"{reply.cls}.0.0", str(reply))

    def _log_rcpt(self, claim: Claim, rcpt: str, status: str, dsn: str, reply: str) -> None:
        """The Postfix-style line for one recipient of one attempt (fields also for --log-format json)."""
        delay = round(time.time() - claim.queued_at, 2)
        attempts = claim.entry.attempts + 1
        line = (
            f"{claim.id}: to=<{rcpt}>, relay={self.relay}, delay={delay:.2f}, attempts={attempts}, "
            f"dsn={dsn}, status={status} ({reply})"
        )
        fields = {
            "event": "delivery",
            "queue_id": claim.id,
            "to": rcpt,
            "relay": self.relay,
            "delay": delay,
            "attempts": attempts,
            "dsn": dsn,
            "status": status,
            "reply": reply,
        }
        log.info(line, extra={"fields": fields})  # no arguments: the line is not %-formatted again
