"""Real SMTP peers for the interop tests, and helpers to run greenmail against them.

* ``make_certs``: a throw-away CA and certificates (openssl CLI): a server
  certificate for localhost/127.0.0.1, one for a wrong host name, an expired
  one, a self-signed one and a client certificate.
* ``Postfix``: a private Postfix instance (``postfix -c DIR``) whose smtpd listens
  on a free 127.0.0.1 port with STARTTLS, PIPELINING, CHUNKING, SIZE and
  SMTPUTF8, and relays everything to a downstream server.  Its smtpd runs with
  ``-v`` for 127.0.0.1 (``debug_peer_list``): the maillog then shows every command
  it receives and every read from the client socket, which is how the tests tell
  whether a command came pipelined (``SmtpdSession``). Its layout and the lines every
  private instance needs come from tests/postfix_template.py (shared with bench/).
* ``Exim``: Exim 4 unpacked by tests/peers/install.sh, run with ``-C`` (its own
  spool, log and pid file), listening on a plain port, a STARTTLS port and an
  implicit-TLS port, with AUTH PLAIN/LOGIN/CRAM-MD5 over TLS; relays to a
  downstream server.  Its mainlog ``<=`` lines say whether TLS (X=), PIPELINING
  (L), CHUNKING (K) and AUTH (A=) were used.
* ``Aiosmtpd``: tests/peers/aiosmtpd_tls.py as a subprocess (TLS, AUTH); it is
  also the downstream of Postfix and Exim, where the delivered bytes are read back.

Postfix and Exim drop privileges to their own users, so their directories live
in a 0755 directory under /tmp (pytest's tmp_path is not reachable for them);
they are removed afterwards, their logs copied to the test's tmp dir first.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import postfix_template
import pytest
import support

HERE = Path(__file__).resolve().parent
AIOSMTPD_TLS = HERE.parent / "peers" / "aiosmtpd_tls.py"
INSTALL = "tests/peers/install.sh"
PEERS_DIR = Path(os.environ.get("GREENMAIL_PEERS", "/opt/greenmail-peers"))
EXIM = PEERS_DIR / "exim" / "usr" / "sbin" / "exim4"
POSTFIX = Path("/usr/sbin/postfix")
OPENSSL = shutil.which("openssl")

USER, PASSWORD = "mailer", "s3cret pass phrase"  # the one account of the AUTH peers

# -- skipping when a peer is not installed -------------------------------------------------


def need_openssl() -> str:
    if OPENSSL is None:
        pytest.skip(f"openssl is not installed (run {INSTALL})")
    return OPENSSL


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (its daemons switch to their own users)")


def need_postfix() -> None:
    need_root("the Postfix peer")
    if not POSTFIX.exists() or not Path("/usr/lib/postfix/sbin/smtpd").exists():
        pytest.skip(f"postfix is not installed (run {INSTALL})")


def need_exim() -> None:
    need_root("the Exim peer")
    if not os.access(EXIM, os.X_OK):
        pytest.skip(f"exim is not unpacked at {EXIM} (run {INSTALL})")
    try:
        subprocess.run(["getent", "passwd", "Debian-exim"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"the Debian-exim user does not exist (run {INSTALL})")


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # the test CA, PEM: what greenmail's ca_file points at
    server: Pair  # CN=localhost, SAN DNS:localhost IP:127.0.0.1, signed by the CA
    wrong_host: Pair  # CN/SAN wrong.example, signed by the CA
    expired: Pair  # like server, but valid only in January 2020
    self_signed: Pair  # like server, but its own issuer (not the CA)
    client: Pair  # CN=greenmail-client, clientAuth, signed by the CA


_CA_CNF = """\
[ca]
default_ca = ca_default
[ca_default]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
[policy_any]
commonName = supplied
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost,IP:127.0.0.1
[wrong_host]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:wrong.example
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([need_openssl(), *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def make_certs(d: Path) -> Certs:
    """A CA and the certificates the tests need, in ``d`` (takes well under a second)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "issued").mkdir(exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(_CA_CNF.format(dir=d))
    _openssl(
        "req", "-x509", "-new", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/CN=greenmail interop test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip

    def issue(name: str, cn: str, ext: str, *validity: str) -> Pair:
        _openssl(
            "req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d
        )
        _openssl(
            "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
            "-in", f"{name}.csr", "-out", f"{name}.pem", "-extensions", ext, *(validity or ("-days", "30")),
            cwd=d,
        )  # fmt: skip
        return Pair(d / f"{name}.pem", d / f"{name}.key")

    server = issue("server", "localhost", "server")
    wrong = issue("wrong-host", "wrong.example", "wrong_host")
    expired = issue(
        "expired", "localhost", "server", "-startdate", "20200101000000Z", "-enddate", "20200131000000Z"
    )
    client = issue("client", "greenmail-client", "client")
    _openssl(
        "req", "-x509", "-new", *_EC, "-keyout", "self-signed.key", "-out", "self-signed.pem", "-days", "30",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        cwd=d,
    )  # fmt: skip
    return Certs(
        d / "ca.pem", server, wrong, expired, Pair(d / "self-signed.pem", d / "self-signed.key"), client
    )


# -- the aiosmtpd peer -----------------------------------------------------------------------


@dataclass
class Received:
    """One message as a peer received it."""

    name: str
    meta: dict[str, Any]
    content: bytes

    @property
    def mail_from(self) -> str:
        return self.meta["mail_from"]

    @property
    def rcpt_tos(self) -> list[str]:
        return self.meta["rcpt_tos"]

    @property
    def message_id(self) -> str | None:
        m = re.search(rb"^Message-ID:[ \t]*(\S+)", self.content, re.IGNORECASE | re.MULTILINE)
        return m.group(1).decode() if m else None


class Aiosmtpd:
    """tests/peers/aiosmtpd_tls.py as a subprocess; ``options`` are its command-line flags."""

    def __init__(self, out: Path, *options: str, port: int | None = None) -> None:
        self.port = port or support.free_port()
        self.out = out
        self.options = options
        out.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(AIOSMTPD_TLS), "--port", str(self.port), "--out", str(out), *options]
        self.process = support.Process(args, out.with_name(out.name + ".log"))
        try:
            support.wait_until(self._ready, 15, what=f"aiosmtpd_tls on port {self.port}")
        except BaseException:
            self.process.stop()
            raise

    def _ready(self) -> bool:
        if self.process.proc.poll() is not None:
            raise AssertionError(f"aiosmtpd_tls.py exited: {self.process.text()}")
        return "READY" in self.process.text()

    def stop(self) -> None:
        self.process.stop()

    def messages(self) -> list[Received]:
        out = []
        for meta in sorted(self.out.glob("[0-9]*.json")):
            out.append(
                Received(meta.stem, json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes())
            )
        return out

    def by_message_id(self) -> dict[str | None, Received]:
        return {m.message_id: m for m in self.messages()}

    def wait_message(self, message_id: str, timeout: float = 15) -> Received:
        return support.wait_until(
            lambda: self.by_message_id().get(message_id), timeout, what=f"{message_id} at {self.out.name}"
        )

    def sessions(self) -> list[dict[str, Any]]:
        try:
            return json.loads((self.out / "sessions.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def commands(self) -> list[list[Any]]:
        """[VERB, ARG, over_tls] of every session, in order."""
        return [c for s in self.sessions() for c in s["commands"]]

    def verbs(self) -> list[str]:
        return [c[0] for c in self.commands()]


# -- a private Postfix --------------------------------------------------------------------

_MASTER_SMTPD = "127.0.0.1:{port} inet n - n - - smtpd -v"
_MASTER_TLSMGR = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr"

_MAIN_EXTRA = """\
mydomain = postfix.test
myorigin = $myhostname
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
biff = no
# no header rewriting or added headers for SMTP clients: the message passes unchanged
local_header_rewrite_clients =
smtputf8_enable = yes
smtpd_tls_security_level = may
smtpd_tls_cert_file = {base}/tls/server.pem
smtpd_tls_key_file = {base}/tls/server.key
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
# -v for 127.0.0.1: every command received and every read from the client is logged
debug_peer_list = 127.0.0.1
"""


@dataclass
class Command:
    line: str  # as the client sent it, e.g. "MAIL FROM:<a@b> SIZE=12"
    pipelined: bool  # it was already read, with the previous command: the client did not wait

    @property
    def verb(self) -> str:
        return self.line.split(" ", 1)[0].upper()


@dataclass
class SmtpdSession:
    """One client connection as Postfix's verbose smtpd logged it."""

    pid: str
    lines: list[str] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    tls: str | None = None  # the "TLS connection established" line
    summary: dict[str, str] | None = None  # "disconnect from" counters: ehlo=2 starttls=1 bdat=1 ...
    client_fd: str | None = None  # the fd of the client socket in smtpd's vstream log lines
    _last_read_fd: str | None = None
    _read: bool = False  # the client socket was read since the last command

    @property
    def verbs(self) -> list[str]:
        return [c.verb for c in self.commands]

    def command(self, verb: str) -> Command:
        return next(c for c in self.commands if c.verb == verb)

    def feed(self, msg: str) -> None:
        self.lines.append(msg)
        if m := re.match(r"vstream_buf_get_ready: fd (\d+) got", msg):
            self._last_read_fd = m.group(1)
            if m.group(1) == self.client_fd:
                self._read = True
        elif m := re.match(r"< [^:]*\]: (.*)$", msg):
            if self.client_fd is None:  # the first command (EHLO) came with the read just before it
                self.client_fd, self._read = self._last_read_fd, True
            self.commands.append(Command(m.group(1), pipelined=not self._read))
            self._read = False
        elif "TLS connection established from" in msg:
            self.tls = msg
        elif msg.startswith("disconnect from "):
            self.summary = dict(kv.split("=", 1) for kv in msg.split()[3:] if "=" in kv)


def smtpd_sessions(log: str) -> list[SmtpdSession]:
    """The smtpd sessions in a piece of Postfix maillog, in order of connection."""
    sessions, current = [], {}
    for line in log.splitlines():
        m = re.search(r" postfix/smtpd\[(\d+)\]: (.*)$", line)
        if not m:
            continue
        pid, msg = m.groups()
        if msg.startswith("connect from "):
            current[pid] = SmtpdSession(pid)
            sessions.append(current[pid])
        s = current.get(pid)
        if s is None:
            continue
        s.feed(msg)
        if s.summary is not None:
            del current[pid]
    return sessions


def raw_client(port: int, mid: str, pipelined: bool) -> None:
    """Send one message in clear with DATA, MAIL/RCPT/DATA pipelined or each after its reply:
    a client of known behaviour, to check what the peers' logs say about pipelining."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, s.makefile("rb") as f:

        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            assert line[:1] in (b"2", b"3"), line
            return line

        reply()
        s.sendall(b"EHLO raw.test\r\n")
        reply()
        commands = [b"MAIL FROM:<raw@example.org>\r\n", b"RCPT TO:<rcpt@example.net>\r\n", b"DATA\r\n"]
        if pipelined:
            s.sendall(b"".join(commands))
            for _ in commands:
                reply()
        else:
            for c in commands:
                s.sendall(c)
                reply()
        s.sendall(f"Message-ID: {mid}\r\n\r\nraw\r\n.\r\n".encode())
        reply()
        s.sendall(b"QUIT\r\n")
        reply()


def _private_dir(prefix: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)  # the daemons' own users must reach their files
    return base


class Postfix:
    def __init__(self, downstream_port: int, certs: Certs, keep: Path, size_limit: int = 1024 * 1024) -> None:
        self.port = support.free_port()
        self.size_limit = size_limit
        self.keep = keep  # where the maillog is copied on stop
        self.base = _private_dir("greenmail-postfix-")
        b = self.base
        self.layout = postfix_template.Layout(b)
        self.layout.create()
        (b / "tls").mkdir()
        shutil.copy(certs.server.cert, b / "tls" / "server.pem")
        shutil.copy(certs.server.key, b / "tls" / "server.key")
        self.maillog = self.layout.maillog
        postfix_template.write(
            self.layout,
            postfix_template.master_cf(
                "greenmail interop: smtpd on one loopback port (verbose), relay-only, no chroot",
                [_MASTER_SMTPD.format(port=self.port), _MASTER_TLSMGR],
            ),
            postfix_template.main_cf(
                self.layout,
                myhostname="postfix.test",
                relay_port=downstream_port,
                size_limit=size_limit,
                extra=_MAIN_EXTRA.format(base=b).splitlines(),
            ),
        )
        r = self._postfix("start")
        if r.returncode != 0:
            log = self.log()
            self._cleanup()
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}\n{log}")
        try:
            support.wait_port(self.port, 15)
            # the probe connection of wait_port is logged asynchronously: let it settle, so that
            # it does not show up after a test's mark()
            support.wait_until(lambda: "disconnect from" in self.log(), 10, what="the probe in the maillog")
        except BaseException:
            self.stop()
            raise

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(POSTFIX), "-c", str(self.base / "etc"), *args], capture_output=True, text=True, timeout=60
        )

    def _master_pid(self) -> int | None:
        return self.layout.master_pid()

    def stop(self) -> None:
        pid = self._master_pid()
        self._postfix("stop")
        if pid is not None:

            def gone() -> bool:
                try:
                    os.kill(pid, 0)
                    return False
                except ProcessLookupError:
                    return True

            try:
                support.wait_until(gone, 15, what="the postfix master to exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            shutil.copy(self.maillog, self.keep / "postfix-maillog")
        shutil.rmtree(self.base, ignore_errors=True)

    def mark(self) -> int:
        """A position in the maillog; ``log(since=mark)`` is what came after it."""
        return self.maillog.stat().st_size

    def log(self, since: int = 0) -> str:
        try:
            with open(self.maillog, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def sessions(self, since: int = 0) -> list[SmtpdSession]:
        return smtpd_sessions(self.log(since))

    def wait_sessions(self, since: int, n: int = 1, timeout: float = 10) -> list[SmtpdSession]:
        """At least ``n`` finished smtpd sessions after ``since`` (postlogd writes asynchronously)."""

        def finished() -> list[SmtpdSession] | None:
            done = [s for s in self.sessions(since) if s.summary is not None]
            return done if len(done) >= n else None

        return support.wait_until(finished, timeout, what=f"{n} finished smtpd session(s) in the maillog")


# -- a private Exim -------------------------------------------------------------------------

_EXIM_CONF = """\
exim_path = @EXIM@
spool_directory = @BASE@/spool
log_file_path = @BASE@/log/%slog
pid_file_path = @BASE@/exim.pid
primary_hostname = exim.test
daemon_smtp_ports = @PLAIN@ : @STARTTLS@ : @IMPLICIT@
tls_on_connect_ports = @IMPLICIT@
local_interfaces = 127.0.0.1
keep_environment =
host_lookup =
rfc1413_hosts =
message_size_limit = 1M
# STARTTLS on every port but the plain one (the implicit port is TLS anyway)
tls_advertise_hosts = ${if ={$received_port}{@PLAIN@}{}{*}}
tls_certificate = @BASE@/tls/server.pem
tls_privatekey = @BASE@/tls/server.key
# AUTH only over TLS
auth_advertise_hosts = ${if def:tls_in_cipher {*}{}}
acl_smtp_rcpt = acl_rcpt
log_selector = +smtp_connection +tls_cipher +pipelining +received_recipients +smtp_protocol_error \\
    +smtp_syntax_error +incoming_port

begin acl
acl_rcpt:
  accept

begin routers
downstream:
  driver = manualroute
  route_list = * 127.0.0.1
  transport = to_downstream
  self = send
  no_more

begin transports
to_downstream:
  driver = smtp
  port = @DOWNSTREAM@
  hosts_avoid_tls = *
  allow_localhost

begin retry
* * F,1h,1m

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and {{eq{$auth2}{@USER@}}{eq{$auth3}{@PASSWORD@}}}}
  server_set_id = $auth2
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and {{eq{$auth1}{@USER@}}{eq{$auth2}{@PASSWORD@}}}}
  server_set_id = $auth1
cram:
  driver = cram_md5
  public_name = CRAM-MD5
  server_secret = ${if eq{$auth1}{@USER@}{@PASSWORD@}fail}
  server_set_id = $auth1
"""


class Exim:
    def __init__(self, downstream_port: int, certs: Certs, keep: Path) -> None:
        self.plain_port, self.starttls_port, self.implicit_port = (support.free_port() for _ in range(3))
        self.keep = keep
        self.base = _private_dir("greenmail-exim-")
        b = self.base
        for d in ("spool", "log", "tls"):
            (b / d).mkdir()
            shutil.chown(b / d, "Debian-exim", "Debian-exim")
        for src, name in ((certs.server.cert, "server.pem"), (certs.server.key, "server.key")):
            shutil.copy(src, b / "tls" / name)
            shutil.chown(b / "tls" / name, "Debian-exim")
        self.conf = b / "exim.conf"
        conf = _EXIM_CONF
        for key, value in {
            "EXIM": EXIM,
            "BASE": b,
            "PLAIN": self.plain_port,
            "STARTTLS": self.starttls_port,
            "IMPLICIT": self.implicit_port,
            "DOWNSTREAM": downstream_port,
            "USER": USER,
            "PASSWORD": PASSWORD,
        }.items():
            conf = conf.replace(f"@{key}@", str(value))
        self.conf.write_text(conf)
        self.conf.chmod(0o644)
        self.mainlog = b / "log" / "mainlog"
        check = subprocess.run([str(EXIM), "-C", str(self.conf), "-bV"], capture_output=True, text=True)
        if check.returncode != 0:
            shutil.rmtree(b, ignore_errors=True)
            raise RuntimeError(f"exim rejects its configuration:\n{check.stdout}{check.stderr}")
        # its own session: stop() ends the daemon and any reception or delivery process it forked
        self._out = open(keep / "exim.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(EXIM), "-C", str(self.conf), "-bdf"],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            for port in (self.plain_port, self.starttls_port, self.implicit_port):
                support.wait_port(port, 15)
        except BaseException:
            self.stop()
            raise

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> None:
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                support.wait_until(lambda: self.proc.poll() is not None and not self._group_alive(), 10)
            except AssertionError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()
        for name in ("mainlog", "paniclog", "rejectlog"):
            with contextlib.suppress(OSError):
                shutil.copy(self.base / "log" / name, self.keep / f"exim-{name}")
        shutil.rmtree(self.base, ignore_errors=True)

    def mark(self) -> int:
        try:
            return self.mainlog.stat().st_size
        except FileNotFoundError:
            return 0

    def log(self, since: int = 0) -> str:
        try:
            with open(self.mainlog, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_accepted(self, since: int, message_id: str, timeout: float = 10) -> dict[str, str]:
        """The fields of the ``<=`` line (message accepted) for ``message_id``, e.g. {"P": "esmtps", ...}.

        Flags without a value (L for PIPELINING, K for CHUNKING) map to themselves.
        """
        bare = message_id.strip("<>")

        def find() -> dict[str, str] | None:
            for line in self.log(since).splitlines():
                if " <= " in line and f" id={bare}" in line:
                    return exim_fields(line)
            return None

        return support.wait_until(find, timeout, what=f"exim accepting {message_id}")


def exim_fields(line: str) -> dict[str, str]:
    """``<=`` line fields: X=TLS1.3:... P=esmtps A=plain:mailer; bare flags as FLAG: FLAG.

    The flags: K = CHUNKING was used; L = PIPELINING was used ("L." in Exim 4.96, which also
    marks pipelined accepts), with "-" appended ("L-", "L.-") when offered but not used.
    """
    out = {}
    rest = line.split(" <= ", 1)[1]
    out["sender"] = rest.split(" ", 1)[0]
    for token in re.findall(r'(\w+)=("[^"]*"|\S+)|(?<= )(L\.?-?|K)(?= )', rest):
        key, value, flag = token
        if flag:
            out[flag[0]] = flag
        elif key not in out:
            out[key] = value
    return out


@dataclass
class PostfixRelay:
    mta: Postfix
    downstream: Aiosmtpd  # where Postfix delivers: the bytes are read back there


@dataclass
class EximRelay:
    mta: Exim
    downstream: Aiosmtpd


# -- greenmail --------------------------------------------------------------------------------


def config(
    tmp: Path,
    relay_port: int | None = None,
    hosts: list[str] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    **relay: Any,
) -> Path:
    """greenmail.toml (support.write_config) with these [relay] keys (Paths as strings) and other
    ``sections``; ``hosts`` replaces host/port."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in relay.items()}
    if hosts is not None:
        values["hosts"] = hosts
    path = support.write_config(tmp, relay_port or 1, relay=values, **(sections or {}))
    if hosts is not None:  # "either hosts or host/port": drop the host/port write_config always writes
        section, lines = "", []
        for line in path.read_text().splitlines():
            if line.startswith("["):
                section = line
            elif section == "[relay]" and re.match(r"(host|port) = ", line):
                continue
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")
    return path


def password_file(tmp: Path, password: str = PASSWORD) -> Path:
    p = tmp / "relay-password"
    p.write_text(password + "\n")
    p.chmod(0o600)
    return p


def run_once(cfg: Path, timeout: float = 60) -> str:
    """``greenmail run --once``; its log (stderr). It exits 0 even when the relay fails."""
    r = support.greenmail("run", "--once", config=cfg, timeout=timeout)
    log = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, f"greenmail run --once exited {r.returncode}:\n{log}"
    return log


def queue(cfg: Path) -> list[dict[str, Any]]:
    r = support.greenmail("queue", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def queue_entry(cfg: Path, qid: str) -> dict[str, Any]:
    entries = {e["id"]: e for e in queue(cfg)}
    assert qid in entries, f"{qid} is not in the queue: {entries}"
    return entries[qid]


def assert_still_queued(cfg: Path, qid: str) -> None:
    """A connection-level failure: the message waits untouched (attempts 0), nothing failed or bounced."""
    entries = queue(cfg)
    assert [e["id"] for e in entries] == [qid], f"expected only {qid} (no bounce): {entries}"
    [e] = entries
    assert e["state"] == "queued", e
    assert e["attempts"] == 0, e
    assert all(s == "pending" for s in e["recipient_states"].values()), e


def message(tag: str, *, extra_headers: str = "", body: str | None = None) -> bytes:
    """A CRLF message with a unique Message-ID <tag@interop.test> and a body that tests transparency:
    lines starting with dots (and a lone dot), 8-bit UTF-8, trailing blanks, a tab, a long line,
    an mbox-style "From " line and empty lines.  Pass ``body`` (str, \\n line ends) for another one.
    """
    if body is None:
        body = (
            f"Hello from the {tag} test.\n\n.starts with a dot\n..two dots\n.\n. \n"
            "Grüße aus Köln — 日本語のテキスト\n"
            "trailing blanks   \n\tindented with a tab\n"
            "From the beginning of a line\n" + "x" * 900 + "\n\n\nlast line\n"
        )
    text = (
        "From: Sender <sender@example.org>\n"
        "To: Recipient <rcpt@example.net>\n"
        f"Subject: interop {tag}\n"
        f"Message-ID: <{tag}@interop.test>\n"
        "Date: Sat, 28 Nov 2026 12:00:00 +0000\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n" + extra_headers + "\n" + body
    )
    return text.replace("\n", "\r\n").encode()


def message_id(tag: str) -> str:
    return f"<{tag}@interop.test>"


def split_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """The Received: header fields a relay put on top of a message, and the message after them."""
    fields, rest = [], data
    while rest[:9].lower() == b"received:":
        end = rest.index(b"\r\n")
        while rest[end + 2 : end + 3] in (b" ", b"\t"):
            end = rest.index(b"\r\n", end + 2)
        fields.append(rest[: end + 2])
        rest = rest[end + 2 :]
    return fields, rest


def assert_relayed_unchanged(got: bytes, sent: bytes, hops: int = 1) -> list[bytes]:
    """``got`` is ``sent`` with exactly ``hops`` Received: fields on top; those fields."""
    trace, rest = split_trace(got)
    assert len(trace) == hops, f"expected {hops} Received: field(s), got {trace}"
    assert rest == sent, "the message changed on its way"
    return trace


def elapsed(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"
