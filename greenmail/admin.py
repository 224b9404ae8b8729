"""What ``greenmail queue list`` and ``mailq`` print, from the queue interface.

Owns: the table of messages (one line per message, one per recipient, the
last error), ages as 42s/7m/3h/2d, and the printable form of ``queue show``'s
description. Backend-neutral: it sees MessageInfo only.
Must not touch: the queue's storage, SMTP, gevent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

from greenmail.queue import MessageInfo


def table(infos: list[MessageInfo], postfix: bool = False) -> Iterator[str]:
    """The lines of ``queue list`` without --json; ``postfix``: mailq's last line, as Postfix's."""
    if infos:
        head = f"{'-Queue ID-':<26} {'-State-':<9} {'--Size--':>9}"
        yield f"{head} -Arrival, age, attempts, next- -Sender/Recipient-"
    for i in infos:
        nxt = f"  next={i.next_attempt}" if i.next_attempt else ""
        yield (
            f"{i.id:<26} {i.state:<9} {i.size:>9} {i.queued_at} age={age(i.queued_at)}"
            f"  attempts={i.attempts}{nxt}  <{i.sender}>"
        )
        for rcpt, st in i.recipient_states.items():
            yield f"{'':<26} {st:<9} <{rcpt}>"
        if i.last_error:
            yield f"{'':<26} ({i.last_error})"
        if i.waiting:
            yield f"{'':<26} (waiting: {i.waiting})"
    if not postfix:
        yield f"-- {len(infos)} message{'s' if len(infos) != 1 else ''}"
    elif not infos:
        yield "Mail queue is empty"
    else:
        kbytes = (sum(i.size for i in infos) + 1023) // 1024
        yield f"-- {kbytes} Kbytes in {len(infos)} Request{'s' if len(infos) != 1 else ''}."


def age(iso: str, now: datetime | None = None) -> str:
    """How long ago an ISO 8601 UTC time was, as 42s, 7m, 3h or 2d."""
    now = now or datetime.now(UTC)
    seconds = max(0, int((now - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def description(info: MessageInfo) -> Iterator[str]:
    """``key: value`` lines of ``queue show`` (lists and maps as JSON, nothing as "-")."""
    for key, value in info.as_json().items():
        if value is None:
            shown = "-"
        elif isinstance(value, list | dict):
            shown = json.dumps(value)
        else:
            shown = str(value)
        yield f"{key}: {shown}"
