"""The operator's side of the spool: listing messages, and hold, release, retry, delete.

Owns: describing every message of a spool (outgoing/, outgoing_active/,
hold/, failed/) and the operator's changes to them, each a rename that never
replaces a file, so it is safe while daemons run (a message being sent is
never changed underneath its session: MessageBusy). Bulk changes make their
renames durable with one fsync per directory.
Must not touch: SMTP, gevent, metrics.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from greenmail.errors import CorruptQueueFile, MessageBusy, NotFound
from greenmail.layout import ACTIVE, FAILED, HOLD, META, OUTGOING, TMP, fsync_dir, id_time, rename_new
from greenmail.queue import MessageInfo, State, iso_time, relay_waiting
from greenmail.queuefile import Entry, format_name, parse_name, read_envelope

if TYPE_CHECKING:
    from greenmail.spool import Spool

KINDS = {ACTIVE: "active", HOLD: "held", FAILED: "failed"}


@dataclass(frozen=True)
class Located:
    directory: str
    name: str  # file name in that directory
    entry: Entry

    def path(self, spool: Spool) -> Path:
        return spool.dir(self.directory) / self.name


def _locate_all(
    spool: Spool, directories: tuple[str, ...] = (OUTGOING, ACTIVE, HOLD, FAILED)
) -> list[Located]:
    out = []
    for directory in directories:
        for name in sorted(os.listdir(spool.dir(directory))):
            if name.startswith("."):
                continue
            base = name.rpartition("@")[0] or name if directory == ACTIVE else name
            entry = parse_name(base)
            if entry is None and directory in (OUTGOING, ACTIVE):
                entry = Entry(name, base)  # dropped in from outside, not yet given an id
            if entry is not None:
                out.append(Located(directory, name, entry))
    return out


def locate(spool: Spool, qid: str) -> Located:
    for loc in _locate_all(spool):
        if loc.entry.id == qid:
            return loc
    raise NotFound(f"{qid}: no such message in the queue")


def describe(spool: Spool, loc: Located) -> MessageInfo:
    error: str | None = None
    with open(loc.path(spool), "rb") as f:
        st = os.fstat(f.fileno())
        try:
            env = read_envelope(f)
            sender, rcpts, size = env.sender, list(env.recipients), st.st_size - env.body_offset
        except CorruptQueueFile as e:
            sender, rcpts, size = "", [], st.st_size
            error = f"unreadable: {e}"
    try:
        state = spool.read_state(loc.entry.id)
    except CorruptQueueFile as e:
        state = State(last_error=f"meta/{loc.entry.id}.json: {e}")
    error = state.last_error if rcpts else error
    if loc.directory == OUTGOING:
        kind = "deferred" if loc.entry.attempts else "queued"
    else:
        kind = KINDS[loc.directory]
    e = loc.entry
    return MessageInfo(
        id=e.id,
        state=kind,
        sender=sender,
        recipients=rcpts,
        size=size,
        attempts=e.attempts,
        queued_at=iso_time(min(id_time(e.id) or st.st_mtime, st.st_mtime)),
        next_attempt=iso_time(e.next_at) if e.next_at and kind in ("queued", "deferred") else None,
        last_error=error,
        recipient_states={r: state.recipients.get(r, "pending") for r in rcpts},
    )


def list_messages(spool: Spool) -> list[MessageInfo]:
    outages = spool.relay_outages()
    waiting = relay_waiting(*outages[0]) if outages else None
    now = time.time()
    out = []
    for loc in _locate_all(spool):
        with contextlib.suppress(FileNotFoundError):  # sent or moved while we looked
            info = describe(spool, loc)
            if waiting and loc.directory == OUTGOING and loc.entry.next_at <= now:
                info.waiting = waiting
            out.append(info)
    return out


def show(spool: Spool, qid: str) -> tuple[MessageInfo, BinaryIO]:
    """The message's description and the message itself (a file positioned at its start)."""
    loc = locate(spool, qid)
    info = describe(spool, loc)
    f = open(loc.path(spool), "rb")  # noqa: SIM115 - the caller closes it
    try:
        f.seek(read_envelope(f).body_offset)
    except CorruptQueueFile:
        f.seek(0)
    return info, f


def delete(spool: Spool, qid: str) -> None:
    """Remove a message that is not being sent right now."""
    loc = locate(spool, qid)
    doomed = _take_out(spool, loc)
    fsync_dir(spool.dir(loc.directory))
    _remove(spool, doomed, qid)


def _take_out(spool: Spool, loc: Located) -> Path:
    """Rename the message out of the queue into tmp/ (the caller makes that durable, then removes it)."""
    qid = loc.entry.id
    if loc.directory == ACTIVE:
        raise MessageBusy(f"{qid}: being delivered right now; try again when the attempt is over")
    doomed = spool.dir(TMP) / f".deleted.{loc.name}.{os.urandom(3).hex()}"
    try:
        rename_new(loc.path(spool), doomed)
    except FileNotFoundError:
        raise MessageBusy(f"{qid}: was claimed for delivery just now; try again") from None
    return doomed


def _remove(spool: Spool, doomed: Path, qid: str) -> None:
    os.unlink(doomed)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spool.dir(META) / f"{qid}.json")


def delete_failed(spool: Spool) -> int:
    """Remove every message in failed/ (one fsync for all)."""
    doomed = []
    for loc in _locate_all(spool, (FAILED,)):
        with contextlib.suppress(MessageBusy):
            doomed.append((_take_out(spool, loc), loc.entry.id))
    if doomed:
        fsync_dir(spool.dir(FAILED))
    for path, qid in doomed:
        _remove(spool, path, qid)
    return len(doomed)


def hold(spool: Spool, qid: str) -> bool:
    """Keep a message from being sent until released (False if already held)."""
    loc = locate(spool, qid)
    if loc.directory == HOLD:
        return False
    if loc.directory != OUTGOING:
        raise MessageBusy(f"{qid}: is {'being delivered right now' if loc.directory == ACTIVE else 'failed'}")
    _move(spool, loc, HOLD, loc.name)
    fsync_dir(spool.dir(HOLD))
    return True


def release(spool: Spool, qid: str) -> bool:
    """Give a held message back to the queue, due as it was."""
    loc = locate(spool, qid)
    if loc.directory != HOLD:
        return False
    _move(spool, loc, OUTGOING, loc.name)
    fsync_dir(spool.dir(OUTGOING))
    return True


def _move(spool: Spool, loc: Located, directory: str, name: str) -> None:
    try:
        rename_new(loc.path(spool), spool.dir(directory) / name)
    except FileNotFoundError:
        raise MessageBusy(f"{loc.entry.id}: was claimed for delivery just now; try again") from None


def retry(spool: Spool, qid: str) -> bool:
    """Make one message due now (a failed one goes back for its failed recipients)."""
    loc = locate(spool, qid)
    if loc.directory == ACTIVE:
        raise MessageBusy(f"{qid}: being delivered right now")
    if loc.directory == HOLD:
        raise MessageBusy(f"{qid}: is on hold; release it first")
    changed = _retry(spool, loc)
    if changed:
        fsync_dir(spool.dir(OUTGOING))
    return changed


def retry_all(spool: Spool) -> int:
    """Make every deferred message in outgoing/ due now (one fsync for all)."""
    n = 0
    for loc in _locate_all(spool, (OUTGOING,)):
        with contextlib.suppress(MessageBusy):  # claimed meanwhile: it is being tried now anyway
            n += _retry(spool, loc)
    if n:
        fsync_dir(spool.dir(OUTGOING))
    return n


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
