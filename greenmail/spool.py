"""The maildir-style spool: its directories and every rename in it, for delivery.

Owns: scanning outgoing/ (a name dropped in from outside is given an id of
greenmail's own first), claiming (rename into outgoing_active/; losing the
race returns None), reading a claim, the delivery state files (meta/ID.json,
written before the rename that depends on them), requeue, fail, retiring
delivered messages and purging them in batches, quarantine of unreadable
files, the owner locks and the recovery of claims no live daemon owns,
removal of stale temporaries. The operator's side (listing, hold, retry,
delete) is spooladmin.py; writing new messages is dropoff.py. No rename here
ever replaces a file (layout.rename_new). Everything is plain blocking file
I/O: the daemon calls it through the hub's threadpool (spoolqueue.py).
Must not touch: gevent, SMTP codes, metrics, configuration files.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from greenmail import dropoff, layout, maillog, owners, spooladmin
from greenmail.addresses import Rewriter
from greenmail.errors import CorruptQueueFile
from greenmail.layout import ACTIVE, CORRUPT, FAILED, HOLD, META, OUTGOING, OWNERS, TMP, fsync_dir, rename_new
from greenmail.layout import DIRS as DIRS
from greenmail.queue import Claim, Message, MessageInfo, State
from greenmail.queuefile import HOST, Entry, Envelope, id_time, new_id, parse_name, read_envelope

log = logging.getLogger("greenmail.spool")
qlog = logging.getLogger("greenmail.queue")

SMALL_BODY = 32 * 1024  # messages up to this size are read once, with the envelope
STALE_TMP = 86400
DONE_PREFIX = ".done."  # tmp/.done.*: retired messages waiting to be unlinked
WAKE = ".wake"  # outgoing/.wake: written by `queue retry` and `sendmail -q` to wake running daemons
RM = next((p for p in ("/bin/rm", "/usr/bin/rm") if os.access(p, os.X_OK)), None)
RM_BATCH = 16  # fewer than this are unlinked here: a process start costs more
RM_SLICE = 2000
RM_TIMEOUT = 60.0
ADOPT_SCAN = 64 * 1024
TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EIO)  # not the file's fault


@dataclass(eq=False, kw_only=True)
class SpoolClaim(Claim):
    """A claim on the spool: the file renamed into outgoing_active/ by this process."""

    entry: Entry
    path: str  # outgoing_active/NAME@OWNER (a str: made for every message)
    body_offset: int
    body: bytes | None = None  # a small message, read with the envelope (no second open)
    has_meta: bool = False  # a state file exists in meta/

    @property
    def in_memory(self) -> bool:
        return self.body is not None

    def open_body(self) -> BinaryIO:
        if self.body is not None:
            return io.BytesIO(self.body)
        f = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self.body_offset)
        return f


class Spool:
    """One spool directory. ``owner`` names this daemon in its claims."""

    def __init__(self, path: Path | str, owner: str | None = None, rewriter: Rewriter | None = None) -> None:
        self.path = Path(path)
        self.rewriter = rewriter
        self.owner = owner or new_owner()
        self._outgoing, self._active, self._meta, self._tmp = (
            str(self.path / d) for d in (OUTGOING, ACTIVE, META, TMP)
        )
        self._lock: owners.Lock | None = None
        self._liveness = owners.Liveness(self.path, self.dir(OWNERS))

    def dir(self, name: str) -> Path:
        return self.path / name

    def ensure(self) -> None:
        """Create the spool directories where missing (layout.ensure); SpoolError if that cannot be done."""
        layout.ensure(str(self.path))

    # -- enqueue (dropoff.py writes) ---------------------------------------------

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        """Write one message durably into outgoing/ and return its queue id."""
        return self.enqueue_many([(sender, recipients, message)])[0]

    def enqueue_many(self, messages: Iterable[Message]) -> list[str]:
        """Write messages durably into outgoing/, all or none; their queue ids in order."""
        return dropoff.enqueue_many(str(self.path), messages, self.rewriter)

    def incoming(self, sender: str, recipients: Sequence[str], trace: object = None) -> dropoff.Incoming:
        """A message to be written chunk by chunk (the SMTP listener)."""
        return dropoff.Incoming(str(self.path), sender, recipients, trace, self.rewriter)  # type: ignore[arg-type]

    # -- the delivery side -----------------------------------------------------

    def scan(self, skip: frozenset[str] = frozenset()) -> list[Entry]:
        """Every message waiting in outgoing/ whose name is not in ``skip``.

        Names only: no file of ours is opened. A file whose name is not one of
        ours (dropped in by another program) is renamed to a fresh id first;
        dot-files are left alone (writers may use them as temporaries).
        """
        out = []
        for name in sorted(os.listdir(self._outgoing)):  # ids sort by enqueue time
            if name in skip or name.startswith("."):
                continue
            entry = parse_name(name) or self.adopt(name)
            if entry is not None:
                out.append(entry)
        return out

    def adopt(self, name: str) -> Entry | None:
        """Give a file dropped into outgoing/ under a name of its own a fresh id, or quarantine it.

        The file is read once here (in the threadpool): an invalid one goes
        to corrupt/ under the name it came with; a valid one gets an id and
        its file name records whether it is 8-bit.
        """
        src = f"{self._outgoing}/{name}"
        try:
            why = _invalid(src)
            if why is not None:
                self.quarantine(src, Entry(name, name), why)
                log.error("file %r dropped into outgoing/ moved to corrupt/: %s", name, why)
                return None
            qid = new_id()
            os.chmod(src, layout.mode(_has_8bit(src)))
            rename_new(src, f"{self._outgoing}/{qid}")
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot take in the file %r dropped into outgoing/: %s", name, e)
            return None
        log.info("%s: adopted file %r dropped into outgoing/", qid, name)
        return Entry(qid, qid)

    def claim(self, entry: Entry) -> SpoolClaim | None:
        """Take a message for delivery; None when someone else took it first.

        Raises CorruptQueueFile after moving an unreadable file to corrupt/.
        """
        path = f"{self._active}/{entry.name}@{self.owner}"  # strings: this runs per message
        try:  # os.rename: the target carries this daemon's unique name, no other file can be there
            os.rename(f"{self._outgoing}/{entry.name}", path)
        except FileNotFoundError:
            return None
        try:
            return self._open_claim(entry, path)
        except CorruptQueueFile as e:
            self.quarantine(path, entry, str(e))
            raise CorruptQueueFile(f"{entry.id}: moved to corrupt/: {e}") from None

    def quarantine(self, path: str, entry: Entry, why: str) -> None:
        """Move an unusable file to corrupt/ (under a free name), its reason in its state."""
        target = self.dir(CORRUPT) / entry.name
        for _ in range(10):
            try:
                rename_new(path, target)
                break
            except FileExistsError:
                target = self.dir(CORRUPT) / f"{entry.name}.{os.urandom(3).hex()}"
        self.write_state(entry.id, State(last_error=f"corrupt: {why}"))

    def _open_claim(self, entry: Entry, path: str) -> SpoolClaim:
        try:  # O_NONBLOCK: a FIFO must not hang us; O_NOFOLLOW: no symlinks
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in TRANSIENT:  # the system's trouble, not the file's: the claim goes back
                os.rename(path, f"{self._outgoing}/{entry.name}")
                raise
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
        eight_bit = layout.is_8bit(st.st_mode) if body is None else not body.isascii()
        if not entry.attempts and not state.recipients:  # entering the queue: the first attempt
            uid = state.uid if state.uid is not None else st.st_uid
            line, fields = maillog.queue_entry(entry.id, env.sender, size, len(env.recipients), uid)
            maillog.emit(qlog, line, fields)
        return _claim(entry, path, env, state, size, queued_at, eight_bit, body, has_meta)

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
        """Replace the message's state file durably (the one rename that replaces: its own state)."""
        tmp = self.dir(TMP) / f".meta.{qid}.{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as f:
                f.write(state.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.dir(META) / f"{qid}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.dir(META))

    def retire(self, claim: SpoolClaim) -> list[str]:
        """Take a finished message (then its state file) out of the queue by renames into tmp/.

        A rename is cheap and the queue is right at once: nothing retired is
        ever delivered again, even after a kill. Unlinking is slow, so it is
        left to ``purge``, which the daemon runs in the threadpool for many
        messages at once. Returns the paths to purge. Not durable until
        ``purge`` (or ``sync_active``).
        """
        name = os.path.basename(claim.path)
        gone = [f"{self._tmp}/{DONE_PREFIX}{name}"]
        os.rename(claim.path, gone[0])  # as in claim(): a name only this daemon makes
        if claim.has_meta:
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self._meta}/{claim.id}.json", f"{self._tmp}/{DONE_PREFIX}{name}.json")
                gone.append(f"{self._tmp}/{DONE_PREFIX}{name}.json")
        return gone

    def done(self, claim: SpoolClaim) -> None:
        """The message needs nothing more: remove it and its state, durably."""
        self.purge(self.retire(claim))

    def purge(self, paths: Iterable[str]) -> None:
        """Unlink retired files, then make their retirement durable (one fsync of outgoing_active/).

        A batch goes to one ``rm`` process when there is one: each ``os.unlink``
        here would release and retake the GIL, which the hub's thread shares.
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

    def requeue(self, claim: SpoolClaim, next_at: int, *, attempt: bool = True, state: bool = True) -> Entry:
        """Put a claimed message back into outgoing/, due at ``next_at``.

        ``attempt`` counts this as a delivery attempt; ``state`` saves the
        claim's State (accepted recipients, last error) first.
        """
        if state:
            self.write_state(claim.id, claim.state)
        e = claim.entry
        new = e.renamed(e.attempts + (1 if attempt else 0), next_at)
        rename_new(claim.path, self.dir(OUTGOING) / new.name)
        fsync_dir(self.dir(OUTGOING))
        return new

    def fail(self, claim: SpoolClaim) -> None:
        """Move a message whose recipients are all settled, some failed, to failed/."""
        self.write_state(claim.id, claim.state)
        e = claim.entry
        rename_new(claim.path, self.dir(FAILED) / layout.format_name(e.id, e.attempts + 1, 0))
        fsync_dir(self.dir(FAILED))

    def counts(self) -> dict[str, int]:
        """Messages in failed/ and hold/, by a listing."""
        return {"failed": _count(self.dir(FAILED)), "held": _count(self.dir(HOLD))}

    # -- owners and recovery (owners.py) ------------------------------------------

    def lock_owner(self) -> None:
        """Announce this daemon: its locks, held until ``unlock_owner``."""
        self._lock = owners.Lock(self.path, self.dir(OWNERS), self.owner)

    def keep_owner(self) -> None:
        """Put this daemon's lock file back if someone removed it."""
        if self._lock is not None:
            self._lock.keep()

    def write_relay_status(self, outage: tuple[float, str] | None) -> None:
        """owners/OWNER.relay: since when and why this daemon cannot reach the relay (removed when it can)."""
        path = self.dir(OWNERS) / f"{self.owner}.relay"
        if outage is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        tmp = self.dir(OWNERS) / f".{self.owner}.relay.tmp"
        tmp.write_text(json.dumps({"since": outage[0], "why": outage[1]}))
        os.rename(tmp, path)

    def relay_outages(self) -> list[tuple[float, str]]:
        """The relay outages live daemons on this spool report, earliest first."""
        out = []
        for name in os.listdir(self.dir(OWNERS)):
            owner, dot, ext = name.rpartition(".")
            if not dot or ext != "relay" or owner.startswith("."):
                continue
            try:
                data = json.loads((self.dir(OWNERS) / name).read_text())
                if not self._liveness.dead(owner):
                    out.append((float(data["since"]), str(data["why"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out)

    def unlock_owner(self) -> None:
        with contextlib.suppress(OSError):
            self.write_relay_status(None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def recover(self) -> int:
        """Return claims no live daemon owns to outgoing/; a live daemon's are left alone."""
        moved = owners.recover(self._liveness, self.dir(ACTIVE), self.dir(OUTGOING), self.owner)
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

    def prune(self, max_age: float, now: float | None = None) -> dict[str, int]:
        """Remove what has been in failed/ or corrupt/ for longer than ``max_age`` seconds.

        The time a file went there is its ctime (a rename sets it); its state file goes too.
        One directory fsync per directory; a line in the log when anything was removed.
        """
        limit = (time.time() if now is None else now) - max_age
        removed = {}
        for d in (FAILED, CORRUPT):
            n = 0
            with os.scandir(self.dir(d)) as it:
                for de in it:
                    with contextlib.suppress(OSError):  # gone meanwhile, or taken by an operator
                        if de.name.startswith(".") or de.stat(follow_symlinks=False).st_ctime >= limit:
                            continue
                        if de.is_dir(follow_symlinks=False):
                            shutil.rmtree(de.path)
                        else:
                            os.unlink(de.path)
                        n += 1
                        qid = de.name.split(",", 1)[0]
                        if layout.is_own_id(qid):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(f"{self._meta}/{qid}.json")
            if n:
                fsync_dir(self.dir(d))
            removed[d] = n
        if any(removed.values()):
            log.info(
                "pruned %d message(s) from failed/ and %d file(s) from corrupt/ there for over %g days",
                removed[FAILED],
                removed[CORRUPT],
                max_age / 86400,
            )
        return removed

    def outgoing_mtime(self) -> int:
        return os.stat(self._outgoing).st_mtime_ns

    def wake_mtime(self) -> int:
        """When outgoing/.wake was last written (0: never)."""
        try:
            return os.stat(f"{self._outgoing}/{WAKE}").st_mtime_ns
        except FileNotFoundError:
            return 0

    # -- the operator's side (spooladmin.py) --------------------------------------

    def list(self) -> list[MessageInfo]:
        return spooladmin.list_messages(self)

    def show(self, qid: str) -> tuple[MessageInfo, BinaryIO]:
        return spooladmin.show(self, qid)

    def delete(self, qid: str) -> None:
        spooladmin.delete(self, qid)

    def delete_failed(self) -> int:
        return spooladmin.delete_failed(self)

    def hold(self, qid: str) -> bool:
        return spooladmin.hold(self, qid)

    def release_hold(self, qid: str) -> bool:
        return spooladmin.release(self, qid)

    def retry(self, qid: str) -> bool:
        return spooladmin.retry(self, qid)

    def retry_all(self) -> int:
        return spooladmin.retry_all(self)

    def wake(self) -> bool:
        """Tell daemons running on this spool to look at it now (outgoing/.wake is written); any running?"""
        fd = os.open(f"{self._outgoing}/{WAKE}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{time.time()}\n".encode())
        finally:
            os.close(fd)
        return any(self.live_owners())

    def live_owners(self) -> list[str]:
        """The daemons running on this spool, by their locks."""
        owners_dir = self.dir(OWNERS)
        names = [n[: -len(".lock")] for n in os.listdir(owners_dir) if n.endswith(".lock") and n[0] != "."]
        return [o for o in names if not self._liveness.dead(o)]


def _claim(
    entry: Entry,
    path: str,
    env: Envelope,
    state: State,
    size: int,
    queued_at: float,
    eight_bit: bool,
    body: bytes | None,
    has_meta: bool,
) -> SpoolClaim:
    return SpoolClaim(
        entry.id, env.sender, env.recipients, state, size, queued_at, entry.attempts, eight_bit,
        entry=entry, path=path, body_offset=env.body_offset, body=body, has_meta=has_meta,
    )  # fmt: skip


def _count(directory: Path) -> int:
    return sum(1 for name in os.listdir(directory) if not name.startswith("."))


def _invalid(path: str) -> str | None:
    """Why a file is not a queue file (not a regular file, a bad envelope, no message); None if it is one."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return "not a regular file"
    with open(path, "rb") as f:
        try:
            read_envelope(f)
        except CorruptQueueFile as e:
            return str(e)
    return None


def _has_8bit(path: str) -> bool:
    """Whether a file (a regular one: _invalid said so) has a byte outside ASCII, read in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(ADOPT_SCAN):
            if not chunk.isascii():
                return True
    return False


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
