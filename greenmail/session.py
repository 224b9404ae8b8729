"""One SMTP connection, run by one greenlet.

Owns: connecting with a timeout, driving the stage machine of protocol.py
over a gevent socket, taking due messages from the outbox one after another
on the same connection, streaming each body dot-stuffed, QUIT when nothing
is due. One try/finally per message guarantees each claim ends delivered,
requeued or failed exactly once, whatever exception happens.
Must not touch: directory paths and renames (the outbox does), the schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gevent import GreenletExit, socket

from greenmail import wire
from greenmail.config import Config
from greenmail.errors import (
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    RelayRefused,
    SmtpError,
    SmtpTimeout,
)
from greenmail.metrics import Metrics
from greenmail.outbox import Outbox
from greenmail.protocol import HELO_FALLBACK, Action, Rcpt, Stage, Transaction, decide
from greenmail.spool import Claim

log = logging.getLogger("greenmail.session")
CHUNK = 64 * 1024
QUIT_TIMEOUT = 10.0


class Session:
    """Deliver due messages over one connection; ``run()`` is the greenlet body."""

    def __init__(
        self,
        config: Config,
        outbox: Outbox,
        metrics: Metrics,
        helo: str,
        on_greeted: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.cfg = config
        self.t = config.timeouts
        self.outbox = outbox
        self.metrics = metrics
        self.helo = helo
        self.on_greeted = on_greeted
        self.sock: socket.socket | None = None
        self.parser = wire.ReplyParser()
        self.relay = f"{config.relay.host}:{config.relay.port}"
        self.extensions: dict[str, str] = {}
        self._mid_message = False  # the final dot is sent, its reply not yet read

    def run(self) -> None:
        started = time.monotonic()
        self.metrics.active.inc()
        try:
            try:
                self._connect()
                self._greet()
            except SmtpError as e:
                log.warning("connect to %s: %s", self.relay, e)
                if isinstance(e, RelayRefused):
                    self._quit()
                self.on_greeted(False)
                return
            self._deliver_all()
        finally:
            self._close()
            self.metrics.active.dec()
            self.metrics.session_duration.observe(time.monotonic() - started)

    # -- connection ----------------------------------------------------------------

    def _connect(self) -> None:
        host, port = self.cfg.relay.host, self.cfg.relay.port
        try:
            self.sock = socket.create_connection((host, port), timeout=self.t.connect)
        except TimeoutError:
            self._connected("timeout")
            raise ConnectFailed(f"connect timed out after {self.t.connect:g}s", "timeout") from None
        except ConnectionRefusedError:
            self._connected("refused")
            raise ConnectFailed("connection refused", "refused") from None
        except OSError as e:
            self._connected("error")
            raise ConnectFailed(f"cannot connect: {e}", "error") from None
        self._connected("ok")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip, rport = self.sock.getpeername()[:2]
        self.relay = f"{host}[{ip}]:{rport}"

    def _connected(self, result: str) -> None:
        self.metrics.connects.labels(result=result).inc()

    def _greet(self) -> None:
        self.metrics.stage_reached.labels(stage="banner").inc()
        banner = self._read(Stage.BANNER, self.t.banner)
        if decide(Stage.BANNER, banner) is not Action.PROCEED:
            raise RelayRefused(f"relay refused the session: {banner}", "banner")
        reply = self._command(wire.command("EHLO", self.helo), Stage.HELO, self.t.command)
        action = decide(Stage.HELO, reply)
        if action is Action.FALLBACK:
            reply = self._command(wire.command("HELO", self.helo), Stage.HELO, self.t.command)
            action = HELO_FALLBACK.get(reply.cls, Action.PROTOCOL)
        else:
            self.extensions = _extensions(reply)
        if action is Action.ABORT:
            raise RelayRefused(f"relay refused HELO: {reply}", "helo")
        if action is not Action.PROCEED:
            raise ProtocolError(f"unexpected reply to EHLO/HELO: {reply}", "helo")

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _quit(self) -> None:
        try:
            self._send(b"QUIT\r\n", "quit", QUIT_TIMEOUT)
            self._read(None, min(self.t.command, QUIT_TIMEOUT))
        except SmtpError:
            pass

    # -- messages ----------------------------------------------------------------

    def _deliver_all(self) -> None:
        claim = self.outbox.take()
        self.on_greeted(True)  # after the first take: the scheduler counts due messages
        while True:
            if claim is None:
                self._quit()
                return
            if not self._deliver(claim):
                return
            claim = self.outbox.take()

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
        if txn.count(Rcpt.DELIVERED) == len(txn.recipients):
            return True
        return self._rset()

    def _transactions(self, claim: Claim) -> Transaction:
        """As many transactions as the relay's 452 "too many recipients" asks for."""
        while True:
            txn = self._transaction(claim)
            if not (txn.overflow and txn.count(Rcpt.DELIVERED)):
                return txn

    def _transaction(self, claim: Claim) -> Transaction:
        env = claim.envelope
        txn = Transaction(claim.state.pending(env))
        reply = self._command(wire.mail_from(env.sender), Stage.MAIL, self.t.command)
        if txn.on_mail(reply):
            for rcpt in txn.recipients:
                if txn.overflow:  # the relay said 452: the rest go in the next transaction
                    txn.overflow.append(rcpt)
                else:
                    txn.on_rcpt(rcpt, self._command(wire.rcpt_to(rcpt), Stage.RCPT, self.t.command))
            if txn.wants_data:
                self._data(claim, txn)
        self._apply(claim, txn)
        return txn

    def _data(self, claim: Claim, txn: Transaction) -> None:
        if not txn.on_data(self._command(b"DATA\r\n", Stage.DATA, self.t.data_init)):
            return
        self.metrics.stage_reached.labels(stage="message").inc()
        self._nothing_ahead("message")
        stuffer = wire.DotStuffer()
        with claim.open_body() as f:
            while chunk := f.read(CHUNK):
                self._send(stuffer.feed(chunk), "message", self.t.data_block)
            self._send(stuffer.finish(), "message", self.t.data_block)
        self._mid_message = True
        txn.on_message(self._read(Stage.MESSAGE, self.t.data_end))
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
            reply = self._command(b"RSET\r\n", Stage.MAIL, self.t.command, count=False)
        except SmtpError as e:
            log.info("RSET to %s failed: %s", self.relay, e)
            return False
        return reply.cls == 2

    def _log(self, claim: Claim, txn: Transaction) -> None:
        for rcpt, result in txn.results.items():
            reply = txn.replies[rcpt]
            status = {Rcpt.DELIVERED: "sent", Rcpt.DEFERRED: "deferred", Rcpt.FAILED: "bounced"}[result]
            self._log_rcpt(claim, rcpt, status, reply.enhanced or f"{reply.cls}.0.0", str(reply))

    def _log_rcpt(self, claim: Claim, rcpt: str, status: str, dsn: str, reply: str) -> None:
        """The Postfix-style line for one recipient of one attempt (fields also for --log-format json)."""
        fields = {
            "queue_id": claim.id,
            "to": rcpt,
            "relay": self.relay,
            "delay": round(time.time() - claim.queued_at, 2),
            "attempts": claim.entry.attempts + 1,
            "dsn": dsn,
            "status": status,
            "reply": reply,
        }
        log.info(
            "%(queue_id)s: to=<%(to)s>, relay=%(relay)s, delay=%(delay).2f, attempts=%(attempts)d, "
            "dsn=%(dsn)s, status=%(status)s (%(reply)s)",
            fields,
            extra={"fields": {"event": "delivery", **fields}},
        )

    # -- the wire ----------------------------------------------------------------

    def _command(self, line: bytes, stage: Stage, timeout: float, count: bool = True) -> wire.Reply:
        if count:
            self.metrics.stage_reached.labels(stage=stage.label).inc()
        self._nothing_ahead(stage.label)
        self._send(line, stage.label, self.t.command)
        return self._read(stage if count else None, timeout)

    def _nothing_ahead(self, label: str) -> None:
        """Without pipelining, a reply that came before its command is a protocol error.

        Otherwise a stray early "250" would be taken for the answer to the
        next command, e.g. a rejected message for a delivered one.
        """
        if self.parser.pending:
            raise ProtocolError("the relay sent a reply ahead of the command", label)

    def _send(self, data: bytes, label: str, timeout: float) -> None:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise SmtpTimeout(f"timeout after {timeout:g}s sending", label) from None
        except OSError as e:
            raise ConnectionLost(f"connection lost while sending: {e}", label) from None

    def _read(self, stage: Stage | None, timeout: float) -> wire.Reply:
        assert self.sock is not None
        label = stage.label if stage is not None else "quit"
        deadline = time.monotonic() + timeout
        try:
            while (reply := self.parser.next_reply()) is None:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionLost("connection closed by the relay", label)
                self.parser.feed(data)
        except TimeoutError:
            raise SmtpTimeout(f"timeout after {timeout:g}s waiting for the {label} reply", label) from None
        except ProtocolError as e:
            if stage is not None:
                self.metrics.reply(stage.label, None)
            raise ProtocolError(str(e), label) from None
        except OSError as e:
            raise ConnectionLost(f"connection lost: {e}", label) from None
        if stage is not None:
            self.metrics.reply(stage.label, reply.code)
        return reply


def _extensions(reply: wire.Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from the lines after the first."""
    out = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        if keyword:
            out[keyword.upper()] = params
    return out
