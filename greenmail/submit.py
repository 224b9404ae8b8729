"""Submission from the command line: ``greenmail enqueue`` (from click or from the fast start).

Owns: reading the message from stdin into the configured queue (its
settings from the cache beside the configuration when that is fresh:
confcache.py), printing the queue id, and mapping what can go wrong to one
line and an exit code.
Must not touch: click, the daemon, gevent.
"""

from __future__ import annotations

import sys

from greenmail.exits import EX_CANTCREAT, EX_DATAERR, EX_USAGE, fail, load_config, open_queue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from greenmail.dropoff import Dropoff


def enqueue(config_path: str | None, sender: str, recipients: tuple[str, ...]) -> None:
    """``greenmail enqueue``: one message from stdin into the queue; prints its queue id."""
    from greenmail.errors import AddressError, EnqueueError

    if not sender:  # the null sender is written '<>'; an empty --from is a mistake
        fail("invalid address: empty address (use '<>' for the null sender)", EX_USAGE)
    queue = _fast_queue(config_path) or open_queue(load_config(config_path))
    try:
        qid = queue.enqueue(sender, recipients, sys.stdin.buffer)
    except AddressError as e:
        fail(f"invalid address: {e}", EX_USAGE)
    except EnqueueError as e:
        fail(str(e), EX_DATAERR if "empty" in str(e) or "envelope too big" in str(e) else EX_CANTCREAT)
    sys.stdout.write(qid + "\n")
    sys.stdout.flush()


def _fast_queue(config_path: str | None) -> Dropoff | None:
    """The spool from the settings cached beside the configuration (no parsing); None without a cache."""
    from greenmail import confcache

    file = confcache.find(config_path)
    settings = confcache.read(file) if file else None
    if settings is None:
        return None
    from greenmail.dropoff import Dropoff
    from greenmail.errors import SpoolError

    try:
        return Dropoff(settings["spool"])
    except SpoolError as e:
        fail(str(e), EX_CANTCREAT)
