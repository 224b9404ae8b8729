"""``greenmail sink``: a small SMTP receiver for development and demos.

Owns: accepting SMTP on one address with gevent and storing each accepted
message as a file in DIR/new/ the maildir way (written in DIR/tmp/, then
renamed). The conversation is the listener's (server.py, listener.converse:
the same commands, pipelining, dot-unstuffing and limits); only the store
differs. No fsync and no rewriting of addresses beyond qualifying bare names:
it is a development relay, not a mail store.
Must not touch: the spool, the daemon.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket as stdsocket
import time
from collections.abc import Sequence
from pathlib import Path

from gevent.server import StreamServer

from greenmail.addresses import Rewriter
from greenmail.listener import converse
from greenmail.server import Server

log = logging.getLogger("greenmail.sink")
MAX_MESSAGE = 200 * 1024 * 1024
MAX_RECIPIENTS = 100000
IDLE_TIMEOUT = 300
_counter = itertools.count()


class _MaildirFile:
    """One message being written into DIR/tmp/, moved to DIR/new/ by ``commit``."""

    def __init__(self, sink: Sink, sender: str, rcpts: Sequence[str]) -> None:
        self.sink, self.sender, self.rcpts = sink, sender, list(rcpts)
        self.id = f"{time.time():.6f}.P{os.getpid()}Q{next(_counter)}.{sink.hostname}"
        self._tmp = sink.maildir / "tmp" / self.id
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit or abort
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> str:
        self._file.close()
        os.rename(self._tmp, self.sink.maildir / "new" / self.id)
        log.info(
            "sink: new/%s from=<%s> to=<%s> size=%d", self.id, self.sender, ">,<".join(self.rcpts), self.size
        )
        return self.id

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:  # noqa: SIM105
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class Sink:
    def __init__(self, maildir: Path | str, hostname: str = "greenmail-sink") -> None:
        self.maildir = Path(maildir)
        self.hostname = hostname
        self.rewriter = Rewriter(origin="localhost.localdomain", hostname=hostname)
        for d in ("tmp", "new", "cur"):
            (self.maildir / d).mkdir(parents=True, exist_ok=True)

    def serve(self, host: str, port: int) -> StreamServer:
        server = StreamServer((host, port), self.handle)
        server.start()
        return server

    def handle(self, sock: stdsocket.socket, addr: tuple[str, int]) -> None:
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)  # pipelined replies go out at once
        server = Server(
            self.hostname,
            lambda sender, rcpts: _MaildirFile(self, sender, rcpts),
            self.rewriter,
            MAX_MESSAGE,
            MAX_RECIPIENTS,
        )
        try:
            converse(sock, server, IDLE_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("sink: connection from %s ended: %s", addr[0], e)
        finally:
            server.close()
            sock.close()
