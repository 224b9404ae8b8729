"""greenmail: a mail delivery daemon on gevent."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # not typing at run time: ``greenmail enqueue`` imports this package per message
    import os
    from collections.abc import Iterable, Sequence
    from typing import Any, BinaryIO

__version__ = "0.1.0"


def enqueue(
    sender: str,
    recipients: list[str] | tuple[str, ...],
    message: bytes | BinaryIO,
    spool: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> str:
    """Put one message durably into the spool at ``spool``; return its queue id.

    ``config`` (or, with neither argument, $GREENMAIL_CONFIG) names the
    configuration whose spool and [addresses] apply; ``spool`` alone writes
    there with this host's defaults. The same as ``greenmail enqueue``
    without a process start: local
    addresses rewritten with this host's defaults (root -> root@origin; no
    aliases), addresses checked (AddressError), From:/Date:/Message-ID: added
    when missing, the file
    fsync'd and renamed into outgoing/ before this returns.
    """
    return _spool(spool, config).enqueue(sender, recipients, message)


def enqueue_many(
    messages: Iterable[tuple[str, Sequence[str], bytes | BinaryIO]],
    spool: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Enqueue (sender, recipients, message) tuples at once: all durable, or none.

    Faster than one ``enqueue`` per message: the files are fsync'd together
    and the directory once. Returns the queue ids in order.
    """
    return _spool(spool, config).enqueue_many(messages)


def _spool(spool: str | os.PathLike[str] | None, config: str | os.PathLike[str] | None) -> Any:
    """The spool to write to, with the rewriting of [addresses]: from ``config`` (its spool.path
    unless ``spool`` is given), else ``spool`` with this host's defaults."""
    from greenmail.dropoff import default_rewriter
    from greenmail.spool import Spool

    if config is not None or spool is None:
        from greenmail import backends
        from greenmail.config import load

        cfg = load(config)  # ConfigError when there is none ($GREENMAIL_CONFIG, /etc/greenmail/...)
        s = Spool(spool if spool is not None else cfg.spool.path, rewriter=backends.rewriter(cfg))
    else:
        s = Spool(spool, rewriter=default_rewriter())
    s.ensure()
    return s
