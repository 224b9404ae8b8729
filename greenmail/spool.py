"""The maildir-style spool: its directories and every rename in it.

Owns: enqueue (O_EXCL create in tmp/, write, fsync, rename into outgoing/,
fsync the directory: dropoff.py, light for ``greenmail enqueue``, does the
writing), scan, claim (rename into outgoing_active/; losing the race
returns None), done, requeue, fail, quarantine, recovery of claims left
by dead daemons, and the owner lock that tells live daemons from dead ones.
Everything here is plain blocking file I/O: the daemon calls it through the
hub's threadpool.
Must not touch: gevent, SMTP codes, metrics, configuration files.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from greenmail import dropoff, owners
from greenmail.dropoff import ACTIVE, CORRUPT, FAILED, META, OUTGOING, OWNERS, TMP, fsync_dir
from greenmail.dropoff import DIRS as DIRS
from greenmail.dropoff import HOLD as HOLD
from greenmail.errors import CorruptQueueFile
from greenmail.queuefile import (
    HOST,
    Entry,
    Envelope,
    State,
    format_name,
    id_time,
    new_id,
    parse_name,
    read_envelope,
)

log = logging.getLogger("greenmail.spool")

SMALL_BODY = 32 * 1024  # messages up to this size are read once, with the envelope
STALE_TMP = 86400
DONE_PREFIX = ".done."  # tmp/.done.*: retired messages waiting to be unlinked
RM = next((p for p in ("/bin/rm", "/usr/bin/rm") if os.access(p, os.X_OK)), None)
RM_BATCH = 16  # fewer than this are unlinked here: a process start costs more
RM_SLICE = 2000
RM_TIMEOUT = 60.0


@dataclass
class Claim:
    """A message this process has renamed into outgoing_active/ and must settle."""

    entry: Entry
    path: str  # outgoing_active/NAME@OWNER (a str: made for every message)
    envelope: Envelope
    state: State
    size: int  # message bytes, without the envelope lines
    queued_at: float
    settled: bool = False  # done, requeued or failed: nothing more may happen to it
    body: bytes | None = None  # a small message, read with the envelope (no second open)
    has_meta: bool = False  # a state file exists in meta/

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def eight_bit(self) -> bool | None:
        """Whether the message has non-ASCII bytes; None when not read yet (big message)."""
        return None if self.body is None else not self.body.isascii()

    def open_body(self) -> BinaryIO:
        if self.body is not None:
            return io.BytesIO(self.body)
        f = open(self.path, "rb")  # noqa: SIM115 - the session closes it
        f.seek(self.envelope.body_offset)
        return f


class Spool:
    """One spool directory. ``owner`` names this daemon in its claims."""

    def __init__(self, path: Path | str, owner: str | None = None) -> None:
        self.path = Path(path)
        self.owner = owner or new_owner()
        self._outgoing, self._active, self._meta, self._tmp = (
            str(self.path / d) for d in (OUTGOING, ACTIVE, META, TMP)
        )
        self._lock_fd: int | None = None

    def dir(self, name: str) -> Path:
        return self.path / name

    def ensure(self) -> None:
        """Create the spool directories (mode 0700) where missing."""
        dropoff.ensure(str(self.path))

    # -- enqueue ---------------------------------------------------------------

    def enqueue(self, sender: str, recipients: list[str] | tuple[str, ...], message: bytes | BinaryIO) -> str:
        """Write one message durably into outgoing/ and return its queue id."""
        return self.enqueue_many([(sender, recipients, message)])[0]

    def enqueue_many(self, messages: Iterable[tuple[str, Sequence[str], bytes | BinaryIO]]) -> list[str]:
        """Write messages durably into outgoing/, all or none; their queue ids in order.

        Each is written and fsync'd in tmp/ (several fsyncs at once: the
        filesystem commits them together), then all are renamed into
        outgoing/ and the directory is fsync'd once. A crash before that
        leaves nothing in outgoing/; an error leaves nothing anywhere.
        """
        return dropoff.enqueue_many(str(self.path), messages)

    # -- the delivery side -----------------------------------------------------

    def scan(self, skip: frozenset[str] = frozenset()) -> list[Entry]:
        """Every message waiting in outgoing/ whose name is not in ``skip``.

        Names only: no file is opened. A file whose name is not a queue id
        (dropped in by another program) is renamed to a fresh id first;
        dot-files are left alone (writers may use them as temporaries).
        """
        out = []
        for name in sorted(os.listdir(self.dir(OUTGOING))):  # ids sort by enqueue time
            if name in skip or name.startswith("."):
                continue
            entry = parse_name(name) or self._adopt(name)
            if entry is not None:
                out.append(entry)
        return out

    def _adopt(self, name: str) -> Entry | None:
        qid = new_id()
        try:
            os.rename(self.dir(OUTGOING) / name, self.dir(OUTGOING) / qid)
        except FileNotFoundError:
            return None
        log.info("%s: adopted file %r dropped into outgoing/", qid, name)
        return Entry(qid, qid)

    def claim(self, entry: Entry) -> Claim | None:
        """Take a message for delivery; None when someone else took it first.

        Raises CorruptQueueFile after moving an unreadable file to corrupt/.
        """
        path = f"{self._active}/{entry.name}@{self.owner}"  # strings: this runs per message
        try:
            os.rename(f"{self._outgoing}/{entry.name}", path)
        except FileNotFoundError:
            return None
        try:
            return self._open_claim(entry, path)
        except CorruptQueueFile as e:
            os.rename(path, self.dir(CORRUPT) / entry.name)
            self.write_state(entry.id, State(last_error=f"corrupt: {e}"))
            raise CorruptQueueFile(f"{entry.id}: moved to corrupt/: {e}") from None

    def _open_claim(self, entry: Entry, path: str) -> Claim:
        try:  # O_NONBLOCK: a FIFO must not hang us; O_NOFOLLOW: no symlinks
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise CorruptQueueFile(f"cannot open: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CorruptQueueFile("not a regular file")
        body: bytes | None = None
        if st.st_size <= SMALL_BODY:  # small: one read, parsed in memory
            try:
                data = os.read(fd, st.st_size + 1)
            finally:
                os.close(fd)
            env = read_envelope(io.BytesIO(data))
            body = data[env.body_offset :]
            size = len(body)
        else:
            with os.fdopen(fd, "rb") as f:
                env = read_envelope(f)
            size = st.st_size - env.body_offset
        # always looked up: a crash between a state write and its rename leaves a fresh name with state
        state, has_meta = self._load_state(entry.id)
        queued_at = min(id_time(entry.id) or st.st_mtime, st.st_mtime)  # our ids carry the enqueue time
        return Claim(entry, path, env, state, size, queued_at, body=body, has_meta=has_meta)

    def read_state(self, qid: str) -> State:
        return self._load_state(qid)[0]

    def _load_state(self, qid: str) -> tuple[State, bool]:
        """The message's state, and whether a state file exists."""
        try:  # os.open: most messages have no state, and a failed open() costs twice as much
            fd = os.open(f"{self._meta}/{qid}.json", os.O_RDONLY)
        except FileNotFoundError:
            return State(), False
        with os.fdopen(fd, "rb") as f:
            return State.from_bytes(f.read()), True

    def write_state(self, qid: str, state: State) -> None:
        tmp = self.dir(TMP) / f".meta.{qid}.{os.urandom(4).hex()}"
        with open(tmp, "wb") as f:
            f.write(state.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.dir(META) / f"{qid}.json")
        fsync_dir(self.dir(META))

    def done(self, claim: Claim) -> None:
        """The message needs nothing more: remove it and its state, durably."""
        self.purge(self.retire(claim))

    def retire(self, claim: Claim) -> list[str]:
        """Take a finished message (then its state file) out of the queue by renames into tmp/.

        A rename is cheap and the queue is right at once: nothing retired is
        ever delivered again, even after a kill. Unlinking is slow (~0.1 ms
        of blocked wall time on ext4), so it is left to ``purge``, which the
        daemon runs in the threadpool for many messages at once. Returns the
        paths to purge. Not durable until ``purge`` (or ``sync_active``).
        """
        name = os.path.basename(claim.path)
        gone = [f"{self._tmp}/{DONE_PREFIX}{name}"]
        os.rename(claim.path, gone[0])
        if claim.has_meta:
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self._meta}/{claim.id}.json", f"{self._tmp}/{DONE_PREFIX}{name}.json")
                gone.append(f"{self._tmp}/{DONE_PREFIX}{name}.json")
        return gone

    def purge(self, paths: Iterable[str]) -> None:
        """Unlink retired files, then make their retirement durable (one fsync of outgoing_active/).

        A batch goes to one ``rm`` process when there is one: each ``os.unlink``
        here would release and retake the GIL, and the hub's thread, which
        shares it, lost about a fifth of its delivery rate to those hand-offs.
        """
        paths = list(paths)
        if len(paths) >= RM_BATCH and RM is not None and _rm(paths):
            paths = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.sync_active()

    def sync_active(self) -> None:
        """Make removals from outgoing_active/ durable (one fsync covers all before it)."""
        fsync_dir(self.dir(ACTIVE))

    def requeue(self, claim: Claim, next_at: int, *, attempt: bool = True, state: bool = True) -> Entry:
        """Put a claimed message back into outgoing/, due at ``next_at``.

        ``attempt`` counts this as a delivery attempt; ``state`` saves the
        claim's State (accepted recipients, last error) first.
        """
        if state:
            self.write_state(claim.id, claim.state)
        e = claim.entry
        new = e.renamed(e.attempts + (1 if attempt else 0), next_at)
        os.rename(claim.path, self.dir(OUTGOING) / new.name)
        fsync_dir(self.dir(OUTGOING))
        return new

    def fail(self, claim: Claim) -> None:
        """Move a message whose recipients are all settled, some failed, to failed/."""
        self.write_state(claim.id, claim.state)
        e = claim.entry
        os.rename(claim.path, self.dir(FAILED) / format_name(e.id, e.attempts + 1, 0))
        fsync_dir(self.dir(FAILED))

    # -- owners and recovery (owners.py) ------------------------------------------

    def lock_owner(self) -> None:
        """Announce this daemon: an flock'd file in owners/, held until exit."""
        self._lock_fd = owners.lock(self.dir(OWNERS), self.owner)

    def unlock_owner(self) -> None:
        if self._lock_fd is not None:
            owners.unlock(self.dir(OWNERS), self.owner, self._lock_fd)
            self._lock_fd = None

    def recover(self) -> int:
        """Return claims of dead daemons to outgoing/; a live daemon's are left alone."""
        moved = owners.recover(self.dir(OWNERS), self.dir(ACTIVE), self.dir(OUTGOING), self.owner)
        if moved:
            fsync_dir(self.dir(OUTGOING))
        return moved

    def clean_tmp(self, max_age: float = STALE_TMP) -> int:
        """Remove files in tmp/ older than ``max_age`` (writers that died), and retired messages."""
        removed = 0
        limit = time.time() - max_age
        with os.scandir(self.dir(TMP)) as it:
            for de in it:
                with contextlib.suppress(OSError):  # gone meanwhile, or a directory
                    if de.name.startswith(DONE_PREFIX) or de.stat(follow_symlinks=False).st_mtime < limit:
                        os.unlink(de.path)
                        removed += 1
        return removed

    def outgoing_mtime(self) -> int:
        return os.stat(self.dir(OUTGOING)).st_mtime_ns


def _rm(paths: list[str]) -> bool:
    """``rm -f`` the paths (in slices well under ARG_MAX); False if that could not be done."""
    import subprocess  # only the daemon removes

    try:
        for i in range(0, len(paths), RM_SLICE):
            done = subprocess.run(
                [RM, "-f", "--", *paths[i : i + RM_SLICE]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=RM_TIMEOUT,
                check=False,
            )
            if done.returncode != 0:
                log.warning("rm of delivered messages: %s", done.stderr.decode(errors="replace").strip())
                return False  # what is left is unlinked one by one
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("rm of delivered messages failed: %s", e)
        return False
    return True


def new_owner() -> str:
    """This daemon's name in claims: host, pid and a random part."""
    return f"{HOST}.{os.getpid()}.{os.urandom(4).hex()}"
