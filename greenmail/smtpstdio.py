"""``sendmail -bs``: the SMTP server (server.py) spoken on stdin/stdout.

Owns: reading lines of at most server.MAX_LINE octets from a file
descriptor, each wait bounded by a timeout (a client that stops talking is
left after TIMEOUT seconds, as smtpd's), and writing the replies. What a
client that goes away had not finished is dropped, never half-queued.
Must not touch: what the replies are (server.py), the queue.
"""

from __future__ import annotations

import contextlib
import os
import select

from greenmail.server import MAX_LINE, Server

TIMEOUT = 300.0  # seconds a client may stay silent (RFC 5321 4.5.3.2.7: at least 5 minutes)


class LineReader:
    """Lines (pieces of at most ``limit`` octets) from a file descriptor; None at end of input."""

    def __init__(self, fd: int, timeout: float = TIMEOUT, limit: int = MAX_LINE) -> None:
        self.fd, self.timeout, self.limit = fd, timeout, limit
        self._buf = b""
        self._eof = False

    def line(self) -> bytes | None:
        while True:
            end = self._buf.find(b"\n", 0, self.limit)
            if end >= 0 or len(self._buf) >= self.limit or (self._eof and self._buf):
                cut = end + 1 if end >= 0 else min(len(self._buf), self.limit)
                piece, self._buf = self._buf[:cut], self._buf[cut:]
                return piece
            if self._eof:
                return None
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"no input for {self.timeout:g}s")
            data = os.read(self.fd, 65536)
            self._eof = not data
            self._buf += data


def serve(server: Server, rfd: int, wfd: int, timeout: float = TIMEOUT) -> None:
    """Run one conversation to its QUIT, its end of input, or its timeout."""
    reader = LineReader(rfd, timeout)
    _write(wfd, server.greeting())
    try:
        while not server.closed:
            piece = reader.line()
            if piece is None:
                break
            reply = server.feed(piece)
            if reply:
                _write(wfd, reply)
    except TimeoutError:
        with contextlib.suppress(OSError, TimeoutError):
            _write(wfd, f"421 4.4.2 {server.hostname} Error: timeout exceeded\r\n".encode(), 1.0)
    except BrokenPipeError:
        pass  # the client went away: nothing it had not seen 250 for was kept
    finally:
        server.close()


def _write(fd: int, data: bytes, timeout: float = TIMEOUT) -> None:
    view = memoryview(data)
    while view:
        if not select.select([], [fd], [], timeout)[1]:
            raise TimeoutError(f"the client read nothing for {timeout:g}s")
        n = os.write(fd, view)
        view = view[n:]
