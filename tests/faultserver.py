"""A scripted, fault-injecting SMTP server for tests (stdlib only: socket + threading).

The script maps a stage to an action. Stages: banner, helo (EHLO and HELO), ehlo (EHLO only;
when given, it takes precedence over helo for EHLO), mail, rcpt, data (the reply to DATA),
message (the reply after the final dot, or to BDAT ... LAST), bdat (the reply to a BDAT chunk
that is not the last), auth (the reply to AUTH and to each line answering a 334), rset, quit.
An action is one of:
  - a reply: str (lines separated by "\\n", each sent with CRLF) or raw bytes sent as is
    (in JSON: {"raw": "garbage\\r\\n"}, latin-1);
  - "drop": close the connection; "stall": read on, never answer, until the client closes;
  - "huge": a 10 MB line without a newline; "endless": "250-x" lines until the client leaves;
  - "trickle": one "250-x" line every 50 ms, forever; "deaf": neither read nor answer, until stop();
  - {"reply": action, "then": action}: the reply, then (e.g.) "drop", "stall" or "deaf";
  - {"wait": seconds, "reply": action}: the reply after that long (reading nothing meanwhile);
  - a list: the Nth occurrence of the stage on a connection takes the Nth item; later
    occurrences get the default;
  - {"when": {substring: action, ...}, "else": action}: chosen by the command line
    (case-insensitive substring, e.g. a recipient address).
Stages missing from the script behave well: everything is accepted, in sequence (MAIL inside
a transaction, RCPT outside one and DATA without recipients get 503, as from a real relay).
After a 3xx reply to DATA the server reads the message up to the "." line.
BDAT (RFC 3030): "BDAT <n> [LAST]" is followed by exactly n octets, read whatever the reply;
chunks are answered by the bdat stage (default 250), BDAT LAST by the message stage, and the
message is recorded with its "chunks" (the sizes) and the assembled "data". After a chunk is
refused, further BDATs of the transaction get 503 (their octets are read and dropped).
Advertise extensions with ``{"ehlo": ehlo("PIPELINING", "CHUNKING", "SIZE 1000")}``.

Options (script keys that are not stages):
  - "hold_mail": "DATA": the pipelining proof. The reply to MAIL is held back until a line
    starting with that text (case-insensitive, e.g. "DATA" or "RCPT TO:<last@") has arrived
    on the connection: a client that waits for each reply times out, a pipelining client
    goes on. Lines read ahead are then answered in order.
  - "hold_dot": "RCPT" (with "hold_dot_count": N, default 1): the same proof for the next
    message: the reply to each of the first N final dots (or BDAT LAST) is held back until a
    line starting with that text has arrived after it, i.e. until the client has sent the next
    message's commands without waiting for the reply to the end of the previous message.

In-process:  ``with FaultServer({"rcpt": "550 no"}) as srv: ... srv.port ...``
Subprocess:  ``python tests/faultserver.py --port 0 --script '{"mail": "451 later"}' --log out.json``
prints "READY <port>" once listening and rewrites the JSON log after each session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
from typing import Any

DEFAULTS: dict[str, Any] = {
    "banner": "220 fault.test ESMTP",
    "ehlo": "250-fault.test\n250-PIPELINING\n250 8BITMIME",
    "helo": "250 fault.test",
    "mail": "250 2.1.0 ok",
    "rcpt": "250 2.1.5 ok",
    "data": "354 go ahead",
    "message": "250 2.0.0 queued",
    "rset": "250 ok",
    "quit": "221 bye",
}
DEFAULTS.update({"bdat": "250 2.0.0 chunk ok", "auth": "235 2.7.0 authenticated"})
VERBS = {
    "EHLO": "helo",
    "HELO": "helo",
    "MAIL": "mail",
    "RCPT": "rcpt",
    "DATA": "data",
    "RSET": "rset",
    "BDAT": "bdat",
    "AUTH": "auth",
}
HUGE = 10 * 1024 * 1024


def ehlo(*extensions: str, name: str = "fault.test") -> str:
    """An EHLO reply (for the "ehlo" script key) advertising ``extensions``, e.g. "SIZE 1000"."""
    lines = [name, *extensions]
    return "\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{ln}" for i, ln in enumerate(lines))


class _Closed(Exception):
    """The peer closed the connection, or the server is stopping."""


class FaultServer:
    def __init__(self, script: dict[str, Any] | None = None, log_path: str | None = None) -> None:
        self.script = dict(script or {})  # may be replaced between sessions
        self.log_path = log_path
        self.port = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._active = 0
        self._max = 0
        self._conns: list[list[str]] = []  # command lines per connection
        self._messages: list[dict[str, Any]] = []
        self._closed = 0  # connections fully handled

    # -- lifecycle -------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.settimeout(0.05)
        self._listener, self.port = s, s.getsockname()[1]
        self._spawn(self._accept_loop)
        return self.port

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            socks = list(self._socks)
        for c in socks:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(5)
        if self._listener is not None:
            self._listener.close()
        self._write_log()

    def __enter__(self) -> FaultServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            conn.settimeout(0.05)
            with self._lock:
                self._socks.add(conn)
                self._active += 1
                self._max = max(self._max, self._active)
                self._conns.append([])
                index = len(self._conns) - 1
            self._spawn(self._serve, conn, index)

    # -- accessors (thread-safe snapshots) -------------------------------------

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def closed(self) -> int:
        with self._lock:
            return self._closed

    @property
    def max_concurrent(self) -> int:
        with self._lock:
            return self._max

    def commands(self, conn: int | None = None) -> list[str]:
        """Command lines (without CRLF) of one connection, or of all of them in order."""
        with self._lock:
            if conn is not None:
                return list(self._conns[conn])
            return [c for cs in self._conns for c in cs]

    def verbs(self, conn: int | None = None) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands(conn)]

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message read up to its final dot: conn, sender, recipients, data, wire, reply."""
        with self._lock:
            return [dict(m) for m in self._messages]

    def log(self) -> dict[str, Any]:
        with self._lock:
            return {
                "connections": len(self._conns),
                "max_concurrent": self._max,
                "commands": [list(c) for c in self._conns],
                "messages": [
                    {**m, "data": m["data"].decode("latin-1"), "wire": m["wire"].decode("latin-1")}
                    for m in self._messages
                ],
            }

    def _write_log(self) -> None:
        if self.log_path:
            with open(self.log_path, "w") as f:
                json.dump(self.log(), f, indent=1)

    # -- one connection --------------------------------------------------------

    def _serve(self, conn: socket.socket, index: int) -> None:
        c = _Conn(self, conn, index)
        try:
            c.run()
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self._socks.discard(conn)
                self._active -= 1
                self._closed += 1
            conn.close()
            self._write_log()

    def option(self, name: str) -> Any:
        with self._lock:
            return self.script.get(name)

    def action(self, stage: str, occurrence: int, line: str) -> Any:
        is_ehlo = stage == "helo" and line[:4].upper() == "EHLO"
        with self._lock:
            act = self.script.get("ehlo") if is_ehlo and "ehlo" in self.script else self.script.get(stage)
        default = DEFAULTS["ehlo" if is_ehlo else stage]
        while isinstance(act, list) or (isinstance(act, dict) and "when" in act):
            if isinstance(act, list):
                act = act[occurrence - 1] if occurrence <= len(act) else None
            else:
                hits = [a for key, a in act["when"].items() if key.lower() in line.lower()]
                act = hits[0] if hits else act.get("else")
        return default if act is None else act


class _Conn:
    def __init__(self, server: FaultServer, sock: socket.socket, index: int) -> None:
        self.srv, self.sock, self.index = server, sock, index
        self.buf, self.pos = bytearray(), 0  # received bytes, and how far they are consumed
        self.counts: dict[str, int] = {}
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.chunks: list[bytes] | None = []  # BDAT chunks of the transaction (None: one was refused)
        self.in_auth = False  # the last AUTH reply was a 334: the next line answers it

    def run(self) -> None:
        self.do("banner", "")
        while True:
            line = self.readline().rstrip(b"\r\n").decode("latin-1")
            with self.srv._lock:
                self.srv._conns[self.index].append(line)
            verb = line.split(" ", 1)[0].upper()
            stage = VERBS.get(verb, "quit" if verb == "QUIT" else "")
            if self.in_auth:
                stage = "auth"
            if stage == "bdat":
                self.bdat(line)
                continue
            if stage == "mail" and self.srv.option("hold_mail"):
                self.hold(str(self.srv.option("hold_mail")))
            if not stage:
                self.send(b"250 ok\r\n" if verb == "NOOP" else b"500 5.5.1 unknown command\r\n")
                continue
            if self.out_of_sequence(stage):
                self.send(b"503 5.5.1 bad sequence of commands\r\n")
                continue
            reply = self.do(stage, line)
            if stage == "quit":
                return
            code = reply[:1]
            if stage == "auth":
                self.in_auth = code == b"3"
            elif stage == "mail" and code == b"2":
                self.sender, self.rcpts = (line.split(":", 1)[-1].strip().split(" ", 1)[0].strip("<>"), [])
                self.chunks = []
            elif stage == "rcpt" and code == b"2":
                self.rcpts.append(line.split(":", 1)[-1].strip().strip("<>"))
            elif stage == "rset":
                self.sender, self.rcpts, self.chunks = None, [], []
            elif stage == "data" and code == b"3":
                self.read_message()

    def out_of_sequence(self, stage: str) -> bool:
        """Like a real relay, unless the script overrides the stage: MAIL inside a transaction,
        RCPT outside one, DATA with no accepted recipient get 503."""
        with self.srv._lock:
            if self.srv.script.get(stage) is not None:
                return False
        return (
            (stage == "mail" and self.sender is not None)
            or (stage == "rcpt" and self.sender is None)
            or (stage == "data" and not self.rcpts)
        )

    def hold(self, prefix: str) -> None:
        """Read ahead (without consuming) until a line starting with ``prefix`` has arrived."""
        want = prefix.lower().encode("latin-1")
        while True:
            start = self.pos
            while (nl := self.buf.find(b"\n", start)) >= 0:
                if bytes(self.buf[start:nl]).lower().startswith(want):
                    return
                start = nl + 1
            self.buf += self.recv()

    def hold_dot(self) -> None:
        prefix = self.srv.option("hold_dot")
        if prefix and self.counts.get("message", 0) < int(self.srv.option("hold_dot_count") or 1):
            self.hold(str(prefix))

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            del self.buf[: self.pos]
            self.pos = 0
            self.buf += self.recv()
        data, self.pos = bytes(self.buf[self.pos : self.pos + n]), self.pos + n
        return data

    def bdat(self, line: str) -> None:
        """RFC 3030: read the chunk's octets whatever happens, then answer."""
        args = line.split()[1:]
        if (
            not args
            or not (args[0].isascii() and args[0].isdigit())
            or len(args) > 2
            or (len(args) == 2 and args[1].upper() != "LAST")
        ):
            self.send(b"501 5.5.4 syntax: BDAT <size> [LAST]\r\n")
            return
        chunk = self.read_exactly(int(args[0]))
        last = len(args) == 2
        with self.srv._lock:
            scripted = self.srv.script.get("message" if last else "bdat") is not None
        if self.chunks is None or (not scripted and (self.sender is None or not self.rcpts)):
            self.send(b"503 5.5.1 bad sequence of commands\r\n")
            return
        chunks = [*self.chunks, chunk]
        if not last:
            reply = self.do("bdat", line)
            self.chunks = chunks if reply[:1] == b"2" else None
            return
        data = b"".join(chunks)
        msg = {"conn": self.index, "sender": self.sender, "recipients": list(self.rcpts)}
        msg.update(data=data, wire=data, reply=None, chunks=[len(c) for c in chunks])
        with self.srv._lock:
            self.srv._messages.append(msg)
        self.hold_dot()
        reply = self.do("message", line)
        with self.srv._lock:
            msg["reply"] = reply.decode("latin-1")
        self.sender, self.rcpts, self.chunks = None, [], []

    def read_message(self) -> None:
        wire, data = [], []
        while True:
            line = self.readline()
            wire.append(line)
            if line in (b".\r\n", b".\n"):
                break
            data.append(line[1:] if line.startswith(b".") else line)
        msg = {"conn": self.index, "sender": self.sender, "recipients": list(self.rcpts)}
        msg.update(data=b"".join(data), wire=b"".join(wire), reply=None)
        with self.srv._lock:
            self.srv._messages.append(msg)
        self.hold_dot()
        reply = self.do("message", "")
        with self.srv._lock:
            msg["reply"] = reply.decode("latin-1")
        self.sender, self.rcpts = None, []

    def do(self, stage: str, line: str) -> bytes:
        """Carry out the script for a stage; returns the reply sent (raises _Closed on drop)."""
        self.counts[stage] = self.counts.get(stage, 0) + 1
        act = self.srv.action(stage, self.counts[stage], line)
        if isinstance(act, dict) and "wait" in act:
            if self.srv._stopping.wait(act["wait"]):
                raise _Closed
            act = act["reply"]
        if isinstance(act, dict) and "then" in act:
            sent = self.perform(stage, act["reply"])
            self.perform(stage, act["then"])
            return sent
        return self.perform(stage, act)

    def perform(self, stage: str, act: Any) -> bytes:
        if isinstance(act, dict) and "raw" in act:
            act = act["raw"].encode("latin-1")
        if act == "drop":
            raise _Closed
        if act == "stall":
            while True:
                self.recv()
        if act == "huge":
            self.send(b"2" * HUGE)
            raise _Closed
        if act == "endless":
            while True:
                self.send(b"250-x\r\n" * 1000)
        if act == "trickle":
            while not self.srv._stopping.wait(0.05):
                self.send(b"250-x\r\n")
            raise _Closed
        if act == "deaf":
            self.srv._stopping.wait()
            raise _Closed
        data = act if isinstance(act, bytes) else "".join(f"{ln}\r\n" for ln in act.split("\n")).encode()
        self.send(data)
        return data

    def send(self, data: bytes) -> None:
        self.sock.settimeout(5)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(0.05)
        if self.srv._stopping.is_set():
            raise _Closed

    def recv(self) -> bytes:
        while True:
            if self.srv._stopping.is_set():
                raise _Closed
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise _Closed
            return data

    def readline(self) -> bytes:
        while (nl := self.buf.find(b"\n", self.pos)) < 0:
            del self.buf[: self.pos]
            self.pos = 0
            self.buf += self.recv()
        line, self.pos = bytes(self.buf[self.pos : nl + 1]), nl + 1
        return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--script", default="{}", help="JSON object: stage -> action")
    p.add_argument("--log", help="write a JSON log of what was seen here")
    a = p.parse_args(argv)
    srv = FaultServer(json.loads(a.script), a.log)
    port = srv.start(a.port)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"READY {port}", flush=True)
    while not done.wait(0.2):
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
