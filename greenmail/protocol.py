"""The SMTP client as a sans-I/O state machine: what may be sent when, what each reply means.

Owns: the stages 0-5 (banner, helo, mail, rcpt, data, message) and the
transport stages (starttls, auth); which reply class each stage expects and
what every (stage, reply class) pair leads to (TRANSITIONS); the client
connection's phases, which command may be sent in which phase and which
reply moves it on (SEND, AFTER_REPLY); the queue of replies the client
expects, in order, so pipelined commands (RFC 2920, also behind the end of a
message) are matched to their replies; and a transaction's per-recipient
results. An illegal step raises LocalProtocolError and poisons the
connection. Bytes in, bytes out: the session does the I/O.
Must not touch: sockets, files, clocks, logging, metrics, gevent.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from greenmail import wire
from greenmail.errors import LocalProtocolError, ProtocolError
from greenmail.wire import Reply


class Stage(enum.IntEnum):
    BANNER = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    MESSAGE = 5
    STARTTLS = 6  # transport stages, after the seed's 0-5
    AUTH = 7

    label: str  # the stage name used in logs, metric labels and test ids (set below)


for _stage in Stage:
    _stage.label = _stage.name.lower()  # an attribute, not a property: read several times per message

STAGES: tuple[str, ...] = tuple(s.label for s in Stage)


class Action(enum.Enum):
    PROCEED = "proceed"  # the reply is what the stage expects: go on
    FALLBACK = "fallback"  # EHLO refused with 5xx: try HELO instead
    DEFER = "defer"  # temporary refusal of the message (or recipient)
    FAIL = "fail"  # permanent refusal of the message (or recipient)
    CONTINUE = "continue"  # an AUTH challenge (334): answer it
    ABORT = "abort"  # the relay refuses the session itself: close, blame no message
    PROTOCOL = "protocol"  # a reply class this stage cannot have


# (stage, reply class) -> action. Anything missing is Action.PROTOCOL.
TRANSITIONS: dict[tuple[Stage, int], Action] = {
    (Stage.BANNER, 2): Action.PROCEED,
    (Stage.BANNER, 4): Action.ABORT,
    (Stage.BANNER, 5): Action.ABORT,
    (Stage.HELO, 2): Action.PROCEED,
    (Stage.HELO, 4): Action.ABORT,
    (Stage.HELO, 5): Action.FALLBACK,
    (Stage.MAIL, 2): Action.PROCEED,
    (Stage.MAIL, 4): Action.DEFER,
    (Stage.MAIL, 5): Action.FAIL,
    (Stage.RCPT, 2): Action.PROCEED,
    (Stage.RCPT, 4): Action.DEFER,
    (Stage.RCPT, 5): Action.FAIL,
    (Stage.DATA, 3): Action.PROCEED,
    (Stage.DATA, 4): Action.DEFER,
    (Stage.DATA, 5): Action.FAIL,
    (Stage.MESSAGE, 2): Action.PROCEED,
    (Stage.MESSAGE, 4): Action.DEFER,
    (Stage.MESSAGE, 5): Action.FAIL,
    (Stage.STARTTLS, 2): Action.PROCEED,
    (Stage.STARTTLS, 4): Action.ABORT,
    (Stage.STARTTLS, 5): Action.ABORT,
    (Stage.AUTH, 2): Action.PROCEED,
    (Stage.AUTH, 3): Action.CONTINUE,
    (Stage.AUTH, 4): Action.ABORT,
    (Stage.AUTH, 5): Action.ABORT,
}

# What the HELO fallback leads to: a 5xx to HELO too ends the session.
HELO_FALLBACK: dict[int, Action] = {2: Action.PROCEED, 4: Action.ABORT, 5: Action.ABORT}


TOO_MANY_RECIPIENTS = 452


def decide(stage: Stage, reply: Reply) -> Action:
    """What a reply at a stage leads to, by the table above."""
    return TRANSITIONS.get((stage, reply.code // 100), Action.PROTOCOL)  # // 100: reply.cls, inline


def raise_protocol(stage: Stage, reply: Reply) -> None:
    raise ProtocolError(f"unexpected reply {reply} at stage {stage.label}", stage.label)


# -- the client connection's phases ------------------------------------------------------------


class Phase(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity is equality, and this hash is C's

    GREETING = "greeting"  # waiting for the banner
    HELLO = "hello"  # greeted: EHLO (or HELO) is next
    READY = "ready"  # no transaction open
    MAIL = "mail"  # MAIL sent: RCPT is next
    RCPT = "rcpt"  # RCPT sent: more RCPT, DATA or BDAT
    DATA = "data"  # DATA sent: nothing until its reply
    BODY = "body"  # 354 received: the message, then its final dot
    BDAT = "bdat"  # BDAT chunks until the LAST one
    WAITING = "waiting"  # a command was sent after which nothing may go until its reply
    REFUSED = "refused"  # the relay refused the greeting: only QUIT is left
    HANDSHAKE = "handshake"  # STARTTLS accepted: the TLS handshake, then EHLO again
    AUTH = "auth"  # a 334 challenge: the answer is next
    CLOSED = "closed"  # QUIT sent, 421 received, or poisoned


class Cmd(enum.Enum):
    """What the client sends (and BANNER: what it waits for first)."""

    __hash__ = object.__hash__  # see Phase

    BANNER = "banner"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    AUTH = "auth"
    AUTH_ANSWER = "auth_answer"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END = "end"  # the end of a message after DATA: its final dot
    BDAT = "bdat"
    BDAT_LAST = "bdat_last"
    RSET = "rset"
    QUIT = "quit"


# (phase, command) -> the phase after sending it. Anything missing is illegal.
SEND: dict[tuple[Phase, Cmd], Phase] = {
    (Phase.HELLO, Cmd.EHLO): Phase.WAITING,
    (Phase.HELLO, Cmd.HELO): Phase.WAITING,
    (Phase.READY, Cmd.STARTTLS): Phase.WAITING,
    (Phase.READY, Cmd.AUTH): Phase.WAITING,
    (Phase.AUTH, Cmd.AUTH_ANSWER): Phase.WAITING,
    (Phase.READY, Cmd.MAIL): Phase.MAIL,
    (Phase.MAIL, Cmd.RCPT): Phase.RCPT,
    (Phase.RCPT, Cmd.RCPT): Phase.RCPT,
    (Phase.RCPT, Cmd.DATA): Phase.DATA,
    (Phase.BODY, Cmd.END): Phase.READY,
    (Phase.RCPT, Cmd.BDAT): Phase.BDAT,
    (Phase.BDAT, Cmd.BDAT): Phase.BDAT,
    (Phase.RCPT, Cmd.BDAT_LAST): Phase.READY,
    (Phase.BDAT, Cmd.BDAT_LAST): Phase.READY,
    (Phase.MAIL, Cmd.RSET): Phase.READY,
    (Phase.RCPT, Cmd.RSET): Phase.READY,
    (Phase.READY, Cmd.RSET): Phase.READY,
    (Phase.BDAT, Cmd.RSET): Phase.READY,  # after a refused chunk (RFC 3030 4.2)
    **{
        (p, Cmd.QUIT): Phase.CLOSED for p in (Phase.HELLO, Phase.READY, Phase.MAIL, Phase.RCPT, Phase.REFUSED)
    },
}

# Commands after which nothing may be sent until their reply, even with PIPELINING (RFC 2920 3.1).
SYNC = frozenset(
    {Cmd.BANNER, Cmd.EHLO, Cmd.HELO, Cmd.STARTTLS, Cmd.AUTH, Cmd.AUTH_ANSWER, Cmd.DATA, Cmd.QUIT}
)

# (command, reply class) -> the phase after its reply, when nothing was sent behind it.
# A missing entry leaves the phase as sending made it.
AFTER_REPLY: dict[tuple[Cmd, int], Phase] = {
    (Cmd.BANNER, 2): Phase.HELLO,
    (Cmd.BANNER, 4): Phase.REFUSED,
    (Cmd.BANNER, 5): Phase.REFUSED,
    (Cmd.EHLO, 2): Phase.READY,
    (Cmd.EHLO, 4): Phase.REFUSED,
    (Cmd.EHLO, 5): Phase.HELLO,  # the fallback: HELO next
    (Cmd.HELO, 2): Phase.READY,
    (Cmd.HELO, 4): Phase.REFUSED,
    (Cmd.HELO, 5): Phase.REFUSED,
    (Cmd.STARTTLS, 2): Phase.HANDSHAKE,
    (Cmd.STARTTLS, 4): Phase.READY,
    (Cmd.STARTTLS, 5): Phase.READY,
    **{(c, cls): p for c in (Cmd.AUTH, Cmd.AUTH_ANSWER) for cls, p in ((2, Phase.READY), (3, Phase.AUTH))},
    **{(c, cls): Phase.READY for c in (Cmd.AUTH, Cmd.AUTH_ANSWER) for cls in (4, 5)},
    (Cmd.MAIL, 4): Phase.READY,
    (Cmd.MAIL, 5): Phase.READY,
    (Cmd.DATA, 3): Phase.BODY,
    (Cmd.DATA, 4): Phase.READY,
    (Cmd.DATA, 5): Phase.READY,
}

STAGE_OF: dict[Cmd, Stage | None] = {
    Cmd.BANNER: Stage.BANNER,
    Cmd.EHLO: Stage.HELO,
    Cmd.HELO: Stage.HELO,
    Cmd.STARTTLS: Stage.STARTTLS,
    Cmd.AUTH: Stage.AUTH,
    Cmd.AUTH_ANSWER: Stage.AUTH,
    Cmd.MAIL: Stage.MAIL,
    Cmd.RCPT: Stage.RCPT,
    Cmd.DATA: Stage.DATA,
    Cmd.END: Stage.MESSAGE,
    Cmd.BDAT: Stage.DATA,
    Cmd.BDAT_LAST: Stage.MESSAGE,
    Cmd.RSET: None,  # not one of the stages: neither reached nor its reply counted
    Cmd.QUIT: None,
}


@dataclass
class Expect:
    """A reply the client waits for: to which command, of which transaction and recipient."""

    cmd: Cmd
    txn: Transaction | None = None
    rcpt: str | None = None

    @property
    def stage(self) -> Stage | None:
        return STAGE_OF[self.cmd]


class Client:
    """One client connection's protocol state: its phase, the replies it expects, what the relay offers."""

    def __init__(self, pipelining: bool = True) -> None:
        self.phase = Phase.GREETING
        self.expected: deque[Expect] = deque([Expect(Cmd.BANNER)])
        self.parser = wire.ReplyParser()
        self.extensions: dict[str, str] = {}
        self.allow_pipelining = pipelining
        self.pipelining = False  # allowed, and offered by the relay's EHLO
        self.closing: Reply | None = None  # the relay said 421: nothing more is read or sent

    def _offered(self, extensions: dict[str, str]) -> None:
        self.extensions = extensions
        self.pipelining = self.allow_pipelining and "PIPELINING" in extensions

    def can_send(self, cmd: Cmd) -> bool:
        """Whether ``cmd`` may go now: legal in this phase, and nothing blocks it."""
        return self._after_send(cmd) is not None

    def _after_send(self, cmd: Cmd) -> Phase | None:
        """The phase after sending ``cmd`` if it may go now, else None."""
        after = SEND.get((self.phase, cmd))
        if after is None or self.closing is not None:
            return None
        expected = self.expected
        if expected and not (self.pipelining and expected[-1].cmd not in SYNC):
            return None
        return after

    def send(self, cmd: Cmd, line: bytes, txn: Transaction | None = None, rcpt: str | None = None) -> bytes:
        """Record that ``line`` (the encoded ``cmd``) goes out; returns it. Illegal: LocalProtocolError."""
        data = self.offer(cmd, line, txn, rcpt)
        if data is None:
            raise self.refused(cmd)
        return data

    def refused(self, cmd: Cmd) -> LocalProtocolError:
        """``cmd`` may not go now, though it had to: the connection is poisoned; the error to raise."""
        why = f"{cmd.value} may not be sent in phase {self.phase.value} now"
        self.phase = Phase.CLOSED
        return LocalProtocolError(why)

    def offer(
        self, cmd: Cmd, line: bytes, txn: Transaction | None = None, rcpt: str | None = None
    ) -> bytes | None:
        """``send`` when ``cmd`` may go now; else None, and nothing changes."""
        after = self._after_send(cmd)
        if after is None:
            return None
        if self.parser.pending:  # a reply before its command would be taken for the next one's
            stage = STAGE_OF[cmd]
            raise ProtocolError("the relay sent a reply ahead of the command", stage.label if stage else "")
        self.phase = after
        self.expected.append(Expect(cmd, txn, rcpt))
        if txn is not None:
            txn.outstanding += 1
        return line

    def body(self) -> None:
        """The message body may be sent now (checked before each chunk)."""
        if self.phase is not Phase.BODY:
            raise LocalProtocolError(f"a message body may not be sent in phase {self.phase.value}")
        if self.parser.pending:
            raise ProtocolError("the relay sent a reply ahead of the message", "message")

    def receive(self, data: bytes) -> None:
        self.parser.feed(data)

    def next_reply(self) -> tuple[Expect, Reply] | None:
        """The next complete reply with what it answers; None until more bytes arrive."""
        reply = self.parser.next_reply()
        if reply is None:
            return None
        if not self.expected:
            self.phase = Phase.CLOSED
            raise ProtocolError(f"a reply no command asked for: {reply}")
        expect = self.expected.popleft()
        if expect.txn is not None:
            expect.txn.outstanding -= 1
        if not self.expected and (after := AFTER_REPLY.get((expect.cmd, reply.code // 100))) is not None:
            self.phase = after
        if expect.cmd is Cmd.EHLO and reply.cls == 2:
            self._offered(_extensions(reply))
        if reply.code == 421:  # RFC 5321 3.8: the relay is closing the connection
            self.closing = reply
            self.phase = Phase.CLOSED
        return expect, reply

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS is done: greet again, forgetting what was learned (RFC 3207)."""
        if self.phase is not Phase.HANDSHAKE:
            raise LocalProtocolError("TLS started without an accepted STARTTLS")
        if self.parser.pending:  # bytes sent before the handshake must not count as TLS-protected
            raise ProtocolError("the relay sent data after its STARTTLS reply", "starttls")
        self.parser = wire.ReplyParser()
        self._offered({})
        self.phase = Phase.HELLO

    def implicit_tls(self) -> None:
        """TLS from the first byte: nothing to change but a fresh parser."""
        self.parser = wire.ReplyParser()


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from the lines after the first."""
    out = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        if keyword:
            out[keyword.upper()] = params
    return out


# -- one transaction's recipients --------------------------------------------------------------


class Rcpt(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass
class Planned:
    """A command of a transaction not sent yet."""

    cmd: Cmd
    line: bytes
    rcpt: str | None = None


@dataclass
class Transaction:
    """The replies of one MAIL..final-dot transaction and what they mean.

    Feed it each reply in order; ``results`` then says, per recipient, whether
    it was delivered, deferred or failed, and ``error`` holds the reply that
    decided it (for last_error and logs). ``planned`` holds its commands not
    yet sent; ``ahead`` marks one whose commands went out behind the end of
    the previous message, before that one's reply.
    """

    recipients: tuple[str, ...]
    results: dict[str, Rcpt] = field(default_factory=dict)
    replies: dict[str, Reply] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)  # left for the next transaction (452)
    opened: bool = False  # MAIL was sent (so a refused transaction needs RSET)
    error: Reply | None = None
    planned: deque[Planned] = field(default_factory=deque)
    ahead: bool = False
    answered: int = 0  # replies received
    outstanding: int = 0  # replies expected (commands sent, not yet answered)
    final_sent: bool = False  # the final dot (or BDAT LAST) went out
    final: Reply | None = None  # the reply that ended the message (to the final dot, or a refused chunk)
    mail_ok: bool = True
    data_ok: bool = False  # DATA was answered 354 for accepted recipients: the body goes

    def plan(self, mail: bytes, data: bool) -> None:
        """MAIL, a RCPT per recipient to send, and DATA (unless the body goes by BDAT)."""
        self.opened = True
        self.planned.append(Planned(Cmd.MAIL, mail))
        self.planned.extend(Planned(Cmd.RCPT, wire.rcpt_to(r), r) for r in self.to_send)
        if data:
            self.planned.append(Planned(Cmd.DATA, b"DATA\r\n"))

    def on_reply(self, expect: Expect, reply: Reply) -> None:
        """Route one reply of this transaction to what it answers."""
        self.answered += 1
        cmd = expect.cmd
        if cmd is Cmd.MAIL:
            self.mail_ok = self.on_mail(reply)
            if not self.mail_ok:
                self.planned.clear()
        elif cmd is Cmd.RCPT:
            if self.mail_ok:
                assert expect.rcpt is not None
                self.on_rcpt(expect.rcpt, reply)
                if self.overflow:  # 452: the recipients not sent yet wait for the next transaction
                    self.overflow.extend(p.rcpt for p in self.planned if p.cmd is Cmd.RCPT and p.rcpt)
                    self.planned = deque(p for p in self.planned if p.cmd is not Cmd.RCPT)
        elif cmd is Cmd.DATA:
            self.data_ok = self.mail_ok and self.wants_data and self.on_data(reply)
        elif cmd in (Cmd.END, Cmd.BDAT_LAST):
            self.final = reply
            self.on_message(reply)
        elif cmd is Cmd.BDAT and reply.cls != 2:
            self.final = reply  # the relay refused the message part-way: that ends it
            self.on_message(reply)

    def on_mail(self, reply: Reply) -> bool:
        """True to go on with RCPT."""
        return self._settle_all(Stage.MAIL, reply, self.recipients)

    def refuse(self, rcpt: str, reply: Reply) -> None:
        """Fail a recipient before any command (e.g. SMTPUTF8 missing, message too big)."""
        self.results[rcpt] = Rcpt.FAILED
        self.replies[rcpt] = reply
        self.error = reply

    def defer_rest(self, reply: Reply) -> None:
        """The relay is closing (421): every recipient not yet settled is deferred with its reply."""
        for rcpt in self.recipients:
            if rcpt not in self.results:  # accepted ones too: no message will follow
                self.results[rcpt] = Rcpt.DEFERRED
                self.replies[rcpt] = reply
        self.accepted.clear()
        self.overflow.clear()
        self.planned.clear()
        self.error = reply

    @property
    def to_send(self) -> list[str]:
        """Recipients still to be given to RCPT in this transaction."""
        return [r for r in self.recipients if r not in self.results]

    def on_rcpt(self, rcpt: str, reply: Reply) -> None:
        if reply.code == TOO_MANY_RECIPIENTS and self.accepted:
            self.overflow.append(rcpt)  # RFC 5321 4.5.3.1.10: send the rest in another transaction
            return
        action = decide(Stage.RCPT, reply)
        self.replies[rcpt] = reply
        if action is Action.PROCEED:
            self.accepted.append(rcpt)
        elif action is Action.PROTOCOL:
            raise_protocol(Stage.RCPT, reply)
        else:
            self.results[rcpt] = Rcpt.DEFERRED if action is Action.DEFER else Rcpt.FAILED
            self.error = reply

    @property
    def wants_data(self) -> bool:
        return bool(self.accepted)

    def on_data(self, reply: Reply) -> bool:
        """True to go on sending the message body."""
        return self._settle_all(Stage.DATA, reply, self.accepted)

    def on_message(self, reply: Reply) -> None:
        if self._settle_all(Stage.MESSAGE, reply, self.accepted):
            for rcpt in self.accepted:
                self.results[rcpt] = Rcpt.DELIVERED
                self.replies[rcpt] = reply

    def _settle_all(self, stage: Stage, reply: Reply, rcpts: tuple[str, ...] | list[str]) -> bool:
        action = TRANSITIONS.get((stage, reply.code // 100), Action.PROTOCOL)  # decide(), inline
        if action is Action.PROCEED:
            return True
        if action is Action.PROTOCOL:
            raise_protocol(stage, reply)
        state = Rcpt.DEFERRED if action is Action.DEFER else Rcpt.FAILED
        for rcpt in rcpts:
            if self.results.get(rcpt) is Rcpt.FAILED and stage is Stage.MAIL:
                continue  # refused before MAIL: keep that reason
            self.results[rcpt] = state
            self.replies[rcpt] = reply
        self.error = reply
        return False

    def count(self, state: Rcpt) -> int:
        return sum(1 for r in self.results.values() if r is state)
