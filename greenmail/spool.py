"""The maildir-style spool: its directories and every rename in it.

Owns: enqueue (O_EXCL create in tmp/, write, fsync, rename into outgoing/,
fsync the directory), scan, claim (rename into outgoing_active/; losing the
race returns None), done, requeue, fail, quarantine, recovery of claims left
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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from greenmail import address, owners
from greenmail.errors import CorruptQueueFile, EnqueueError, GreenmailError
from greenmail.queuefile import (
    HOST,
    Entry,
    Envelope,
    State,
    added_headers,
    envelope_lines,
    format_name,
    id_time,
    new_id,
    parse_name,
    read_envelope,
)

log = logging.getLogger("greenmail.spool")

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
CHUNK = 64 * 1024
SMALL_BODY = 32 * 1024  # messages up to this size are read once, with the envelope
STALE_TMP = 86400
DONE_PREFIX = ".done."  # tmp/.done.*: retired messages waiting to be unlinked


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Claim:
    """A message this process has renamed into outgoing_active/ and must settle."""

    entry: Entry
    path: Path
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
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in DIRS:
                (self.path / d).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise GreenmailError(f"spool {self.path}: cannot create: {e.strerror}") from None

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
        written: list[tuple[str, Path]] = []
        try:
            items = [self._checked(*m) for m in messages]
            if len(items) == 1:
                written.append(self._write_tmp(*items[0]))
            elif items:
                from concurrent.futures import ThreadPoolExecutor  # only batches need it

                with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
                    written.extend(pool.map(lambda item: self._write_tmp(*item), items))
            for qid, tmp in written:
                os.rename(tmp, self.dir(OUTGOING) / qid)
            fsync_dir(self.dir(OUTGOING))
        except BaseException as e:
            for qid, tmp in written:
                for path in (tmp, self.dir(OUTGOING) / qid):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            if isinstance(e, OSError):
                raise EnqueueError(f"spool {self.path}: cannot write: {e.strerror}") from None
            raise
        return [qid for qid, _ in written]

    def _checked(
        self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO
    ) -> tuple[str, list[str], _Reader, bytes]:
        sender = address.check(sender, null_ok=True)
        rcpts = list(dict.fromkeys(address.check(r) for r in recipients))  # each address once
        if not rcpts:
            raise EnqueueError("no recipients")
        stream = _Reader(message)
        head = stream.head()
        if not head:
            raise EnqueueError("empty message")
        return sender, rcpts, stream, head

    def _write_tmp(self, sender: str, rcpts: list[str], stream: _Reader, head: bytes) -> tuple[str, Path]:
        qid, fd, tmp = self._create_tmp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(envelope_lines(sender, rcpts))
                f.write(added_headers(head, qid))
                for chunk in stream.chunks():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return qid, tmp

    def _create_tmp(self) -> tuple[str, int, Path]:
        for _ in range(100):
            qid = new_id()
            tmp = self.dir(TMP) / qid
            try:
                return qid, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
            except FileExistsError:
                continue
            except OSError as e:
                raise EnqueueError(f"spool {self.path}: cannot write: {e.strerror}") from None
        raise EnqueueError("cannot find a free queue id")

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
        return Claim(entry, Path(path), env, state, size, queued_at, body=body, has_meta=has_meta)

    def read_state(self, qid: str) -> State:
        return self._load_state(qid)[0]

    def _load_state(self, qid: str) -> tuple[State, bool]:
        """The message's state, and whether a state file exists."""
        try:
            with open(f"{self._meta}/{qid}.json", "rb") as f:
                return State.from_bytes(f.read()), True
        except FileNotFoundError:
            return State(), False

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
        """Unlink retired files, then make their retirement durable (one fsync of outgoing_active/)."""
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


def new_owner() -> str:
    """This daemon's name in claims: host, pid and a random part."""
    return f"{HOST}.{os.getpid()}.{os.urandom(4).hex()}"


class _Reader:
    """A message source (bytes or a binary stream) read in chunks, head first."""

    def __init__(self, source: bytes | BinaryIO) -> None:
        self._bytes = source if isinstance(source, bytes | bytearray | memoryview) else None
        self._stream = None if self._bytes is not None else source
        self._head = b""

    def head(self) -> bytes:
        if self._bytes is not None:
            self._head = bytes(self._bytes[: 256 * 1024])
            return self._head
        assert self._stream is not None
        parts = []
        size = 0
        while size < 256 * 1024:
            chunk = self._stream.read(CHUNK)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if b"\n\n" in chunk or b"\n\r\n" in chunk:
                break
        self._head = b"".join(parts)
        return self._head

    def chunks(self) -> Iterator[bytes]:
        if self._bytes is not None:
            yield bytes(self._bytes)
            return
        yield self._head
        assert self._stream is not None
        while chunk := self._stream.read(CHUNK):
            yield chunk
