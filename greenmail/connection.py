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
    AuthFailed,
    ConfigError,
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    RelayRefused,
    SmtpError,
    SmtpTimeout,
    TlsFailed,
)
from greenmail.metrics import Metrics
from greenmail.protocol import (
    HELO_FALLBACK,
    STAGE_OF,
    Action,
    Client,
    Cmd,
    Expect,
    Stage,
    Transaction,
    decide,
)
from greenmail.shaping import Throttle

log = logging.getLogger("greenmail.connection")
QUIT_TIMEOUT = 10.0


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


# Commands that count as reaching their stage when sent (an AUTH answer, BDAT, RSET and QUIT do not).
COUNTED = frozenset({Cmd.EHLO, Cmd.HELO, Cmd.STARTTLS, Cmd.AUTH, Cmd.MAIL, Cmd.RCPT, Cmd.DATA})


class Connection:
    def __init__(self, transport: Transport) -> None:
        self.tp = transport
        self.t = transport.timeouts
        self.metrics = transport.metrics
        self.sock: socket.socket | None = None
        self.client = Client(transport.relay.pipelining)
        self.tls = False
        host, port = transport.relay.relays[0]
        self.relay = f"{host}:{port}"
        self._timeouts = {
            Cmd.BANNER: self.t.banner,
            Cmd.DATA: self.t.data_init,
            Cmd.BDAT: self.t.data_block,
            Cmd.END: self.t.data_end,
            Cmd.BDAT_LAST: self.t.data_end,
            Cmd.QUIT: min(self.t.command, QUIT_TIMEOUT),
        }

    @property
    def extensions(self) -> dict[str, str]:
        return self.client.extensions

    @property
    def closing(self) -> wire.Reply | None:
        """The relay's 421, once it said it: nothing more is read or sent."""
        return self.client.closing

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
        self.client = Client(self.tp.relay.pipelining)
        self.tls = False
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
        self.metrics.count("connect", result)

    def _greet(self, host: str) -> None:
        self.metrics.stage("banner")
        _, banner = self.read()
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
        reply = self.command(Cmd.EHLO, wire.command("EHLO", self.tp.helo))
        action = decide(Stage.HELO, reply)
        if action is Action.FALLBACK:
            reply = self.command(Cmd.HELO, wire.command("HELO", self.tp.helo))
            action = HELO_FALLBACK.get(reply.cls, Action.PROTOCOL)
        if action is Action.ABORT:
            raise RelayRefused(f"relay refused HELO: {reply}", "helo")
        if action is not Action.PROCEED:
            raise ProtocolError(f"unexpected reply to EHLO/HELO: {reply}", "helo")

    def _starttls(self, host: str) -> None:
        reply = self.command(Cmd.STARTTLS, b"STARTTLS\r\n")
        if decide(Stage.STARTTLS, reply) is not Action.PROCEED:
            raise TlsFailed(f"relay refused STARTTLS: {reply}", "starttls")
        self._wrap(host)
        self.client.tls_started()
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
        reply = self.command(Cmd.AUTH, wire.command(line))
        for step in range(3):
            action = decide(Stage.AUTH, reply)
            if action is not Action.CONTINUE:
                break
            answer = auth.respond(mech, step, reply.lines[0], user, password)
            reply = self.command(Cmd.AUTH_ANSWER, wire.command(answer))
        if decide(Stage.AUTH, reply) is not Action.PROCEED:
            raise AuthFailed(f"authentication as {user} failed: {reply}", "auth")

    # -- the wire ------------------------------------------------------------------

    def command(self, cmd: Cmd, line: bytes) -> wire.Reply:
        """Send one command and read its reply (nothing pipelined)."""
        self.send(self.push(cmd, line), cmd.value)
        return self.read()[1]

    def push(self, cmd: Cmd, line: bytes, txn: Transaction | None = None, rcpt: str | None = None) -> bytes:
        """The protocol's record that ``line`` goes out (counted as its stage reached); its bytes."""
        data = self.offer(cmd, line, txn, rcpt)
        if data is None:
            raise self.client.refused(cmd)
        return data

    def offer(
        self, cmd: Cmd, line: bytes, txn: Transaction | None = None, rcpt: str | None = None
    ) -> bytes | None:
        """``push`` when the protocol lets ``cmd`` go now; else None."""
        data = self.client.offer(cmd, line, txn, rcpt)
        if data is not None and cmd in COUNTED:
            self.metrics.stage(STAGE_LABEL[cmd])
        return data

    def send(self, data: bytes, label: str, timeout: float | None = None) -> None:
        sock = self.sock
        assert sock is not None
        timeout = self.t.command if timeout is None else timeout
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

    def read(self) -> tuple[Expect, wire.Reply]:
        """The next reply and what it answers, within that command's timeout; counted under its stage."""
        assert self.sock is not None
        expect = self.client.expected[0] if self.client.expected else None
        cmd = expect.cmd if expect is not None else Cmd.QUIT
        stage = STAGE_OF[cmd]
        label = stage.label if stage is not None else "quit"
        timeout = self._timeouts.get(cmd, self.t.command)
        deadline = time.monotonic() + timeout
        try:
            while (got := self.client.next_reply()) is None:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionLost("connection closed by the relay", label)
                self.client.receive(data)
        except TimeoutError:
            raise SmtpTimeout(f"timeout after {timeout:g}s waiting for the {label} reply", label) from None
        except ProtocolError as e:
            if stage is not None:
                self.metrics.reply(stage.label, None)
            raise ProtocolError(str(e), label) from None
        except OSError as e:
            raise ConnectionLost(f"connection lost: {e}", label) from None
        expect, reply = got
        if stage is not None:
            self.metrics.reply(stage.label, reply.code)
        if reply.code == 421 and self.tp.throttle is not None:  # RFC 5321 3.8: the relay is closing
            self.tp.throttle.on_421()
        return expect, reply

    def quit(self) -> None:
        """QUIT and read the reply, best effort (not after a 421, nor where the protocol forbids it)."""
        if not self.client.can_send(Cmd.QUIT):
            return
        try:
            self.send(self.push(Cmd.QUIT, b"QUIT\r\n"), "quit", QUIT_TIMEOUT)
            self.read()
        except SmtpError:
            pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


STAGE_LABEL = {cmd: stage.label for cmd, stage in STAGE_OF.items() if stage is not None}
