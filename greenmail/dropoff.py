"""Putting messages into the spool durably: the writing half that every way in shares.

Owns: the checks at submission (addresses, after addresses.py rewrote them;
an empty message; an envelope too big for a queue file), the bytes a new
queue file starts with (the envelope lines, a trace header the caller may
give, the From:/Date:/Message-ID: headers added where missing), and the
durable write: O_EXCL create in tmp/, write, fsync, a rename into outgoing/
that never replaces a file, fsync of the directory. A user who may not write
tmp/ (any local user but the daemon's) writes into maildrop/ instead: the
same file under a dot name, made group-readable for the daemon, fsync'd,
renamed to its final name and fsync'd again (the directory cannot be opened
by the user: on ext4 and xfs the second fsync commits the rename with the
inode). The daemon picks it up (spool.py). ``Incoming`` is that write fed
chunk by chunk (the SMTP listener); ``enqueue_many`` writes whole messages,
several at once. Whether a message has 8-bit bytes is seen here, once, and
kept in the file's mode (layout.mode).
Must not touch: claims, scans, delivery state (spool.py), gevent.
"""

from __future__ import annotations

import os
import time

from greenmail import address, layout
from greenmail.addresses import Rewriter
from greenmail.errors import EnqueueError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import BinaryIO

CHUNK = 64 * 1024
HEAD = 256 * 1024  # how far the header block is looked into for Date:/Message-ID:
_HEADER_NAME = bytes(b for b in range(0x21, 0x7F) if b != ord(":"))  # the bytes of a field name


# -- what a new queue file starts with ----------------------------------------------


def rfc5322_date(when: float | None = None) -> str:
    """The local time as an RFC 5322 date (without importing the email package: enqueue starts fast)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(when))


def envelope_lines(sender: str, recipients: Sequence[str]) -> bytes:
    lines = f"{sender}\n{','.join(recipients)}\n".encode()
    if len(lines) > layout.MAX_ENVELOPE:
        raise EnqueueError(
            f"envelope too big: {len(recipients)} recipients take {len(lines)} bytes, at most "
            f"{layout.MAX_ENVELOPE} fit in one queue file; split the message"
        )
    return lines


def _starts_with_header(head: bytes) -> bool:
    """Whether ``head`` starts with a header field name and its colon (printable ASCII but ':')."""
    colon = head.find(b":")
    return colon > 0 and not head[:colon].translate(None, _HEADER_NAME)


def header_end(head: bytes) -> int:
    """Where the first blank line (after LF or CRLF) is; -1 when none. A CR before it stays in the block."""
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    return min(ends) if ends else -1


def added_headers(head: bytes, qid: str, hostname: str = layout.HOST, sender: str | None = None) -> bytes:
    """From:/Date:/Message-ID: lines for a message starting with ``head``, where missing.

    From: is the envelope sender (MAILER-DAEMON@hostname for the null
    sender), added only when ``sender`` is given.

    ``head`` is the first bytes of the message (its header block, or as much
    of it as was read). When the message does not start with a header line,
    the result ends with a blank line so that the added headers stand apart.
    """
    eol = b"\r\n" if head.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    has_header = _starts_with_header(head)
    if has_header:
        end = header_end(head)
        block = (b"\n" + (head[:end] if end >= 0 else head)).lower()
    else:
        block = b""  # no header section: whatever looks like one is body
    lines = []
    if sender is not None and b"\nfrom:" not in block:
        lines.append(f"From: <{sender or 'MAILER-DAEMON@' + hostname}>".encode())
    if b"\ndate:" not in block:
        lines.append(b"Date: " + rfc5322_date().encode())
    if b"\nmessage-id:" not in block:
        lines.append(f"Message-ID: <{qid}@{hostname}>".encode())
    if not lines:
        return b""
    out = eol.join(lines) + eol
    if not has_header and not head.startswith((b"\n", b"\r\n")):
        out += eol  # the message starts with body text: keep it apart from the headers
    return out


# -- what every writer of a new message shares ---------------------------------------------


class Envelope:
    """A submission's checked envelope: addresses rewritten (``rewriter``: a submission; None: the
    queue's own mail and the backend used directly, as given), each recipient once; AddressError,
    EnqueueError for none."""

    def __init__(self, sender: str, recipients: Sequence[str], rewriter: Rewriter | None) -> None:
        if rewriter is not None:  # a submission: addresses rewritten, From: added where missing
            self.hostname: str = rewriter.hostname
            sender, recipients = rewriter.sender(sender), rewriter.recipients(recipients)
        else:
            self.hostname = layout.HOST
        self.add_from = rewriter is not None
        self.sender = address.check(sender, null_ok=True)
        self.recipients = list(dict.fromkeys(address.check(r) for r in recipients))  # each address once
        if not self.recipients:
            raise EnqueueError("no recipients")


class Head:
    """A new message fed in chunks to ``out``: the first ones are held until the header block is
    seen, then written after ``prefix`` with the header fields added where missing."""

    def __init__(self, out: BinaryIO, prefix: bytes, qid: str, env: Envelope) -> None:
        self.out = out
        self.prefix = prefix
        self.qid = qid
        self.env = env
        self._head: list[bytes] | None = []
        self._held = 0
        self.size = 0
        self.eight_bit = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self.eight_bit = self.eight_bit or not data.isascii()
        if self._head is None:
            self.out.write(data)
            return
        self._head.append(data)
        self._held += len(data)
        if (
            self._held >= HEAD
            or b"\n\n" in data
            or b"\n\r\n" in data
            or header_end(b"".join(self._head)) >= 0
        ):
            self._start()

    def _start(self) -> None:
        assert self._head is not None
        head = b"".join(self._head)
        self._head = None
        env = self.env
        added = added_headers(head[:HEAD], self.qid, env.hostname, env.sender if env.add_from else None)
        self.out.write(self.prefix + added + head)

    def finish(self) -> None:
        """Write what is held; EnqueueError for an empty message."""
        if self._head is not None:
            if not self._held:
                raise EnqueueError("empty message")
            self._start()


# -- the durable write ----------------------------------------------------------------


class Incoming:
    """One message being written into tmp/; ``commit`` makes it durable in outgoing/.

    Created with the checked envelope; ``write`` takes the message in
    chunks (the first ones are held until the header block is seen, so the
    added headers can be chosen); ``sync`` writes and fsyncs the file;
    ``publish`` renames it into outgoing/ (the caller fsyncs the directory);
    ``commit`` is both and the fsync. ``abort`` removes what was written.
    Plain blocking file I/O: the daemon calls it through its threadpool.
    """

    def __init__(
        self,
        spool: str,
        sender: str,
        recipients: Sequence[str],
        trace: Callable[[str], bytes] | None = None,
        rewriter: Rewriter | None = None,
    ) -> None:
        self.spool = spool
        env = Envelope(sender, recipients, rewriter)
        self.sender, self.recipients, self.hostname = env.sender, env.recipients, env.hostname
        envelope = envelope_lines(self.sender, self.recipients)
        self.id, fd, self._tmp = _create_tmp(spool)
        self.maildrop = self._tmp.startswith(f"{spool}/{layout.MAILDROP}/")
        self._file = os.fdopen(fd, "wb")
        self._body = Head(self._file, envelope + (trace(self.id) if trace is not None else b""), self.id, env)

    @property
    def size(self) -> int:
        return self._body.size

    @property
    def eight_bit(self) -> bool:
        return self._body.eight_bit

    def write(self, data: bytes) -> None:
        if self.maildrop and self.size + len(data) > layout.MAX_MAILDROP:
            raise EnqueueError(f"message too big: at most {layout.MAX_MAILDROP} bytes from a local user")
        self._body.write(data)

    def sync(self) -> None:
        """Write what is held and fsync the file; EnqueueError for an empty message."""
        self._body.finish()
        self._file.flush()
        if self.maildrop:
            os.fchmod(self._file.fileno(), layout.MAILDROP_FILE_MODE)
            os.fsync(self._file.fileno())
            return  # kept open: fsync'd again after the rename (see the module's docstring)
        os.fchmod(self._file.fileno(), layout.mode(self.eight_bit))
        os.fsync(self._file.fileno())
        self._file.close()

    def publish(self) -> str:
        """Rename the file into outgoing/ (maildrop/) under its final name; returns that name."""
        if self.maildrop:
            layout.link_new(self._tmp, f"{self.spool}/{layout.MAILDROP}/{self.id}")
            self._tmp = f"{self.spool}/{layout.MAILDROP}/{self.id}"  # what abort removes now
            os.fsync(self._file.fileno())
            self._file.close()
            return self.id
        layout.link_new(self._tmp, f"{self.spool}/{layout.OUTGOING}/{self.id}")
        return self.id

    def commit(self) -> str:
        """Durable in outgoing/ on return; the queue id. Any failure leaves nothing."""
        try:
            self.sync()
            name = self.publish()
            if not self.maildrop:
                try:
                    layout.fsync_dir(f"{self.spool}/{layout.OUTGOING}")
                except BaseException:
                    _unlink_quietly(f"{self.spool}/{layout.OUTGOING}/{name}")
                    raise
        except BaseException as e:
            self.abort()
            _reraise(e, self.spool)
        return self.id

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        _unlink_quietly(self._tmp)


class Dropoff:
    """The submission side of a spool and nothing more: what ``greenmail enqueue`` needs, light."""

    def __init__(self, spool: str, rewriter: Rewriter | None = None) -> None:
        layout.ensure(spool)
        self.spool = spool
        self.rewriter = rewriter

    def enqueue(self, sender: str, recipients: Sequence[str], message: bytes | BinaryIO) -> str:
        return enqueue_many(self.spool, [(sender, recipients, message)], self.rewriter)[0]


_DEFAULT: list[Rewriter] = []


def default_rewriter() -> Rewriter:
    """The host's defaults (no aliases), for a caller that gives no configuration."""
    if not _DEFAULT:
        _DEFAULT.append(Rewriter())
    return _DEFAULT[0]


def enqueue_many(
    spool: str,
    messages: Iterable[tuple[str, Sequence[str], bytes | BinaryIO]],
    rewriter: Rewriter | None = None,
) -> list[str]:
    """Write messages durably into ``spool``/outgoing/, all or none; their queue ids in order.

    Each is written and fsync'd in tmp/ (several fsyncs at once: the
    filesystem commits them together), then all are renamed into outgoing/
    and the directory is fsync'd once. A crash before that leaves nothing in
    outgoing/; an error leaves nothing anywhere.
    """
    written: list[Incoming] = []
    published: list[str] = []
    try:
        items = list(messages)
        if len(items) == 1:
            written.append(_write(spool, *items[0], rewriter))
        elif items:
            from concurrent.futures import ThreadPoolExecutor  # only batches need it

            with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
                futures = [pool.submit(_write, spool, *item, rewriter) for item in items]
                for f in futures:  # every one, so that a failure leaves none behind
                    if f.exception() is None:
                        written.append(f.result())
                for f in futures:
                    f.result()
        for incoming in written:
            published.append(incoming.publish())
        if any(not incoming.maildrop for incoming in written):
            layout.fsync_dir(f"{spool}/{layout.OUTGOING}")
    except BaseException as e:
        for incoming in written:
            incoming.abort()
        for incoming in written:
            if incoming.id in published and not incoming.maildrop:
                _unlink_quietly(f"{spool}/{layout.OUTGOING}/{incoming.id}")
        _reraise(e, spool)
    return [incoming.id for incoming in written]


def _write(
    spool: str, sender: str, recipients: Sequence[str], message: bytes | BinaryIO, rewriter: Rewriter | None
) -> Incoming:
    incoming = Incoming(spool, sender, recipients, rewriter=rewriter)
    try:
        for chunk in _chunks(message):
            incoming.write(chunk)
        incoming.sync()
    except BaseException:
        incoming.abort()
        raise
    return incoming


def _chunks(message: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(message, bytes | bytearray | memoryview):
        yield bytes(message)
        return
    while chunk := message.read(CHUNK):
        yield chunk


def _reraise(e: BaseException, spool: str) -> None:
    if isinstance(e, OSError):
        raise EnqueueError(f"spool {spool}: cannot write: {e.strerror or e}") from None
    raise e


def _create_tmp(spool: str) -> tuple[str, int, str]:
    """A new file in tmp/, or maildrop/.ID for a user who may not write tmp/: (id, fd, path)."""
    where = f"{spool}/{layout.TMP}/"
    for _ in range(100):
        qid = layout.new_id()
        tmp = f"{where}{qid}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except PermissionError as e:
            if where != f"{spool}/{layout.TMP}/" or not _other_user(spool):
                raise EnqueueError(f"spool {spool}: cannot write: {e.strerror}") from None
            where = f"{spool}/{layout.MAILDROP}/."  # another local user: the drop-off directory
            continue
        except OSError as e:
            raise EnqueueError(f"spool {spool}: cannot write: {e.strerror}") from None
        if os.geteuid() == 0 and where == f"{spool}/{layout.TMP}/":
            _give_to_owner(fd, where, tmp)
        return qid, fd, tmp
    raise EnqueueError("cannot find a free queue id")


def _give_to_owner(fd: int, directory: str, path: str) -> None:
    """Root's file in tmp/ becomes the spool owner's (cron's mail to root): a daemon running as
    its own user must read it, and a file mode 0600 of root's it could not."""
    try:
        st = os.stat(directory)
        if st.st_uid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError as e:
        os.close(fd)
        _unlink_quietly(path)
        raise EnqueueError(f"spool {directory}: cannot write: {e.strerror}") from None


def _other_user(spool: str) -> bool:
    """Whether this process is a local user other than root and the spool's owner (and maildrop/ is there)."""
    try:
        return os.geteuid() not in (0, os.stat(spool).st_uid) and os.path.isdir(f"{spool}/{layout.MAILDROP}")
    except OSError:
        return False


def _unlink_quietly(path: str) -> None:
    try:  # noqa: SIM105 - contextlib would be one more import on the enqueue path
        os.unlink(path)
    except OSError:
        pass
