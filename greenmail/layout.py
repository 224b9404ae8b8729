"""The spool's place on disk: its directory names, queue ids, and the two file-system primitives.

Owns: the names of the spool's directories and creating them (mode 0700),
the file-name grammar's writing side (queuefile.py parses it), queue ids
(enqueue time, pid and randomness, 24 upper-case hex digits) and
the time they carry, this host's name as file names may carry it, fsync of
a directory, and the rename that never replaces an existing file. Light on
purpose (os, errno, time and errors.py only): every way in imports it.
Must not touch: file contents, claims, delivery state, gevent.
"""

from __future__ import annotations

import errno
import os
import time

from greenmail.errors import SpoolError

TMP, OUTGOING, ACTIVE, FAILED, CORRUPT, HOLD, META, OWNERS = (
    "tmp",
    "outgoing",
    "outgoing_active",
    "failed",
    "corrupt",
    "hold",
    "meta",
    "owners",
)
DIRS = (TMP, OUTGOING, ACTIVE, FAILED, CORRUPT, HOLD, META, OWNERS)
# Submissions by other local users: write and enter, never list or read (sticky: nobody removes
# another's file; setgid: every file gets the directory's group, through which the daemon reads it).
MAILDROP = "maildrop"
MAILDROP_MODE = 0o3733
MAILDROP_FILE_MODE = 0o640
ROOT_MODE = 0o711  # others may pass through the spool directory to maildrop/, nothing more
MAX_MAILDROP = 64 * 1024 * 1024  # bytes a local user's submission may have (checked again at pickup)
ID_LENGTH = 24
MAX_ENVELOPE = 1024 * 1024  # the two envelope lines of a queue file together
_HEX = frozenset("0123456789ABCDEF")
HOST = (
    "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in os.uname().nodename)
    or "localhost"
)


def ensure(spool: str) -> None:
    """Create the spool directory (and its parents) and its subdirectories, where missing.

    The spool is made mode 0711, its subdirectories 0700, maildrop/ 3733
    (modes set explicitly: the umask does not matter). SpoolError (naming
    the spool) when that cannot be done.
    """
    try:
        try:
            os.mkdir(spool, ROOT_MODE)
            os.chmod(spool, ROOT_MODE)
        except FileNotFoundError:
            os.makedirs(spool, 0o755, exist_ok=True)
            os.chmod(spool, ROOT_MODE)
        except FileExistsError:
            if not os.path.isdir(spool):
                raise
        for d in DIRS:
            _mkdir(f"{spool}/{d}", 0o700)
        _mkdir(f"{spool}/{MAILDROP}", MAILDROP_MODE)
    except OSError as e:
        raise SpoolError(f"spool {spool}: cannot create: {e.strerror}") from None


def _mkdir(path: str, mode: int) -> None:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    if mode != 0o700:
        os.chmod(path, mode)  # the umask took bits away, and mkdir never sets the sticky/setgid bits


def new_id() -> str:
    """A fresh queue id: enqueue time in microseconds, pid and randomness, in hex."""
    return f"{time.time_ns() // 1000:013X}{os.getpid() & 0xFFFFF:05X}{os.urandom(3).hex().upper()}"


def is_own_id(qid: str) -> bool:
    """Whether ``qid`` has the shape of the ids greenmail makes."""
    return len(qid) == ID_LENGTH and _HEX.issuperset(qid)


def id_time(qid: str) -> float | None:
    """The enqueue time written into one of our ids; None for anything else."""
    return int(qid[:13], 16) / 1e6 if is_own_id(qid) else None


def format_name(qid: str, attempts: int, next_at: int) -> str:
    """A message's file name: ``ID``, or ``ID,ATTEMPTS,NEXT`` once it has been tried or is due later."""
    return f"{qid},{attempts},{next_at}" if attempts or next_at else qid


def mode(eight_bit: bool) -> int:
    """A queue file's mode: private, the owner's execute bit set for a message with 8-bit bytes.

    (Recorded once, when the file is written: no message is read again to know it.)
    """
    return 0o700 if eight_bit else 0o600


def is_8bit(st_mode: int) -> bool:
    return bool(st_mode & 0o100)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames and removals in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_new(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError rather than replacing a file there.

    renameat2(RENAME_NOREPLACE) where the kernel and file system have it;
    elsewhere a hard link and an unlink (a crash between the two leaves the
    file under both names; the source's directory is tmp/ or a claim, which
    cleaning and recovery handle).
    """
    code = _noreplace().rename(os.fsencode(src), os.fsencode(dst))
    if code == 0:
        return
    if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, -1):
        raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))
    os.link(src, dst)
    os.unlink(src)


def link_new(src: str, dst: str) -> None:
    """``rename_new`` for a file nobody else knows yet (a submission's temporary): a hard link and an unlink.

    Two system calls, but no C library to load, which a process per message
    would pay for; where hard links are not allowed, ``rename_new``.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        rename_new(src, dst)
        return
    os.unlink(src)


class _NoReplace:
    """renameat2(2) with RENAME_NOREPLACE through libc; ``rename`` returns 0 or an errno (-1: none)."""

    AT_FDCWD, RENAME_NOREPLACE = -100, 1

    def __init__(self) -> None:
        try:
            import ctypes  # loaded once per process, on the first rename

            libc = ctypes.PyDLL(
                None, use_errno=True
            )  # PyDLL: the GIL is kept (a release costs more than the call)
            self._fn = libc.renameat2
            self._get_errno = ctypes.get_errno
        except (OSError, AttributeError):
            self._fn = None
            return
        self._fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

    def rename(self, src: bytes, dst: bytes) -> int:
        if self._fn is None:
            return -1
        if self._fn(self.AT_FDCWD, src, self.AT_FDCWD, dst, self.RENAME_NOREPLACE) == 0:
            return 0
        return self._get_errno()


_INSTANCE: list[_NoReplace] = []


def _noreplace() -> _NoReplace:
    if not _INSTANCE:
        _INSTANCE.append(_NoReplace())
    return _INSTANCE[0]
