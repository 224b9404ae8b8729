"""Queue management for ``greenmail queue``: list, show, delete, retry.

Owns: describing the messages of a spool and the operator's changes to
them, each a single atomic rename so it is safe while daemons run (a message
being sent is never changed underneath its session: MessageBusy).
Must not touch: SMTP, gevent, metrics.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from greenmail.errors import CorruptQueueFile, MessageBusy, NotFound
from greenmail.queuefile import Entry, State, format_name, id_time, parse_name, read_envelope
from greenmail.spool import ACTIVE, FAILED, HOLD, OUTGOING, TMP, Spool, fsync_dir


@dataclass
class Info:
    id: str
    state: str  # queued | deferred | active | failed | held
    sender: str
    recipients: list[str]
    size: int
    attempts: int
    queued_at: str
    next_attempt: str | None
    last_error: str | None
    recipient_states: dict[str, str]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Located:
    directory: str
    name: str  # file name in that directory
    entry: Entry

    def path(self, spool: Spool) -> Path:
        return spool.dir(self.directory) / self.name


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _locate_all(spool: Spool) -> list[Located]:
    out = []
    for directory in (OUTGOING, ACTIVE, HOLD, FAILED):
        for name in sorted(os.listdir(spool.dir(directory))):
            if name.startswith("."):
                continue
            entry = parse_name(name.rpartition("@")[0] if directory == ACTIVE else name)
            if entry is None and directory == OUTGOING:
                entry = Entry(name, name)  # dropped in by another program, not yet renamed
            if entry is not None:
                out.append(Located(directory, name, entry))
    return out


def locate(spool: Spool, qid: str) -> Located:
    for loc in _locate_all(spool):
        if loc.entry.id == qid:
            return loc
    raise NotFound(f"{qid}: no such message in the queue")


def describe(spool: Spool, loc: Located) -> Info:
    path = loc.path(spool)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            env = read_envelope(f)
            sender, rcpts, size = env.sender, list(env.recipients), st.st_size - env.body_offset
        except CorruptQueueFile as e:
            sender, rcpts, size = "", [], st.st_size
            error: str | None = f"unreadable: {e}"
    try:
        state = spool.read_state(loc.entry.id)
    except CorruptQueueFile as e:
        state = State(last_error=f"meta/{loc.entry.id}.json: {e}")
    error = state.last_error if rcpts else error
    if loc.directory == OUTGOING:
        kind = "deferred" if loc.entry.attempts else "queued"
    else:
        kind = {ACTIVE: "active", HOLD: "held", FAILED: "failed"}[loc.directory]
    e = loc.entry
    return Info(
        id=e.id,
        state=kind,
        sender=sender,
        recipients=rcpts,
        size=size,
        attempts=e.attempts,
        queued_at=_iso(min(id_time(e.id) or st.st_mtime, st.st_mtime)),
        next_attempt=_iso(e.next_at) if e.next_at and kind in ("queued", "deferred") else None,
        last_error=error,
        recipient_states={r: state.recipients.get(r, "pending") for r in rcpts},
    )


def list_messages(spool: Spool) -> list[Info]:
    out = []
    for loc in _locate_all(spool):
        with contextlib.suppress(FileNotFoundError):  # sent or moved while we looked
            out.append(describe(spool, loc))
    return out


def message_path(spool: Spool, qid: str) -> tuple[Info, Path, int]:
    """Info, the file and the offset where the message starts, for ``queue show``."""
    loc = locate(spool, qid)
    info = describe(spool, loc)
    with open(loc.path(spool), "rb") as f:
        try:
            offset = read_envelope(f).body_offset
        except CorruptQueueFile:
            offset = 0
    return info, loc.path(spool), offset


def delete(spool: Spool, qid: str) -> None:
    """Remove a message that is not being sent right now."""
    _delete(spool, locate(spool, qid))


def _delete(spool: Spool, loc: Located) -> None:
    qid = loc.entry.id
    if loc.directory == ACTIVE:
        raise MessageBusy(f"{qid}: being delivered right now; try again when the attempt is over")
    doomed = spool.dir(TMP) / f".deleted.{loc.name}"
    try:
        os.rename(loc.path(spool), doomed)
    except FileNotFoundError:
        raise MessageBusy(f"{qid}: was claimed for delivery just now; try again") from None
    fsync_dir(spool.dir(loc.directory))
    os.unlink(doomed)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spool.dir("meta") / f"{qid}.json")


def delete_failed(spool: Spool) -> int:
    """Remove every message in failed/."""
    n = 0
    for loc in _locate_all(spool):
        if loc.directory == FAILED:
            with contextlib.suppress(MessageBusy, FileNotFoundError):
                _delete(spool, loc)
                n += 1
    return n


def hold(spool: Spool, qid: str) -> bool:
    """Keep a message from being sent until released (False if already held)."""
    loc = locate(spool, qid)
    if loc.directory == HOLD:
        return False
    if loc.directory != OUTGOING:
        raise MessageBusy(f"{qid}: is {'being delivered right now' if loc.directory == ACTIVE else 'failed'}")
    _move(spool, loc, HOLD, loc.name)
    return True


def release(spool: Spool, qid: str) -> bool:
    """Give a held message back to the queue, due as it was."""
    loc = locate(spool, qid)
    if loc.directory != HOLD:
        return False
    _move(spool, loc, OUTGOING, loc.name)
    return True


def _move(spool: Spool, loc: Located, directory: str, name: str) -> None:
    try:
        os.rename(loc.path(spool), spool.dir(directory) / name)
    except FileNotFoundError:
        raise MessageBusy(f"{loc.entry.id}: was claimed for delivery just now; try again") from None
    fsync_dir(spool.dir(directory))


def retry(spool: Spool, qid: str) -> bool:
    """Make one message due now (a failed one goes back for its failed recipients)."""
    loc = locate(spool, qid)
    if loc.directory == ACTIVE:
        raise MessageBusy(f"{qid}: being delivered right now")
    if loc.directory == HOLD:
        raise MessageBusy(f"{qid}: is on hold; release it first")
    return _retry(spool, loc)


def retry_all(spool: Spool) -> int:
    """Make every deferred message in outgoing/ due now."""
    return sum(_retry(spool, loc) for loc in _locate_all(spool) if loc.directory == OUTGOING)


def _retry(spool: Spool, loc: Located) -> bool:
    e = loc.entry
    if loc.directory == OUTGOING and not e.next_at:
        return False
    if loc.directory == FAILED:
        state = spool.read_state(e.id)
        state.recipients = {r: s for r, s in state.recipients.items() if s != "failed"}
        state.bounced = []
        spool.write_state(e.id, state)
    _move(spool, loc, OUTGOING, format_name(e.id, e.attempts, 0))
    return True
