"""``greenmail sink``: a small SMTP receiver for development and demos.

Owns: accepting SMTP on one address with gevent, and storing each accepted
message (un-dot-stuffed, as received) as a file in DIR/new/ the maildir way
(written in DIR/tmp/, then renamed). It supports EHLO/HELO, MAIL, RCPT,
DATA, RSET, NOOP and QUIT, and answers commands in order (so pipelining
clients work). No fsync: it is a development relay, not a mail store.
Must not touch: the spool, the daemon.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket as stdsocket
import time
from pathlib import Path
from typing import BinaryIO

from gevent.server import StreamServer

log = logging.getLogger("greenmail.sink")
MAX_LINE = 4096
MAX_MESSAGE = 200 * 1024 * 1024
IDLE_TIMEOUT = 300
_counter = itertools.count()


class Sink:
    def __init__(self, maildir: Path | str, hostname: str = "greenmail-sink") -> None:
        self.maildir = Path(maildir)
        self.hostname = hostname
        for d in ("tmp", "new", "cur"):
            (self.maildir / d).mkdir(parents=True, exist_ok=True)

    def serve(self, host: str, port: int) -> StreamServer:
        server = StreamServer((host, port), self.handle)
        server.start()
        return server

    def handle(self, sock: stdsocket.socket, addr: tuple[str, int]) -> None:
        sock.settimeout(IDLE_TIMEOUT)
        sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)  # pipelined replies go out at once
        rfile = sock.makefile("rb")
        try:
            _Conversation(self, sock, rfile).run()
        except (OSError, TimeoutError) as e:
            log.info("sink: connection from %s ended: %s", addr[0], e)
        finally:
            rfile.close()
            sock.close()

    def store(self, rfile: BinaryIO) -> tuple[str, int] | None:
        """Read a DATA payload to its final dot into a new maildir file; (name, size) or None if too big."""
        name = f"{time.time():.6f}.P{os.getpid()}Q{next(_counter)}.{self.hostname}"
        tmp = self.maildir / "tmp" / name
        size = 0
        with open(tmp, "wb") as out:
            while True:
                line = rfile.readline(MAX_LINE * 256)
                if not line:
                    tmp.unlink()
                    raise ConnectionError("connection closed inside DATA")
                if line in (b".\r\n", b".\n"):
                    break
                if line.startswith(b"."):
                    line = line[1:]
                size += len(line)
                if size <= MAX_MESSAGE:
                    out.write(line)
        if size > MAX_MESSAGE:
            tmp.unlink()
            return None
        os.rename(tmp, self.maildir / "new" / name)
        return name, size


class _Conversation:
    def __init__(self, sink: Sink, sock: stdsocket.socket, rfile: BinaryIO) -> None:
        self.sink = sink
        self.sock = sock
        self.rfile = rfile
        self.sender: str | None = None
        self.rcpts: list[str] = []

    def reply(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def run(self) -> None:
        self.reply(f"220 {self.sink.hostname} ESMTP greenmail sink")
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                self.reply("500 5.5.2 line too long")
                return
            if not self.command(line.rstrip(b"\r\n").decode("utf-8", "replace")):
                return

    def command(self, line: str) -> bool:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            self.reply(
                f"250-{self.sink.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE}"
            )
        elif verb == "HELO":
            self.reply(f"250 {self.sink.hostname}")
        elif verb == "MAIL" and arg.upper().startswith("FROM:"):
            self.sender, self.rcpts = _path(arg[5:]), []
            self.reply("250 2.1.0 Ok")
        elif verb == "RCPT" and arg.upper().startswith("TO:"):
            if self.sender is None:
                self.reply("503 5.5.1 need MAIL first")
            else:
                self.rcpts.append(_path(arg[3:]))
                self.reply("250 2.1.5 Ok")
        elif verb == "DATA":
            self.data()
        elif verb in ("RSET", "NOOP"):
            if verb == "RSET":
                self.sender, self.rcpts = None, []
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            return False
        else:
            self.reply("502 5.5.2 command not recognised")
        return True

    def data(self) -> None:
        if self.sender is None or not self.rcpts:
            self.reply("503 5.5.1 need MAIL and RCPT first")
            return
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        stored = self.sink.store(self.rfile)
        if stored is None:
            self.reply("552 5.3.4 message too big")
        else:
            name, size = stored
            log.info(
                "sink: new/%s from=<%s> to=<%s> size=%d", name, self.sender, ">,<".join(self.rcpts), size
            )
            self.reply(f"250 2.0.0 Ok: stored as {name}")
        self.sender, self.rcpts = None, []


def _path(arg: str) -> str:
    arg = arg.strip().split(" ", 1)[0]
    return arg[1:-1] if arg.startswith("<") and arg.endswith(">") else arg
