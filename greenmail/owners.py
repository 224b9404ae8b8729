"""Which daemons are alive, and taking back the claims of dead ones.

Owns: each daemon's liveness file in owners/ (flock'd for the daemon's
lifetime, locked under a temporary name and renamed into place so no one
sees it unlocked), and recovery: a claim in outgoing_active/ named
``NAME@OWNER`` goes back to outgoing/ only when OWNER's lock can be taken,
so one daemon never takes back a live daemon's claims (same host or a shared
filesystem). Plain blocking file I/O: the daemon calls it in the threadpool.
Must not touch: gevent, message contents.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger("greenmail.spool")


def lock(owners: Path, owner: str) -> int:
    """Create and lock ``owners/OWNER.lock``; the returned fd holds the lock."""
    tmp = owners / f".{owner}.lock"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(tmp, owners / f"{owner}.lock")
    return fd


def unlock(owners: Path, owner: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(owners / f"{owner}.lock")
    os.close(fd)


def alive(owners: Path, owner: str) -> bool:
    """Whether OWNER holds its lock (a missing lock file means a dead owner)."""
    try:
        fd = os.open(owners / f"{owner}.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def recover(owners: Path, active: Path, outgoing: Path, me: str) -> int:
    """Move dead owners' claims back to outgoing/ (not yet fsync'd); returns how many."""
    live: dict[str, bool] = {}
    moved = 0
    for name in os.listdir(active):
        base, at, owner = name.rpartition("@")
        if not at or owner == me:
            continue
        if owner not in live:
            live[owner] = alive(owners, owner)
        if live[owner]:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.rename(active / name, outgoing / base)
            moved += 1
            log.info("%s: claim of dead daemon %s returned to outgoing/", base.split(",")[0], owner)
    for owner, is_live in live.items():
        if not is_live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(owners / f"{owner}.lock")
    return moved  # the caller fsyncs outgoing/ when this is not 0
