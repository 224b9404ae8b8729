"""The sd_notify protocol: telling the service manager (systemd) how the daemon is doing.

Owns: reading ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` once (and taking
them out of the environment, so that the delivery processes this one starts cannot speak
for it), and sending one datagram per notification: ``READY=1``, ``STOPPING=1``,
``WATCHDOG=1``, ``STATUS=...`` (sd_notify(3): newline-separated assignments in one
datagram to the AF_UNIX socket the variable names; a leading "@" means Linux's abstract
namespace). Without ``$NOTIFY_SOCKET`` every call does nothing.
A send never blocks (a non-blocking socket: a full queue drops the datagram) and never
raises: the first failure is logged, later ones are not.
Must not touch: when to notify (the daemon decides), gevent, anything else of greenmail.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("greenmail")
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def address(value: str) -> str | None:
    """The socket address $NOTIFY_SOCKET names: an absolute path, or "@name" (abstract); else None."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's "vsock:" form, which an AF_UNIX socket cannot reach


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds within which WATCHDOG=1 is expected, or None when no watchdog is meant for ``pid``."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None  # meant for another process (e.g. the one that started us)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Notifier:
    """Notifications to one socket (or none: then every method returns False and does nothing)."""

    def __init__(self, target: str | None, watchdog: float | None = None) -> None:
        self.target = target
        self.watchdog_interval = watchdog if target is not None else None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None, unset: bool = True
    ) -> Notifier:
        """The notifier $NOTIFY_SOCKET asks for; ``unset`` removes the variables from ``environ``."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        target = address(value) if value else None
        if value and target is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket path or @name: no notifications", value)
        interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        if unset:
            for name in VARIABLES:
                env.pop(name, None)
        return cls(target, interval)

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def send(self, *assignments: str) -> bool:
        """One datagram with ``assignments`` ("READY=1", ...); True when it was handed to the socket."""
        if self.target is None:
            return False
        data = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.target)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("notification to the service manager failed (later failures not logged): %s", e)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
