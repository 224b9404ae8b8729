"""Taking in the mail other local users left in maildrop/: untrusted input, checked.

Owns: the daemon's side of the drop-off directory (layout.MAILDROP): each
file is opened without following links and without blocking, and must be a
regular file with one link, a queue id for a name, at most
layout.MAX_MAILDROP bytes of message and a valid envelope; it is then copied
into outgoing/ under a fresh queue id (never one a user chose) with a
Received: line naming the submitting uid (the file's owner), the uid kept in
its state, and removed from maildrop/. Anything else goes to corrupt/ with a
log line; a copy that fails for the system's reasons (a full disk) leaves the
file where it is, for the next look. Dot names are files being written;
those older than STALE are removed.
Must not touch: gevent, delivery, sockets.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from typing import TYPE_CHECKING

from greenmail import layout, maillog
from greenmail.dropoff import CHUNK, Incoming, rfc5322_date
from greenmail.errors import AddressError, CorruptQueueFile, EnqueueError
from greenmail.queue import State
from greenmail.queuefile import Entry, read_envelope

if TYPE_CHECKING:
    from greenmail.spool import Spool

log = logging.getLogger("greenmail.pickup")
STALE = 24 * 3600  # seconds after which a dot file in maildrop/ is a dead submitter's
BATCH = 1000  # files taken in per look
TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EIO)


def pickup(spool: Spool) -> list[Entry]:
    """Take in what maildrop/ holds (up to BATCH files); the new outgoing/ entries.

    One taker at a time per spool (a lock on owners/.pickup, across delivery
    processes and daemons): two would copy one file twice.
    """
    drop = str(spool.dir(layout.MAILDROP))
    try:
        names = sorted(os.listdir(drop))
    except (FileNotFoundError, NotADirectoryError):
        return []
    if not names:
        return []
    lock = os.open(spool.dir(layout.OWNERS) / ".pickup", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # another process is taking them in
        return _take_all(spool, drop, names)
    finally:
        os.close(lock)


def _take_all(spool: Spool, drop: str, names: list[str]) -> list[Entry]:
    out = []
    for name in names[:BATCH]:
        if name.startswith("."):
            _remove_if_stale(f"{drop}/{name}")
            continue
        entry = _take(spool, drop, name)
        if entry is not None:
            out.append(entry)
    return out


def _take(spool: Spool, drop: str, name: str) -> Entry | None:
    path = f"{drop}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in TRANSIENT:
            log.error("cannot take in maildrop/%s now: %s", name, e.strerror)
            return None
        _reject(spool, path, name, os.lstat(path).st_uid, f"cannot open: {e.strerror}")
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        why = _check(name, st)
        incoming = None
        if why is None:
            try:
                env = read_envelope(f)
                incoming = Incoming(
                    str(spool.path), env.sender, env.recipients, _received(st.st_uid, spool), spool.rewriter
                )
            except (CorruptQueueFile, AddressError, EnqueueError) as e:
                why = str(e)
        if incoming is None:
            _reject(spool, path, name, st.st_uid, why or "unusable")
            return None
        try:
            spool.write_state(incoming.id, State(uid=st.st_uid))
            f.seek(env.body_offset)
            left = st.st_size - env.body_offset  # the size checked: a file still growing is cut there
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                incoming.write(chunk)
                left -= len(chunk)
            qid = incoming.commit()
        except EnqueueError as e:
            if "cannot write" not in str(e):
                _reject(spool, path, name, st.st_uid, str(e))
            else:
                log.error("cannot take in maildrop/%s now: %s", name, e)
            _drop_state(spool, incoming.id)
            return None
        except BaseException:
            incoming.abort()
            _drop_state(spool, incoming.id)
            raise
    os.unlink(path)
    line, fields = maillog.pickup(qid, st.st_uid, incoming.sender)
    log.info("%s", line, extra={"fields": fields})
    return Entry(qid, qid)


def _check(name: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink != 1:
        return f"a file with {st.st_nlink} links (not a submission of its owner's own)"
    if not layout.is_own_id(name):
        return "not a name greenmail gives submissions"
    if st.st_size > layout.MAX_MAILDROP + layout.MAX_ENVELOPE:
        return f"{st.st_size} bytes: over the {layout.MAX_MAILDROP} a local user may submit"
    return None


def _received(uid: int, spool: Spool) -> object:
    def trace(qid: str) -> bytes:
        host = spool.rewriter.hostname if spool.rewriter else layout.HOST
        return f"Received: by {host} (greenmail, from userid {uid})\n\tid {qid}; {rfc5322_date()}\n".encode()

    return trace


def _reject(spool: Spool, path: str, name: str, uid: int, why: str) -> None:
    """To corrupt/ as maildrop-NAME (no state file: a user's name must never touch a message's state)."""
    target = f"{spool.dir(layout.CORRUPT)}/maildrop-{name}"
    for _ in range(10):
        try:
            layout.rename_new(path, target)
            break
        except FileExistsError:
            target = f"{spool.dir(layout.CORRUPT)}/maildrop-{name}.{os.urandom(3).hex()}"
        except FileNotFoundError:
            return
    log.error("maildrop/%s (uid=%d) moved to corrupt/%s: %s", name, uid, os.path.basename(target), why)


def _drop_state(spool: Spool, qid: str) -> None:
    try:  # noqa: SIM105
        os.unlink(spool.dir(layout.META) / f"{qid}.json")
    except OSError:
        pass


def _remove_if_stale(path: str) -> None:
    try:
        if time.time() - os.lstat(path).st_mtime > STALE:
            os.unlink(path)
    except OSError:
        pass
