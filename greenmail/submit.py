"""Submission from the command line: ``greenmail enqueue`` (from click or from the fast start).

Owns: reading the message from stdin into the configured queue (its
settings from the cache beside the configuration when that is fresh:
confcache.py), printing the queue id, and mapping what can go wrong to one
line and an exit code.
Must not touch: click, the daemon, gevent.
"""

from __future__ import annotations

import sys

from greenmail.exits import EX_CONFIG, EX_DATAERR, EX_TEMPFAIL, fail, load_config, open_queue

TYPE_CHECKING = False
if TYPE_CHECKING:
    from greenmail.dropoff import Dropoff
    from greenmail.pgsubmit import Submitter


def enqueue(config_path: str | None, sender: str, recipients: tuple[str, ...]) -> None:
    """``greenmail enqueue``: one message from stdin into the queue; prints its queue id."""
    from greenmail.errors import AddressError, ConfigError, EnqueueError, QueueUnavailable

    if not sender:  # the null sender is written '<>'; an empty --from is a mistake
        fail("invalid address: empty address (use '<>' for the null sender)", EX_DATAERR)
    queue = _fast_queue(config_path) or open_queue(load_config(config_path), EX_TEMPFAIL)
    try:
        qid = queue.enqueue(sender, recipients, sys.stdin.buffer)
    except AddressError as e:
        fail(f"invalid address: {e}", EX_DATAERR)
    except ConfigError as e:  # the aliases file, read on the first local recipient
        fail(f"configuration error: {e}", EX_CONFIG)
    except EnqueueError as e:
        fail(str(e), EX_TEMPFAIL if is_tempfail(e) else EX_DATAERR)
    except QueueUnavailable as e:  # the shared queue's database: try again later
        fail(str(e), EX_TEMPFAIL)
    sys.stdout.write(qid + "\n")
    sys.stdout.flush()


def is_tempfail(e: Exception) -> bool:
    """Whether an EnqueueError is the spool's trouble (try again later), not the message's."""
    return "cannot write" in str(e) or "cannot create" in str(e) or "free queue id" in str(e)


def _fast_queue(config_path: str | None) -> Dropoff | Submitter | None:
    """The queue from the settings cached beside the configuration (no parsing); None without a cache."""
    from greenmail import confcache

    file = confcache.find(config_path)
    settings = confcache.read(file) if file else None
    if settings is None:
        return None
    from greenmail.addresses import Rewriter

    if settings.get("backend", "spool") != "spool":
        if not settings.get("dsn"):
            return None  # a password in the DSN: not cached, so the full configuration
        from greenmail.pgsubmit import Submitter

        return Submitter(
            settings["dsn"], settings.get("password_file"), Rewriter(**settings.get("addresses", {}))
        )
    from greenmail.dropoff import Dropoff
    from greenmail.errors import SpoolError

    try:
        return Dropoff(settings["spool"], Rewriter(**settings.get("addresses", {})))
    except SpoolError as e:
        fail(str(e), EX_TEMPFAIL)
