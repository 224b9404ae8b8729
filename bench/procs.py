"""The processes we start: spawning and stopping them by PID, the child subreaper (so
daemonizing peers stay our descendants), the /proc process table, reaping orphans and
ending strays left by an earlier step."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from bench.base import log

TRACKED: set[int] = set()  # PIDs owned by a Popen object: the orphan reaper leaves them alone
SERVICES: set[int] = set()  # roots of services that live for the whole run (the shared queue's database):
# never strays, and their CPU is not the peer's (a peer reads it itself)


def become_subreaper() -> None:
    """Orphans of anything we start (daemonizing postfix master, dma's children)
    are re-parented to us, so they stay in the measured process tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        log("warning: PR_SET_CHILD_SUBREAPER failed: daemons escape the measurement")


def child_log(path: Path) -> BinaryIO:
    """A log file opened for a child's stdout or stderr; spawn() closes our copy."""
    return open(path, "wb")  # noqa: SIM115 - closed by spawn()


def spawn(args: list[Any], **kw: Any) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([str(a) for a in args], **kw)
    TRACKED.add(p.pid)
    for k in ("stdout", "stderr"):  # log files opened for the child: the child has them now
        if hasattr(kw.get(k), "close"):
            kw[k].close()
    return p


def stop_proc(p: subprocess.Popen[bytes] | None, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    if p is None:
        return
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    TRACKED.discard(p.pid)


def proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, state)} of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(name)] = (int(rest[1]), rest[0].decode())
    return out


def tree(exclude: Iterable[int] = (), table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """Our descendants {pid: state}, without the subtrees rooted at ``exclude`` (the sink) and SERVICES."""
    return descendants(os.getpid(), set(exclude) | SERVICES, table)


def descendants(
    root: int, skip: Iterable[int] = (), table: dict[int, tuple[int, str]] | None = None
) -> dict[int, str]:
    """The processes below ``root`` {pid: state}, without the subtrees rooted at ``skip``."""
    skip = set(skip)
    table = proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    stack = [root]
    while stack:
        for c in kids.get(stack.pop(), ()):
            if c not in skip and c not in out:
                out[c] = table[c][1]
                stack.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def reap_orphans() -> None:
    """waitpid() zombies re-parented to us that no Popen owns (call from the main thread only)."""
    me = os.getpid()
    for pid, (ppid, state) in proc_table().items():
        if ppid == me and state == "Z" and pid not in TRACKED:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def kill_strays(exclude: Iterable[int] = ()) -> None:
    """TERM (then KILL) descendants left over from an earlier step: they are ours."""
    reap_orphans()
    left = [p for p, s in tree(exclude).items() if s != "Z"]
    if not left:
        return
    log(f"warning: terminating leftover processes {left}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        for _ in range(50):
            reap_orphans()
            if not any(alive(p) for p in left):
                return
            time.sleep(0.1)
