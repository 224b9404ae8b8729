"""Which daemons are alive, and taking back the claims of dead ones.

Owns: each daemon's two signs of life, held for its lifetime: a lock on one
byte of the spool directory itself (an open-file-description lock at an offset
named by the owner: nothing short of removing the whole spool can take it
away), and its file in owners/ (``OWNER.lock``, flock'd, locked under a
temporary name and renamed into place so no one sees it unlocked, put back by
its daemon when someone removes or replaces it; it shows who runs, and is the
only sign where the file system has no byte-range locks, e.g. some network
file systems). Recovery: a claim in outgoing_active/ named ``NAME@OWNER``
goes back to outgoing/ only when OWNER is proven dead; a claim whose name has
no owner at all belongs to no daemon and goes back at once. So one daemon
never takes back a live daemon's claims (same host or a shared filesystem),
even when a cleaner removes lock files. Plain blocking file I/O: the daemon
calls it in the threadpool.
Must not touch: gevent, message contents.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from greenmail.layout import rename_new

log = logging.getLogger("greenmail.spool")
MISSING_GRACE = 60.0  # without byte-range locks: seconds a lock file may be missing before its owner is dead
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid


def _offset(owner: str) -> int:
    """The byte of the spool directory that ``owner`` locks (56 bits: owners never share one)."""
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=7).digest(), "big")


def _range_lock(fd: int, owner: str, cmd: int, kind: int) -> bytes:
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, _offset(owner), 1, 0))


def _range_held(fd: int, owner: str) -> bool | None:
    """Whether some open file holds ``owner``'s byte; None where such locks are not supported."""
    try:
        kind = _FLOCK.unpack(_range_lock(fd, owner, fcntl.F_OFD_GETLK, fcntl.F_WRLCK))[0]
    except (OSError, AttributeError):
        return None
    return kind != fcntl.F_UNLCK


class Lock:
    """This daemon's liveness file, held (and put back when removed) until ``release``."""

    def __init__(self, spool: Path, owners: Path, owner: str) -> None:
        self.spool = spool
        self.owners = owners
        self.owner = owner
        self.path = owners / f"{owner}.lock"
        self._root = self._lock_root()
        try:
            self.fd = self._create()
        except BaseException:
            os.close(self._root)
            raise

    def _lock_root(self) -> int:
        fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError, AttributeError):  # no byte-range locks here: the file alone
            _range_lock(fd, self.owner, fcntl.F_OFD_SETLK, fcntl.F_RDLCK)
        return fd

    def _create(self) -> int:
        tmp = self.owners / f".{self.owner}.{os.urandom(4).hex()}.lock"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.rename(tmp, self.path)  # replaces whatever stands at the path: it is ours
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd

    def keep(self) -> bool:
        """Put the lock file (and the byte lock of a remade spool) back if removed; True if it had to be."""
        if _inode(self.spool) != _fd_inode(self._root):
            old_root, self._root = self._root, self._lock_root()
            os.close(old_root)
        try:
            st = os.stat(self.path)
            mine = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return False
        except FileNotFoundError:
            pass
        old, self.fd = self.fd, self._create()
        os.close(old)
        log.warning("owners/%s.lock was removed or replaced: put back", self.owner)
        return True

    def release(self) -> None:
        with contextlib.suppress(OSError):
            st, mine = os.stat(self.path), os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        os.close(self.fd)
        os.close(self._root)  # the byte lock goes with it


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fd_inode(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class Liveness:
    """Judges other owners by their signs of life."""

    def __init__(self, spool: Path, owners: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.owners = owners
        self.clock = clock
        self._missing_since: dict[str, float] = {}

    def dead(self, owner: str) -> bool:
        """True only when ``owner`` is proven gone: neither its byte nor its file is locked."""
        fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
        try:
            held = _range_held(fd, owner)
        finally:
            os.close(fd)
        if held:
            return False
        locked = self._file_locked(owner)
        if held is None and locked is None:  # only the file tells, and it is missing: wait a while
            since = self._missing_since.setdefault(owner, self.clock())
            return self.clock() - since > MISSING_GRACE
        return not locked

    def _file_locked(self, owner: str) -> bool | None:
        """Whether OWNER.lock is flock'd; None when there is no such file."""
        try:
            fd = os.open(self.owners / f"{owner}.lock", os.O_RDWR)
        except FileNotFoundError:
            return None
        self._missing_since.pop(owner, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def recover(liveness: Liveness, active: Path, outgoing: Path, me: str) -> int:
    """Move claims of dead owners (and of none) back to outgoing/ (not yet fsync'd); returns how many."""
    dead: dict[str, bool] = {}
    moved = 0
    for name in os.listdir(active):
        if name.startswith("."):
            continue
        base, at, owner = name.rpartition("@")
        if not at:
            base, owner = name, ""
        if owner == me:
            continue
        if owner and owner not in dead:
            dead[owner] = liveness.dead(owner)
        if owner and not dead[owner]:
            continue
        if _return(active / name, outgoing / base):
            moved += 1
            whose = f"of dead daemon {owner}" if owner else "without an owner"
            log.info("%s: claim %s returned to outgoing/", base.split(",")[0], whose)
    for owner, is_dead in dead.items():
        if is_dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(liveness.owners / f"{owner}.lock")
    return moved  # the caller fsyncs outgoing/ when this is not 0


def _return(claim: Path, target: Path) -> bool:
    try:
        rename_new(claim, target)
        return True
    except FileNotFoundError:
        return False  # taken back by another daemon meanwhile
    except FileExistsError:
        with contextlib.suppress(OSError):
            a, b = os.stat(claim), os.stat(target)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):  # a rename cut half-way: one file, two names
                os.unlink(claim)
                return True
        log.error("%s: cannot return the claim: %s exists; left in outgoing_active/", claim.name, target.name)
        return False
