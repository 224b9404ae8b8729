"""SIGHUP: the configuration read again; what may change in a running daemon, and what may not.

Owns: comparing the old and the new configuration setting by setting, and
sorting the changes into those a running daemon takes at once (limits,
timeouts, retry, relay, TLS, AUTH, rate limit, addresses, pruning) and those
that need a restart (the spool's place, the metrics address, the number of
delivery processes, the listener). Applying them is the daemon's (daemon.py).
Must not touch: sockets, the queue, signals.
"""

from __future__ import annotations

from greenmail.config import Config
from greenmail.logfmt import flatten

RESTART = ("spool.path", "metrics.listen", "delivery.processes", "listener.")


def changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(settings that changed and apply now, settings that changed and need a restart)."""
    before, after = flatten(old), flatten(new)
    changed = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k) and k != "source"]
    restart = [k for k in changed if k.startswith(RESTART)]
    return [k for k in changed if k not in restart], restart
