"""Noticing new files in outgoing/ at once: Linux inotify, read cooperatively.

Owns: an inotify descriptor on one directory (files renamed in, or closed
after writing), waited on through gevent so the hub is never blocked, and
the names it reports. Where inotify is missing (another OS, no ctypes, a
limit reached) ``Inotify.open`` returns None and the scheduler polls.
Network filesystems do not report other hosts' changes: the scheduler's
polling stays on as the safety net.
Must not touch: the spool's files, the index.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

from gevent.socket import wait_read

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
ARRIVALS = IN_MOVED_TO | IN_CLOSE_WRITE
IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class Inotify:
    """New names in one directory, as inotify reports them."""

    def __init__(self, fd: int, whole_when_created: Callable[[str], bool] = lambda name: False) -> None:
        self.fd = fd
        self.whole_when_created = whole_when_created  # names that only ever appear complete (hard links)
        self.overflowed = False
        self.events = 0  # events of any kind read so far

    @classmethod
    def open(cls, directory: Path, whole_when_created: Callable[[str], bool] | None = None) -> Inotify | None:
        """Watch ``directory``; a created name is reported at once when ``whole_when_created`` says
        such names appear complete (submissions are hard-linked in), else on its close or rename."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            mask = ARRIVALS | IN_CREATE | IN_MOVED_FROM | IN_DELETE  # departures explain mtime changes
            if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd) if whole_when_created is None else cls(fd, whole_when_created)

    def wait(self, timeout: float) -> list[str] | None:
        """Names that arrived (possibly none), or None when ``timeout`` passed without any."""
        try:
            wait_read(self.fd, timeout)
        except TimeoutError:
            return None
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        return self._names(data)

    def _names(self, data: bytes) -> list[str]:
        names = []
        pos = 0
        while pos + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            raw = data[pos : pos + length].rstrip(b"\0")
            pos += length
            self.events += 1
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True  # events were lost: the caller rescans
            elif raw and mask & ARRIVALS:
                names.append(os.fsdecode(raw))
            elif raw and mask & IN_CREATE and self.whole_when_created(name := os.fsdecode(raw)):
                names.append(name)
        return names

    def close(self) -> None:
        """Close the descriptor (once: a second call does nothing)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
