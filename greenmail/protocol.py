"""The seed's SMTP stage machine, as data.

Owns: the stages 0-5 (banner, helo, mail, rcpt, data, message), which reply
class each stage expects, what every (stage, reply class) pair leads to, and
how the replies of one transaction settle each recipient.
Must not touch: sockets, files, clocks, logging, metrics, gevent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from greenmail.errors import ProtocolError
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
    return TRANSITIONS.get((stage, reply.cls), Action.PROTOCOL)


class Rcpt(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass
class Transaction:
    """The replies of one MAIL..final-dot transaction and what they mean.

    Feed it each reply in order; ``results`` then says, per recipient, whether
    it was delivered, deferred or failed, and ``error`` holds the reply that
    decided it (for last_error and logs).
    """

    recipients: tuple[str, ...]
    results: dict[str, Rcpt] = field(default_factory=dict)
    replies: dict[str, Reply] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)  # left for the next transaction (452)
    opened: bool = False  # MAIL was sent (so a refused transaction needs RSET)
    error: Reply | None = None

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
        action = decide(stage, reply)
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


def raise_protocol(stage: Stage, reply: Reply) -> None:
    raise ProtocolError(f"unexpected reply {reply} at stage {stage.label}", stage.label)
