"""The SMTP server side as a sans-I/O state machine: ``sendmail -bs`` now, the listener next.

Owns: the replies to each command (HELO/EHLO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT, VRFY, HELP; STARTTLS, AUTH and BDAT refused), the order they may
come in, the checks of each address (rewritten as a submission is,
addresses.py) and of the size, and the DATA phase fed line by line with the
dots taken out. The message goes to a store opened at DATA (dropoff.Incoming:
``write``/``commit``/``abort``); 250 only once ``commit`` has made it
durable. A caller feeds it lines of at most MAX_LINE octets (longer ones in
pieces) and writes what it returns: memory stays bounded whatever a client sends.
Must not touch: sockets, files, gevent (the caller's loop does the I/O).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from typing import Protocol

from greenmail import address, wire
from greenmail.addresses import Rewriter
from greenmail.errors import AddressError, ConfigError, EnqueueError

MAX_LINE = 1000  # RFC 5321 4.5.3.1.4/6: a command line is at most 512 octets, a text line 1000
MAX_COMMAND = 512
MAX_RECIPIENTS = 1000
MAX_SIZE = 64 * 1024 * 1024
MAX_ERRORS = 20  # bad commands before the server hangs up (421), as Postfix's smtpd_hard_error_limit
_PATH = re.compile(r"(?i)(FROM|TO):\s*<([^<>]*)>((?:\s+[A-Za-z0-9][A-Za-z0-9-]*(?:=\S*)?)*)\s*$")


class Store(Protocol):
    id: str

    def write(self, data: bytes) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


Open = Callable[[str, Sequence[str]], Store]


class Server:
    """One SMTP conversation; ``greeting()`` first, then ``feed(line)`` for every line received."""

    def __init__(
        self,
        hostname: str,
        open_store: Open,
        rewriter: Rewriter,
        max_size: int = MAX_SIZE,
        max_recipients: int = MAX_RECIPIENTS,
        may_relay: bool = True,
        starttls: bool = False,
        check_password: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.hostname = hostname
        self.open_store = open_store
        self.rewriter = rewriter
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.may_relay = may_relay  # False: a client outside listener.allow (never an open relay)
        self.helo_name = ""
        self.esmtp = False
        self.starttls = starttls  # STARTTLS may be offered (the listener has a certificate)
        self.tls = False
        self.want_tls = False  # the caller is to start TLS now, then call tls_started()
        self.check_password = check_password  # AUTH PLAIN/LOGIN after TLS when given
        self.user: str | None = None  # who authenticated
        self._auth: tuple[str, str | None] | None = None  # a mechanism waiting for a 334 answer
        self.closed = False
        self.errors = 0
        self._sender: str | None = None
        self._rcpts: list[str] = []
        self._store: Store | None = None
        self._in_data = False
        self._bol = True  # the next DATA piece starts a line
        self._size = 0
        self._failed: bytes | None = None  # the reply DATA ends with when the message cannot be kept
        self._long = False  # a command line longer than MAX_COMMAND is being skipped

    @property
    def busy(self) -> bool:
        """In a transaction (after MAIL, before its end): a graceful stop lets it finish."""
        return self._sender is not None

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP greenmail\r\n".encode()

    def feed(self, piece: bytes) -> bytes:
        """A line (or a piece of a long one, ending without LF); the reply to send, maybe none."""
        if self.closed:
            return b""
        if self._in_data:
            return self._data(piece)
        if self._auth is not None and piece.endswith(b"\n") and len(piece) <= MAX_COMMAND:
            return self._auth_answer(piece.rstrip(b"\r\n"))
        if not piece.endswith(b"\n") or self._long:  # a command over MAX_COMMAND: skipped to its end
            self._long = not piece.endswith(b"\n")
            return b"" if self._long else self._error("500 5.5.2 Error: line too long")
        if len(piece) > MAX_COMMAND:
            return self._error("500 5.5.2 Error: line too long")
        try:
            line = piece.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            return self._error("500 5.5.2 Error: command is not UTF-8")
        verb, _, arg = line.partition(" ")
        handler = getattr(self, f"_do_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            return self._error("500 5.5.2 Error: command not recognized")
        return handler(arg.strip())

    def close(self) -> None:
        """The client went away: what was not committed is dropped."""
        self._reset()
        self.closed = True

    # -- commands ---------------------------------------------------------------------

    def _do_helo(self, arg: str) -> bytes:
        if not arg:
            return self._error("501 5.5.4 Syntax: HELO hostname")
        self._reset()
        self.helo_name, self.esmtp = arg.split()[0], False
        return _reply(f"250 {self.hostname}")

    def _do_ehlo(self, arg: str) -> bytes:
        if not arg:
            return self._error("501 5.5.4 Syntax: EHLO hostname")
        self._reset()
        self.helo_name, self.esmtp = arg.split()[0], True
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.max_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.starttls and not self.tls:
            lines.append("STARTTLS")
        if self.check_password is not None and self.tls and self.user is None:
            lines.append("AUTH PLAIN LOGIN")
        return b"".join(_reply(f"250{'-' if i < len(lines) - 1 else ' '}{x}") for i, x in enumerate(lines))

    def _do_mail(self, arg: str) -> bytes:
        if self._sender is not None:
            return self._error("503 5.5.1 Error: nested MAIL command")
        m = _PATH.match(arg)
        if m is None or m[1].upper() != "FROM":
            return self._error("501 5.5.4 Syntax: MAIL FROM:<address>")
        why = self._params(m[3])
        if why:
            return _reply(why)
        try:
            address.check(self.rewriter.sender(m[2]), null_ok=True)
        except AddressError as e:
            return self._error(f"501 5.1.7 Bad sender address syntax: {e}")
        self._sender = m[2]
        return _reply("250 2.1.0 Ok")

    def _params(self, text: str) -> str | None:
        for p in text.split():
            key, _, value = p.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 Bad SIZE parameter"
                if int(value) > self.max_size:
                    return "552 5.3.4 Message size exceeds fixed limit"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 Bad BODY parameter"
            elif key == "SMTPUTF8" and not value:
                pass
            else:
                return f"555 5.5.4 Unsupported option: {p}"
        return None

    def _do_rcpt(self, arg: str) -> bytes:
        if self._sender is None:
            return self._error("503 5.5.1 Error: need MAIL command")
        m = _PATH.match(arg)
        if m is None or m[1].upper() != "TO" or m[3].strip():
            return self._error("501 5.5.4 Syntax: RCPT TO:<address>")
        if len(self._rcpts) >= self.max_recipients:
            return _reply("452 4.5.3 Error: too many recipients")
        if not self.may_relay:
            return self._error("554 5.7.1 Relay access denied: this client may not submit mail")
        try:
            for r in self.rewriter.expand(m[2]):
                address.check(r)
        except AddressError as e:
            return self._error(f"501 5.1.3 Bad recipient address syntax: {e}")
        except ConfigError as e:
            return _reply(f"451 4.3.0 Error: the aliases cannot be read: {e}")
        self._rcpts.append(m[2])
        return _reply("250 2.1.5 Ok")

    def _do_data(self, arg: str) -> bytes:
        if self._sender is None:
            return self._error("503 5.5.1 Error: need MAIL command")
        if not self._rcpts:
            return self._error("554 5.5.1 Error: no valid recipients")
        try:
            self._store = self.open_store(self._sender, self._rcpts)
        except (EnqueueError, ConfigError) as e:
            self._reset()
            return _reply(f"451 4.3.0 Error: queue file write error: {e}")
        self._in_data, self._bol, self._size, self._failed = True, True, 0, None
        return _reply("354 End data with <CR><LF>.<CR><LF>")

    def _do_rset(self, arg: str) -> bytes:
        self._reset()
        return _reply("250 2.0.0 Ok")

    def _do_noop(self, arg: str) -> bytes:
        return _reply("250 2.0.0 Ok")

    def _do_quit(self, arg: str) -> bytes:
        self.close()
        return _reply("221 2.0.0 Bye")

    def _do_vrfy(self, arg: str) -> bytes:
        return _reply("252 2.0.0 Send some mail, and we will try our best")

    def _do_help(self, arg: str) -> bytes:
        return _reply("214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

    def _do_expn(self, arg: str) -> bytes:
        return self._error("502 5.5.1 Error: command not implemented")

    def _do_starttls(self, arg: str) -> bytes:
        if not self.starttls:
            return self._error("502 5.5.1 Error: command not implemented")
        if self.tls:
            return self._error("503 5.5.1 Error: TLS already active")
        if arg:
            return self._error("501 5.5.4 Syntax: STARTTLS")
        self._reset()
        self.want_tls = True
        return _reply("220 2.0.0 Ready to start TLS")

    def tls_started(self) -> None:
        """TLS is up: everything learnt before it is forgotten (RFC 3207 4.2)."""
        self._reset()
        self.want_tls, self.tls, self.helo_name, self.esmtp = False, True, "", False

    def _do_auth(self, arg: str) -> bytes:
        if self.check_password is None:
            return self._error("502 5.5.1 Error: command not implemented")
        if not self.tls:
            return self._error("538 5.7.11 Encryption required for requested authentication mechanism")
        if self.user is not None or self._sender is not None:
            return self._error(
                "503 5.5.1 Error: already authenticated" if self.user else "503 5.5.1 Error: MAIL given"
            )
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in ("PLAIN", "LOGIN"):
            return self._error("504 5.5.4 Unrecognized authentication type")
        if not initial:
            self._auth = (mech, None)
            return _reply("334 " if mech == "PLAIN" else "334 VXNlcm5hbWU6")
        return self._auth_answer(initial.strip().encode(), mech)

    def _auth_answer(self, line: bytes, mech: str | None = None) -> bytes:
        pending, self._auth = self._auth, None
        mech = mech or (pending[0] if pending else "PLAIN")
        if line == b"*":
            return self._error("501 5.7.0 Authentication aborted")
        try:
            data = base64.b64decode(line, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return self._error("501 5.5.2 Cannot decode response")
        if mech == "LOGIN" and (pending is None or pending[1] is None):
            self._auth = ("LOGIN", data)  # the user name; the password next
            return _reply("334 UGFzc3dvcmQ6")
        if mech == "LOGIN":
            assert pending is not None and pending[1] is not None
            user, password = pending[1], data
        else:
            parts = data.split("\0")
            if len(parts) != 3:
                return self._error("501 5.5.2 Malformed PLAIN response")
            user, password = parts[1], parts[2]
        assert self.check_password is not None
        if not user or not self.check_password(user, password):
            return self._error("535 5.7.8 Error: authentication failed")
        self.user = user
        self.may_relay = True
        return _reply("235 2.7.0 Authentication successful")

    _do_bdat = _do_turn = _do_etrn = _do_expn

    # -- DATA -------------------------------------------------------------------------------

    def _data(self, piece: bytes) -> bytes:
        if self._bol and wire.is_end_of_data(piece):
            return self._end_of_data()
        piece = wire.unstuff_piece(piece, self._bol)
        self._bol = piece.endswith(b"\n")
        self._size += len(piece)
        if self._failed is None and self._size > self.max_size:
            self._failed = b"552 5.3.4 Error: message file too big\r\n"
        if self._failed is None:
            try:
                assert self._store is not None
                self._store.write(piece)
            except (EnqueueError, OSError) as e:
                self._failed = _reply(f"451 4.3.0 Error: queue file write error: {e}")
        return b""

    def _end_of_data(self) -> bytes:
        store, self._store = self._store, None
        self._in_data = False
        failed = self._failed
        assert store is not None
        if failed is None:
            try:
                qid = store.commit()
            except EnqueueError as e:  # commit has removed what it wrote
                failed = _reply(f"{'554 5.6.0' if 'empty' in str(e) else '451 4.3.0'} Error: {e}")
            else:
                self._reset()
                return _reply(f"250 2.0.0 Ok: queued as {qid}")
        store.abort()
        self._reset()
        return failed

    # -- helpers -------------------------------------------------------------------------------

    def _reset(self) -> None:
        if self._store is not None:
            self._store.abort()
            self._store = None
        self._sender, self._rcpts, self._in_data = None, [], False

    def _error(self, reply: str) -> bytes:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.close()
            return _reply(f"421 4.7.0 {self.hostname} Error: too many errors")
        return _reply(reply)


def _reply(text: str) -> bytes:
    return text.encode() + b"\r\n"
