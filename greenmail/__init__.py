"""greenmail: a mail delivery daemon on gevent."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # not typing at run time: ``greenmail enqueue`` imports this package per message
    import os
    from collections.abc import Iterable, Sequence
    from typing import BinaryIO

__version__ = "0.1.0"


def enqueue(
    sender: str,
    recipients: list[str] | tuple[str, ...],
    message: bytes | BinaryIO,
    spool: str | os.PathLike[str],
) -> str:
    """Put one message durably into the spool at ``spool``; return its queue id.

    The same as ``greenmail enqueue`` without a process start: local
    addresses rewritten with this host's defaults (root -> root@origin; no
    aliases), addresses checked (AddressError), From:/Date:/Message-ID: added
    when missing, the file
    fsync'd and renamed into outgoing/ before this returns.
    """
    from greenmail.dropoff import default_rewriter
    from greenmail.spool import Spool

    s = Spool(spool, rewriter=default_rewriter())
    s.ensure()
    return s.enqueue(sender, recipients, message)


def enqueue_many(
    messages: Iterable[tuple[str, Sequence[str], bytes | BinaryIO]],
    spool: str | os.PathLike[str],
) -> list[str]:
    """Enqueue (sender, recipients, message) tuples at once: all durable, or none.

    Faster than one ``enqueue`` per message: the files are fsync'd together
    and the directory once. Returns the queue ids in order.
    """
    from greenmail.dropoff import default_rewriter
    from greenmail.spool import Spool

    s = Spool(spool, rewriter=default_rewriter())
    s.ensure()
    return s.enqueue_many(messages)
