"""Putting messages into the spool: the writing half that ``greenmail enqueue`` needs.

Owns: the spool's directory names and creating them; queue ids; the bytes a
new queue file starts with (envelope lines, the Date:/Message-ID: headers
added where missing); the durable write: O_EXCL create in tmp/, write, fsync,
rename into outgoing/, fsync the directory. Spool.enqueue and the light
``greenmail enqueue`` path both call ``enqueue_many``; queuefile.py re-exports
the format pieces. Light on purpose: os, time and greenmail's address checks
and errors only — no pathlib, re, logging, dataclasses or typing at run time,
because a process per message pays for every import.
Must not touch: claims, scans, delivery state (spool.py, queuefile.py), gevent.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from greenmail import address, purepath
from greenmail.errors import EnqueueError, GreenmailError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence
    from typing import BinaryIO

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
HEAD = 256 * 1024  # how far enqueue reads (and looks for Date:/Message-ID:) before writing
HOST = (
    "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in os.uname().nodename)
    or "localhost"
)
_HEADER_NAME = bytes(b for b in range(0x21, 0x7F) if b != ord(":"))  # the bytes of a field name


# -- the directories ---------------------------------------------------------------


def ensure(spool: str) -> None:
    """Create the spool directory and its subdirectories (mode 0700) where missing."""
    try:
        _mkdir(spool, 0o700, parents=True)
        for d in DIRS:
            _mkdir(f"{spool}/{d}", 0o700, parents=False)
    except OSError as e:
        raise GreenmailError(f"spool {spool}: cannot create: {e.strerror}") from None


def _mkdir(path: str, mode: int, parents: bool) -> None:
    """``Path(path).mkdir(mode, parents=parents, exist_ok=True)``, step for step."""
    try:
        os.mkdir(path, mode)
    except FileNotFoundError:
        up = purepath.parent(path)
        if not parents or up == purepath.pure(path):
            raise
        _mkdir(up, 0o777, parents=True)
        _mkdir(path, mode, parents=False)
    except OSError:
        if not _is_dir(path):
            raise


def _is_dir(path: str) -> bool:
    """``Path.is_dir``: False when missing, an error for other failures (EACCES) as pathlib has it."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            raise
        return False
    except ValueError:
        return False


# -- what a new queue file starts with ----------------------------------------------


def rfc5322_date(when: float | None = None) -> str:
    """The local time as an RFC 5322 date (without importing the email package: enqueue starts fast)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(when))


def new_id() -> str:
    """A fresh queue id: enqueue time in microseconds, pid and randomness, in hex."""
    return f"{time.time_ns() // 1000:013X}{os.getpid() & 0xFFFFF:05X}{os.urandom(3).hex().upper()}"


def envelope_lines(sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    return f"{sender}\n{','.join(recipients)}\n".encode()


def _starts_with_header(head: bytes) -> bool:
    """Whether ``head`` starts with a header field name and its colon (printable ASCII but ':')."""
    colon = head.find(b":")
    return colon > 0 and not head[:colon].translate(None, _HEADER_NAME)


def _header_end(head: bytes) -> int:
    """Where the first blank line (after LF or CRLF) is; -1 when none. A CR before it stays in the block."""
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    return min(ends) if ends else -1


def added_headers(head: bytes, qid: str) -> bytes:
    """Date:/Message-ID: lines for a message starting with ``head``, where missing.

    ``head`` is the first bytes of the message (its header block, or as much
    of it as was read). When the message does not start with a header line,
    the result ends with a blank line so that the added headers stand apart.
    """
    eol = b"\r\n" if head.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    has_header = _starts_with_header(head)
    if has_header:
        end = _header_end(head)
        block = (b"\n" + (head[:end] if end >= 0 else head)).lower()
    else:
        block = b""  # no header section: whatever looks like one is body
    lines = []
    if b"\ndate:" not in block:
        lines.append(b"Date: " + rfc5322_date().encode())
    if b"\nmessage-id:" not in block:
        lines.append(f"Message-ID: <{qid}@{HOST}>".encode())
    if not lines:
        return b""
    out = eol.join(lines) + eol
    if not has_header and not head.startswith((b"\n", b"\r\n")):
        out += eol  # the message starts with body text: keep it apart from the headers
    return out


# -- the durable write ----------------------------------------------------------------


def enqueue_many(spool: str, messages: Iterable[tuple[str, Sequence[str], bytes | BinaryIO]]) -> list[str]:
    """Write messages durably into ``spool``/outgoing/, all or none; their queue ids in order.

    Each is written and fsync'd in tmp/ (several fsyncs at once: the
    filesystem commits them together), then all are renamed into
    outgoing/ and the directory is fsync'd once. A crash before that
    leaves nothing in outgoing/; an error leaves nothing anywhere.
    ``spool`` is the directory as pathlib spells it (it appears in errors).
    """
    outgoing = f"{spool}/{OUTGOING}"
    written: list[tuple[str, str]] = []
    try:
        items = [_checked(*m) for m in messages]
        if len(items) == 1:
            written.append(_write_tmp(spool, *items[0]))
        elif items:
            from concurrent.futures import ThreadPoolExecutor  # only batches need it

            with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
                written.extend(pool.map(lambda item: _write_tmp(spool, *item), items))
        for qid, tmp in written:
            os.rename(tmp, f"{outgoing}/{qid}")
        fsync_dir(outgoing)
    except BaseException as e:
        for qid, tmp in written:
            for path in (tmp, f"{outgoing}/{qid}"):
                _unlink_quietly(path)
        if isinstance(e, OSError):
            raise EnqueueError(f"spool {spool}: cannot write: {e.strerror}") from None
        raise
    return [qid for qid, _ in written]


def _checked(
    sender: str, recipients: Sequence[str], message: bytes | BinaryIO
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


def _write_tmp(spool: str, sender: str, rcpts: list[str], stream: _Reader, head: bytes) -> tuple[str, str]:
    qid, fd, tmp = _create_tmp(spool)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(envelope_lines(sender, rcpts))
            f.write(added_headers(head, qid))
            for chunk in stream.chunks():
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return qid, tmp


def _create_tmp(spool: str) -> tuple[str, int, str]:
    for _ in range(100):
        qid = new_id()
        tmp = f"{spool}/{TMP}/{qid}"
        try:
            return qid, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise EnqueueError(f"spool {spool}: cannot write: {e.strerror}") from None
    raise EnqueueError("cannot find a free queue id")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames and removals in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:  # noqa: SIM105 - contextlib would be one more import on the enqueue path
        os.unlink(path)
    except OSError:
        pass


class _Reader:
    """A message source (bytes or a binary stream) read in chunks, head first."""

    def __init__(self, source: bytes | BinaryIO) -> None:
        self._bytes = source if isinstance(source, bytes | bytearray | memoryview) else None
        self._stream = None if self._bytes is not None else source
        self._head = b""

    def head(self) -> bytes:
        if self._bytes is not None:
            self._head = bytes(self._bytes[:HEAD])
            return self._head
        assert self._stream is not None
        parts = []
        size = 0
        while size < HEAD:
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
