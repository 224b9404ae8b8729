"""Pure SMTP codecs: replies, commands and the DATA body.

Owns: the Reply model, an incremental reply parser with size caps, command
encoding that refuses CR/LF/NUL, a streaming dot-stuffer that normalises line
endings, and the matching un-stuffer (used by the sink and the tests).
Must not touch: sockets, files, clocks, logging, metrics, gevent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from greenmail.errors import CommandError, ProtocolError

MAX_LINE = 4096  # longest reply line accepted (RFC 5321 asks for 512)
MAX_LINES = 200  # most lines in one multi-line reply
MAX_REPLY = 64 * 1024  # most bytes in one reply

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.DOTALL)
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")
_FORBIDDEN = re.compile(r"[\r\n\x00]")
_EOL = re.compile(rb"\r\n|\r|\n")
MAX_TEXT_LINE = 998  # RFC 5321 4.5.3.1.6: 1,000 octets with the CRLF


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the 3-digit code and its text lines."""

    code: int
    lines: tuple[str, ...] = ("",)

    @property
    def cls(self) -> int:
        """The reply class: 2, 3, 4 or 5."""
        return self.code // 100

    @property
    def text(self) -> str:
        return " ".join(filter(None, self.lines))

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code at the start of the text, if any."""
        m = _ENHANCED.match(self.lines[0])
        return m.group(1) if m else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class ReplyParser:
    """Turns received bytes into Replies; keeps any surplus for the next one.

    Raises ProtocolError for a malformed line, a line over MAX_LINE, a reply
    of more than MAX_LINES lines or MAX_REPLY bytes, or a code that changes
    inside a multi-line reply.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0
        self._size = 0
        self.pending = False  # bytes of an unfinished reply are buffered

    def feed(self, data: bytes) -> None:
        self._buf += data
        self.pending = bool(self._buf or self._lines)
        self._check_partial()

    def _check_partial(self) -> None:
        """The unfinished last line may not grow past MAX_LINE."""
        if len(self._buf) - self._buf.rfind(b"\n") - 1 > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or None until more bytes arrive."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:  # (the unfinished line was measured when fed)
                self.pending = bool(self._buf or self._lines)
                return None
            if nl > MAX_LINE:
                raise ProtocolError(f"reply line longer than {MAX_LINE} bytes")
            raw = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            reply = self._line(raw, nl + 1)
            if reply is not None:
                self.pending = bool(self._buf)
                return reply

    def _line(self, raw: bytes, size: int) -> Reply | None:
        m = _REPLY_LINE.match(raw)
        if m is None:
            raise ProtocolError(f"malformed reply line {raw[:80]!r}")
        digits, sep, text = m.groups()
        code = int(digits)
        if self._lines and code != self._code:
            raise ProtocolError(f"reply code changed from {self._code} to {code}")
        self._code = code
        self._size += size
        self._lines.append(text.decode("utf-8", "replace") if text else "")
        if len(self._lines) > MAX_LINES or self._size > MAX_REPLY:
            raise ProtocolError("reply too long")
        if sep == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code, self._size = [], 0, 0
        return reply


def command(verb: str, arg: str | None = None) -> bytes:
    """Encode one SMTP command line; refuses CR, LF and NUL anywhere in it."""
    line = verb if arg is None else f"{verb} {arg}"
    if _FORBIDDEN.search(line):
        raise CommandError(f"refusing to send {verb} with CR, LF or NUL in it")
    return line.encode("utf-8") + b"\r\n"


def mail_from(sender: str) -> bytes:
    return command("MAIL", f"FROM:<{sender}>")


def rcpt_to(recipient: str) -> bytes:
    return command("RCPT", f"TO:<{recipient}>")


class LineNormaliser:
    """Streams a message body with CR, LF and CRLF all made CRLF (for BDAT).

    A line longer than 998 octets is broken by inserting CRLF and a space
    (Postfix's smtp_line_length_limit does the same: the least damage to MIME
    mail), so that no line on the wire exceeds RFC 5321's 1,000 octets.
    State is kept across chunks, so any chunking of the input gives the same
    output. ``finish()`` ends an unterminated last line.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False
        self._col = 0  # octets of the current line sent so far

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if b"\r" not in chunk:  # the common cases first, without a regular expression
            out = chunk.replace(b"\n", b"\r\n")
        elif chunk.count(b"\r") == chunk.count(b"\n") == chunk.count(b"\r\n"):
            out = chunk
        else:
            out = _EOL.sub(b"\r\n", chunk)
        out = self._transform(self._fold(out))  # folded as the text is: a stuffed dot is not the text
        self._line_start = out.endswith(b"\r\n")
        return out

    def _transform(self, out: bytes) -> bytes:
        return out

    def _fold(self, out: bytes) -> bytes:
        """Break lines over MAX_TEXT_LINE octets (CRLF SP inserted); the common case is one search."""
        first = out.find(b"\r\n")
        head = first if first >= 0 else len(out)
        if self._col + head <= MAX_TEXT_LINE and (first < 0 or _short_lines(out, first + 2)):
            self._col = self._col + len(out) if first < 0 else len(out) - out.rfind(b"\n") - 1
            return out
        pieces = []
        col = self._col
        for i, line in enumerate(out.split(b"\r\n")):
            if i:
                pieces.append(b"\r\n")
                col = 0
            pos = 0
            while len(line) - pos > MAX_TEXT_LINE - col:
                take = MAX_TEXT_LINE - col
                pieces += (line[pos : pos + take], b"\r\n ")
                pos += take
                col = 1
            pieces.append(line[pos:])
            col += len(line) - pos
        self._col = col
        return b"".join(pieces)

    def finish(self) -> bytes:
        tail = b""
        if self._held_cr:
            self._held_cr = False
            self._line_start = True
            tail = b"\r\n"
        if not self._line_start:
            tail += b"\r\n"
            self._line_start = True
        self._col = 0
        return tail


def _short_lines(data: bytes, pos: int) -> bool:
    """Whether no CRLF-separated line of ``data[pos:]`` (the last one maybe unended) is over MAX_TEXT_LINE.

    One search per MAX_TEXT_LINE octets, not one per line: the line at ``pos`` is short when a CRLF
    ends within MAX_TEXT_LINE octets, and so is every line up to the last CRLF found there.
    """
    while len(data) - pos > MAX_TEXT_LINE:
        end = data.rfind(b"\r\n", pos, pos + MAX_TEXT_LINE + 2)
        if end < 0:
            return False
        pos = end + 2
    return True


class DotStuffer(LineNormaliser):
    """Streams a message body onto the wire for DATA.

    Line endings are normalised as by LineNormaliser; a line starting with "."
    gets another "."; ``finish()`` ends the last line and adds ".".
    """

    def _transform(self, out: bytes) -> bytes:
        out = out.replace(b"\r\n.", b"\r\n..")
        return b"." + out if self._line_start and out.startswith(b".") else out

    def finish(self) -> bytes:
        return super().finish() + b".\r\n"


def is_end_of_data(line: bytes) -> bool:
    """Whether a line received in DATA is the final "." (CRLF or a bare LF after it)."""
    return line in (b".\r\n", b".\n")


def unstuff_piece(piece: bytes, line_start: bool) -> bytes:
    """A piece of a received DATA line without the dot a sender added (RFC 5321 4.5.2)."""
    return piece[1:] if line_start and piece.startswith(b".") else piece


def stuff(data: bytes) -> bytes:
    """Dot-stuff a whole body at once (tests and small messages)."""
    s = DotStuffer()
    return s.feed(data) + s.finish()


def normalise(data: bytes) -> bytes:
    """What arrives at the far end for ``data``: CRLF line endings, last line ended, long lines broken.

    Written line by line, apart from the streaming LineNormaliser, so tests can hold one against the other.
    """
    out = _EOL.sub(b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return b"\r\n".join(_folded(line) for line in out.split(b"\r\n"))


def _folded(line: bytes) -> bytes:
    n = MAX_TEXT_LINE
    return b"\r\n ".join([line[:n], *(line[i : i + n - 1] for i in range(n, len(line), n - 1))])


class DotUnstuffer:
    """Receiving side of DATA: feed wire lines, collect the message until ".".

    ``feed_line`` takes one line including its CRLF and returns True once the
    terminating "." line has been seen.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def feed_line(self, line: bytes) -> bool:
        if is_end_of_data(line):
            return True
        line = unstuff_piece(line, True)
        self.parts.append(line)
        self.size += len(line)
        return False

    def data(self) -> bytes:
        return b"".join(self.parts)


def unstuff(wire: bytes) -> bytes:
    """Inverse of ``stuff`` for a complete DATA payload ending in CRLF.CRLF."""
    u = DotUnstuffer()
    for line in wire.splitlines(keepends=True):
        if u.feed_line(line):
            return u.data()
    raise ProtocolError("DATA payload has no terminating dot line")
