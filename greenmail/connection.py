"""One SMTP client connection to the relay, up to the point where mail can flow.

Owns: connecting with a timeout (relays tried in order: failover), TLS
(implicit, or STARTTLS then EHLO again, forgetting what was learned before),
AUTH, the EHLO extensions, and the reply-reading and command-writing
primitives with their timeouts and caps. Every failure here is connection
level: no message is blamed.
Must not touch: claims, the spool, the schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gevent import socket, ssl

from greenmail import auth, wire
from greenmail.config import RelayConfig, Timeouts
from greenmail.errors import (
    ConfigError,
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    RelayRefused,
    SmtpError,
    SmtpTimeout,
)
from greenmail.metrics import Metrics
from greenmail.protocol import HELO_FALLBACK, Action, Stage, decide
from greenmail.shaping import Throttle

log = logging.getLogger("greenmail.connection")
QUIT_TIMEOUT = 10.0


class TlsFailed(RelayRefused):
    """TLS could not be set up (handshake, verification, or STARTTLS missing when required)."""


class AuthFailed(RelayRefused):
    """Authentication was refused or impossible; no message is to blame."""


def tls_context(relay: RelayConfig) -> ssl.SSLContext:
    """The client TLS context: verified against the system store or ca_file, TLS >= 1.2."""
    ctx = ssl.create_default_context(cafile=str(relay.ca_file) if relay.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not relay.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if relay.tls_cert_file:
        key = str(relay.tls_key_file) if relay.tls_key_file else None
        ctx.load_cert_chain(str(relay.tls_cert_file), key)
    return ctx


@dataclass
class Transport:
    """What every connection needs, built once by the daemon."""

    relay: RelayConfig
    timeouts: Timeouts
    metrics: Metrics
    helo: str
    context: ssl.SSLContext | None = None
    password: str | None = field(default=None, repr=False)
    throttle: Throttle | None = None

    @classmethod
    def build(
        cls,
        relay: RelayConfig,
        timeouts: Timeouts,
        metrics: Metrics,
        helo: str,
        throttle: Throttle | None = None,
    ) -> Transport:
        """Raises ConfigError for unreadable certificates or password."""
        try:
            ctx = tls_context(relay) if relay.tls_mode != "none" else None
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"relay.ca_file/tls_cert_file/tls_key_file: cannot load: {e}") from None
        return cls(relay, timeouts, metrics, helo, ctx, relay.password(), throttle)


class Connection:
    def __init__(self, transport: Transport) -> None:
        self.tp = transport
        self.t = transport.timeouts
        self.metrics = transport.metrics
        self.sock: socket.socket | None = None
        self.parser = wire.ReplyParser()
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.closing: wire.Reply | None = None  # the relay said 421: read and send nothing more
        host, port = transport.relay.relays[0]
        self.relay = f"{host}:{port}"

    # -- opening -------------------------------------------------------------------

    def open(self) -> None:
        """Connect and greet the first relay that works; raise the last failure."""
        error: SmtpError | None = None
        for host, port in self.tp.relay.relays:
            try:
                self._connect(host, port)
                self._greet(host)
                return
            except SmtpError as e:
                error = e
                handshake_broken = isinstance(e, TlsFailed) and e.stage == "starttls"
                if self.sock is not None and isinstance(e, RelayRefused) and not handshake_broken:
                    self.quit()
                self.close()
                if len(self.tp.relay.relays) > 1:
                    log.warning("relay %s:%d: %s; trying the next", host, port, e)
        assert error is not None
        raise error

    def _connect(self, host: str, port: int) -> None:
        self.relay = f"{host}:{port}"
        self.parser = wire.ReplyParser()
        self.extensions, self.tls = {}, False
        try:
            self.sock = socket.create_connection((host, port), timeout=self.t.connect)
        except TimeoutError:
            self._counted("timeout")
            raise ConnectFailed(f"connect timed out after {self.t.connect:g}s", "timeout") from None
        except ConnectionRefusedError:
            self._counted("refused")
            raise ConnectFailed("connection refused", "refused") from None
        except OSError as e:
            self._counted("error")
            raise ConnectFailed(f"cannot connect: {e}", "error") from None
        self._counted("ok")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ip, rport = self.sock.getpeername()[:2]
        self.relay = f"{host}[{ip}]:{rport}"
        if self.tp.relay.tls_mode == "implicit":
            self._wrap(host)

    def _counted(self, result: str) -> None:
        self.metrics.connects.labels(result=result).inc()

    def _greet(self, host: str) -> None:
        self.metrics.stage_reached.labels(stage="banner").inc()
        banner = self.read(Stage.BANNER, self.t.banner)
        if decide(Stage.BANNER, banner) is not Action.PROCEED:
            raise RelayRefused(f"relay refused the session: {banner}", "banner")
        self._ehlo()
        mode = self.tp.relay.tls_mode
        if not self.tls and mode in ("starttls", "opportunistic"):
            if "STARTTLS" in self.extensions:
                self._starttls(host)
            elif mode == "starttls":
                why = "the relay does not offer STARTTLS; refusing to send in clear (relay.tls)"
                raise TlsFailed(why, "helo")
        if self.tp.relay.username:
            self._auth()

    def _ehlo(self) -> None:
        reply = self.command(wire.command("EHLO", self.tp.helo), Stage.HELO, self.t.command)
        action = decide(Stage.HELO, reply)
        if action is Action.FALLBACK:
            reply = self.command(wire.command("HELO", self.tp.helo), Stage.HELO, self.t.command)
            action = HELO_FALLBACK.get(reply.cls, Action.PROTOCOL)
            self.extensions = {}
        else:
            self.extensions = _extensions(reply)
        if action is Action.ABORT:
            raise RelayRefused(f"relay refused HELO: {reply}", "helo")
        if action is not Action.PROCEED:
            raise ProtocolError(f"unexpected reply to EHLO/HELO: {reply}", "helo")

    def _starttls(self, host: str) -> None:
        reply = self.command(b"STARTTLS\r\n", Stage.STARTTLS, self.t.command)
        if decide(Stage.STARTTLS, reply) is not Action.PROCEED:
            raise TlsFailed(f"relay refused STARTTLS: {reply}", "starttls")
        if self.parser.pending:  # bytes sent before the handshake must not count as TLS-protected
            raise ProtocolError("the relay sent data after its STARTTLS reply", "starttls")
        self._wrap(host)
        self._ehlo()  # RFC 3207 4.2: forget what was learned before TLS

    def _wrap(self, host: str) -> None:
        assert self.sock is not None and self.tp.context is not None
        name = self.tp.relay.tls_server_name or host
        self.sock.settimeout(self.t.command)
        try:
            self.sock = self.tp.context.wrap_socket(self.sock, server_hostname=name)
        except (ssl.SSLError, ssl.CertificateError) as e:
            why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
            raise TlsFailed(f"TLS with the relay failed: {why}", "starttls") from None
        except TimeoutError:
            raise TlsFailed("TLS handshake timed out", "starttls") from None
        except OSError as e:
            raise ConnectionLost(f"connection lost during the TLS handshake: {e}", "starttls") from None
        self.tls = True
        self.parser = wire.ReplyParser()

    def _auth(self) -> None:
        rc = self.tp.relay
        if not self.tls and not rc.auth_allow_plaintext:
            why = "refusing AUTH over a connection without TLS (relay.auth_allow_plaintext)"
            raise AuthFailed(why, "auth")
        if "AUTH" not in self.extensions:
            raise AuthFailed("the relay does not offer AUTH", "auth")
        mech = auth.choose(self.extensions["AUTH"], rc.auth_mechanisms)
        if mech is None:
            why = f"the relay offers AUTH {self.extensions['AUTH']}, none of relay.auth_mechanisms"
            raise AuthFailed(why, "auth")
        user, password = rc.username or "", self.tp.password or ""
        first = auth.initial(mech, user, password)
        line = f"AUTH {mech} {first}" if first else f"AUTH {mech}"
        reply = self.command(wire.command(line), Stage.AUTH, self.t.command)
        for step in range(3):
            action = decide(Stage.AUTH, reply)
            if action is not Action.CONTINUE:
                break
            answer = auth.respond(mech, step, reply.lines[0], user, password)
            reply = self.command(wire.command(answer), Stage.AUTH, self.t.command, count=False)
        if decide(Stage.AUTH, reply) is not Action.PROCEED:
            raise AuthFailed(f"authentication as {user} failed: {reply}", "auth")

    # -- the wire ------------------------------------------------------------------

    def command(self, line: bytes, stage: Stage, timeout: float, count: bool = True) -> wire.Reply:
        """Send one command and read its reply (no pipelining)."""
        self.send_commands([(line, stage)], count)
        return self.read(stage, timeout)

    def send_commands(self, lines: list[tuple[bytes, Stage]], count: bool = True) -> None:
        """Write commands in one go; the caller reads their replies in order."""
        if self.parser.pending:  # a reply before its command would be taken for the next one's
            raise ProtocolError("the relay sent a reply ahead of the command", lines[0][1].label)
        self.send(self.encode_commands(lines, count), lines[0][1].label, self.t.command)

    def encode_commands(self, lines: list[tuple[bytes, Stage]], count: bool = True) -> bytes:
        """Commands as one write; each counted as its stage reached (they are about to be sent)."""
        if count:
            for _, stage in lines:
                self.metrics.stage_reached.labels(stage=stage.label).inc()
        return b"".join(line for line, _ in lines)

    def send(self, data: bytes, label: str, timeout: float) -> None:
        sock = self.sock
        assert sock is not None
        sock.settimeout(timeout)
        try:
            sent = sock.send(data)  # gevent's sendall asks the kernel for SO_SNDBUF on every call
            if sent < len(data):
                deadline = time.monotonic() + timeout
                view = memoryview(data)[sent:]
                while view:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    view = view[sock.send(view) :]
        except TimeoutError:
            raise SmtpTimeout(f"timeout after {timeout:g}s sending", label) from None
        except OSError as e:
            raise ConnectionLost(f"connection lost while sending: {e}", label) from None

    def read(self, stage: Stage | None, timeout: float) -> wire.Reply:
        """The next reply, within ``timeout`` in all; counted under ``stage``."""
        assert self.sock is not None
        label = stage.label if stage is not None else "quit"
        deadline = time.monotonic() + timeout
        try:
            while (reply := self.parser.next_reply()) is None:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionLost("connection closed by the relay", label)
                self.parser.feed(data)
        except TimeoutError:
            raise SmtpTimeout(f"timeout after {timeout:g}s waiting for the {label} reply", label) from None
        except ProtocolError as e:
            if stage is not None:
                self.metrics.reply(stage.label, None)
            raise ProtocolError(str(e), label) from None
        except OSError as e:
            raise ConnectionLost(f"connection lost: {e}", label) from None
        if stage is not None:
            self.metrics.reply(stage.label, reply.code)
        if reply.code == 421:  # RFC 5321 3.8: the relay is closing the connection
            self.closing = reply
            if self.tp.throttle is not None:
                self.tp.throttle.on_421()
        return reply

    def quit(self) -> None:
        """QUIT and read the reply, best effort."""
        try:
            self.send(b"QUIT\r\n", "quit", QUIT_TIMEOUT)
            self.read(None, min(self.t.command, QUIT_TIMEOUT))
        except SmtpError:
            pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _extensions(reply: wire.Reply) -> dict[str, str]:
    """EHLO keywords (upper case) and their parameters, from the lines after the first."""
    out = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        if keyword:
            out[keyword.upper()] = params
    return out
