"""The mail-log lines in Postfix's shape, which pflogsumm and other mail-log tools count.

Owns: the content of a recipient's delivery line (to=, relay=, delay=, delays=a/b/c/d,
dsn=, status=) with its timing, the queue-entry line (from=, size=, nrcpt=) and a local
pickup's line (uid=, from=); each as (text, JSON fields). The logger a caller logs
them on gives the service tag (logfmt.SERVICES: greenmail.session is smtp, ...).
Also: ``emit``, the cheap way to log such a line (several per message on the delivery path).
Must not touch: logging set-up, sockets, the spool. Imports only logfmt of greenmail.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

from greenmail import logfmt


class Timing(NamedTuple):
    """When things happened to one delivery attempt (time.time() values).

    ``seen``: when the daemon first saw the message (its start, for older messages);
    ``connected``: when the connection the message went on began to be opened;
    ``first``: the connection was opened for this message (else it was reused);
    ``claimed``: when this attempt took the message.
    """

    queued: float
    seen: float
    connected: float
    first: bool
    claimed: float


def delays(t: Timing, done: float) -> tuple[float, float, float, float]:
    """Postfix's delays=a/b/c/d: before the daemon saw it, in the queue, connection set-up, transmission.

    a + b + c + d = done - queued. A reused connection costs this message no set-up (c = 0).
    """
    queued, seen, connected, first, claimed = t
    if queued > seen:
        seen = queued
    if first:
        start = connected if connected > seen else seen
        b, c = connected - seen, claimed - start
    else:
        b, c = claimed - seen, 0.0
    d = done - claimed
    return seen - queued, b if b > 0 else 0.0, c if c > 0 else 0.0, d if d > 0 else 0.0


def _short(x: float) -> str:
    """A delay as Postfix writes delays=: 0 below 0.01 s, else at most two decimals."""
    return "0" if x < 0.005 else f"{x:.2f}".rstrip("0").rstrip(".")


def delivery(
    qid: str, rcpt: str, relay: str, timing: Timing, result: tuple[str, str, str], attempts: int
) -> tuple[str, dict[str, Any]]:
    """One recipient's line for one attempt, Postfix's field set, and its JSON fields.

    ``result`` is (dsn, status, reply); status is sent, deferred or bounced.
    """
    dsn, status, reply = result
    done = time.time()
    delay = f"{done - timing.queued if done > timing.queued else 0.0:.2f}"
    shorts = [_short(x) for x in delays(timing, done)]
    line = (
        f"{qid}: to=<{rcpt}>, relay={relay}, delay={delay}, delays={'/'.join(shorts)}, "
        f"dsn={dsn}, status={status} ({reply})"
    )
    fields = {
        "event": "delivery",
        "queue_id": qid,
        "to": rcpt,
        "relay": relay,
        "delay": float(delay),  # round(x, 2) is this: the decimal text read back (and costs twice as much)
        "delays": [float(x) for x in shorts],
        "attempts": attempts,
        "dsn": dsn,
        "status": status,
        "reply": reply,
    }
    return line, fields


def queue_entry(
    qid: str, sender: str, size: int, nrcpt: int, uid: int | None = None
) -> tuple[str, dict[str, Any]]:
    """The queue manager's line for a message entering the queue (log it on greenmail.queue)."""
    who = f", uid={uid}" if uid is not None else ""
    line = f"{qid}: from=<{sender}>, size={size}, nrcpt={nrcpt}{who} (queue active)"
    fields = {"event": "queued", "queue_id": qid, "from": sender, "size": size, "nrcpt": nrcpt, "uid": uid}
    return line, fields


def pickup(qid: str, uid: int, sender: str) -> tuple[str, dict[str, Any]]:
    """A local submission's line (log it on greenmail.pickup): pflogsumm counts it as received."""
    line = f"{qid}: uid={uid} from=<{sender}>"
    return line, {"event": "pickup", "queue_id": qid, "uid": uid, "from": sender}


# Every attribute a LogRecord has, as a Formatter's "%(name)s" finds them: in the instance's __dict__.
_RECORD = vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)) | dict.fromkeys(
    ("thread", "threadName", "process", "processName")  # not asked for (logfmt.setup): not known
)


class _Line(logging.LogRecord):
    """An INFO record of a finished line, its attributes copied from a template (LogRecord's own
    constructor asks for a source file, thread and process, which nothing shows)."""

    def __init__(self, name: str, line: str, fields: dict[str, Any]) -> None:
        self.__dict__.update(_RECORD)
        self.name, self.msg, self.fields = name, line, fields
        self.created = now = time.time()
        self.msecs = (now - int(now)) * 1000


def emit(logger: logging.Logger, line: str, fields: dict[str, Any]) -> None:
    """``logger.info(line, extra={"fields": fields})`` at a fraction of the cost.

    When the line can only go to the daemon's text handler, it goes there with no record
    (logfmt.info); else the record goes through ``Logger.handle`` (levels, filters, every
    handler, as usual), without being %-formatted.
    """
    if not logfmt.info(logger, line) and logger.isEnabledFor(logging.INFO):
        logger.handle(_Line(logger.name, line, fields))
