"""The SMTP listener: server.py's conversation on gevent's StreamServer, a greenlet per client.

Owns: accepting clients on the ``[listener] listen`` addresses (beyond
``max_clients``: 421 at the banner), whether a client's address is in
``allow`` (else RCPT gets 554: never an open relay), the socket loop (lines
of at most server.MAX_LINE octets, the idle ``timeout`` per read, pipelined
commands answered in order, in one write per batch), the store each DATA
writes through (the queue's ``incoming``, its file I/O in the threadpool,
fed in 64 KiB pieces: memory stays one buffer per client), the Received:
line, the listener's metrics, and the graceful stop (no new clients; idle
ones get 421 at once, a transaction in progress gets ``grace`` seconds).
Must not touch: the replies (server.py), the queue's files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.pool import Pool
from gevent.server import StreamServer

from greenmail import users
from greenmail.addresses import Rewriter
from greenmail.config import ListenerConfig
from greenmail.dropoff import rfc5322_date
from greenmail.metrics import Metrics
from greenmail.server import MAX_LINE, Server

log = logging.getLogger("greenmail.smtpd")
CHUNK = 64 * 1024


class _Store:
    """A queue's ``incoming`` message, written through the threadpool in CHUNK pieces."""

    def __init__(self, incoming: Any, offload: Callable[..., Any], metrics: Metrics, client: str) -> None:
        self.incoming, self.offload, self.metrics, self.client = incoming, offload, metrics, client
        self.id: str = incoming.id
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        if self._size >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data, self._pending, self._size = b"".join(self._pending), [], 0
            self.offload(self.incoming.write, (data,))

    def commit(self) -> str:
        self._flush()
        qid = self.offload(self.incoming.commit)
        self.metrics.count("listener_message", "queued")
        self.metrics.count("received", "smtp")
        log.info("%s: client=%s", qid, self.client, extra={"fields": {"event": "smtpd", "queue_id": qid}})
        return qid

    def abort(self) -> None:
        self._pending = []
        self.offload(self.incoming.abort)
        self.metrics.count("listener_message", "rejected")


class Listener:
    """The listening sockets and their clients, for one daemon."""

    def __init__(
        self,
        cfg: ListenerConfig,
        incoming: Callable[..., Any],
        rewriter: Rewriter,
        metrics: Metrics,
        offload: Callable[..., Any],
    ) -> None:
        self.cfg = cfg
        self.incoming = incoming
        self.rewriter = rewriter
        self.metrics = metrics
        self.offload = offload
        self.allow = [ipaddress.ip_network(n, strict=False) for n in cfg.allow]
        self.tls = _tls_context(cfg) if cfg.tls_cert else None
        self.users = users.load(cfg.users_file) if cfg.users_file else None
        self.pool = Pool()
        self.servers: list[StreamServer] = []
        self.stopping = False
        self._clients: dict[gevent.Greenlet, tuple[socket.socket, Server]] = {}

    def start(self) -> None:
        """Listen on every address (OSError naming it when one cannot be bound)."""
        for host, port in self.cfg.addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = gsocket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                sock.close()
                raise OSError(
                    e.errno, f"listener.listen: cannot listen on {host}:{port}: {e.strerror}"
                ) from None
            sock.listen(128)
            server = StreamServer(sock, self._handle, spawn=self.pool)
            server.start()
            self.servers.append(server)
            log.info("listening for SMTP on %s:%d", host, server.address[1])

    @property
    def ports(self) -> list[int]:
        return [s.address[1] for s in self.servers]

    def stop(self, grace: float) -> None:
        """No new clients; idle ones get 421 now, the others ``grace`` seconds to finish."""
        self.stopping = True
        for s in self.servers:
            s.close()
        for sock, server in list(self._clients.values()):
            if not server.busy:
                _bye(sock, server)
        self.pool.join(timeout=grace)
        for sock, server in list(self._clients.values()):
            _bye(sock, server)
        self.pool.kill(timeout=1)

    # -- one client ---------------------------------------------------------------------

    def _handle(self, sock: socket.socket, addr: Sequence[Any]) -> None:
        ip = str(addr[0])
        if self.stopping or self.metrics.listener_active >= self.cfg.max_clients:
            self.metrics.count("listener_connection", "refused")
            with contextlib.suppress(OSError):
                sock.settimeout(5)
                sock.sendall(f"421 4.7.0 {self.rewriter.hostname} Error: too many connections\r\n".encode())
            sock.close()
            return
        self.metrics.count("listener_connection", "accepted")
        self.metrics.listener_active += 1
        server = Server(
            self.rewriter.hostname,
            lambda sender, rcpts: self._store(server, ip, sender, rcpts),
            self.rewriter,
            self.cfg.max_message_size,
            self.cfg.max_recipients,
            may_relay=self._allowed(ip),
            starttls=self.tls is not None,
            check_password=self._check if self.users is not None else None,
        )
        me = gevent.getcurrent()
        self._clients[me] = (sock, server)
        try:
            self._converse(sock, server, me)
        except (OSError, TimeoutError) as e:
            log.debug("client %s: %s", ip, e)
        finally:
            self._clients.pop(me, None)
            self.metrics.listener_active -= 1
            server.close()
            sock.close()

    def _check(self, name: str, password: str) -> bool:
        """A password checked in the threadpool (scrypt takes tens of ms: never on the hub)."""
        assert self.users is not None
        return bool(self.offload(users.check, (self.users, name, password)))

    def _allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)

    def _converse(self, sock: socket.socket, server: Server, me: gevent.Greenlet) -> None:
        def starttls(plain: socket.socket) -> socket.socket:
            assert self.tls is not None
            wrapped = self.tls.wrap_socket(plain, server_side=True)
            self._clients[me] = (wrapped, server)
            return wrapped

        converse(sock, server, self.cfg.timeout, starttls, lambda: self.stopping)

    def _store(self, server: Server, ip: str, sender: str, rcpts: Sequence[str]) -> _Store:
        name = _reverse(ip)

        def trace(qid: str) -> bytes:
            proto = (
                "ESMTP" + ("S" if server.tls else "") + ("A" if server.user else "")
                if server.esmtp
                else "SMTP"
            )
            return (
                f"Received: from {server.helo_name or 'unknown'} ({name} [{ip}])\n"
                f"\tby {self.rewriter.hostname} (greenmail) with {proto} id {qid};\n\t{rfc5322_date()}\n"
            ).encode()

        incoming = self.offload(self.incoming, (sender, list(rcpts), trace))
        return _Store(incoming, self.offload, self.metrics, f"{name}[{ip}]")


def _tls_context(cfg: ListenerConfig) -> Any:
    """The server side of STARTTLS: TLS 1.2 at least (ConfigError for unusable files)."""
    from gevent import ssl

    from greenmail.errors import ConfigError

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key) if cfg.tls_key else None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"listener.tls_cert/tls_key: cannot load: {e}") from None
    return ctx


def converse(
    sock: socket.socket,
    server: Server,
    timeout: float,
    starttls: Callable[[socket.socket], socket.socket] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    """One client's conversation: lines in (bounded), replies out in one write per batch."""
    sock.settimeout(timeout)
    sock.sendall(server.greeting())
    buf = b""
    while not server.closed:
        pieces, buf = split_lines(buf, MAX_LINE)
        if not pieces:
            try:
                data = sock.recv(CHUNK)
            except TimeoutError:
                sock.sendall(f"421 4.4.2 {server.hostname} Error: timeout exceeded\r\n".encode())
                return
            if not data:
                return
            buf += data
            continue
        out = []
        for piece in pieces:
            out.append(server.feed(piece))
            if server.closed:
                break
        reply = b"".join(out)
        if reply:
            sock.sendall(reply)
        if server.want_tls and starttls is not None:
            buf = b""  # RFC 3207: what a client pipelined behind STARTTLS is not taken
            sock = starttls(sock)
            server.tls_started()
        if stopping() and not server.busy and not server.closed:
            _bye(sock, server)


def split_lines(buf: bytes, limit: int) -> tuple[list[bytes], bytes]:
    """Complete lines (each at most ``limit`` octets; a longer one in pieces) and what is left."""
    pieces = []
    start = 0
    while True:
        end = buf.find(b"\n", start, start + limit)
        if end >= 0:
            pieces.append(buf[start : end + 1])
            start = end + 1
        elif len(buf) - start >= limit:
            pieces.append(buf[start : start + limit])
            start += limit
        else:
            return pieces, buf[start:]


def _reverse(ip: str) -> str:
    """The client's name for Received: (no lookup: a resolver must never stall a submission)."""
    return "localhost" if ip in ("127.0.0.1", "::1") else "unknown"


def _bye(sock: socket.socket, server: Server) -> None:
    with contextlib.suppress(OSError):
        sock.settimeout(1)
        sock.sendall(f"421 4.3.2 {server.hostname} Service shutting down\r\n".encode())
        sock.shutdown(socket.SHUT_RDWR)
    server.close()
