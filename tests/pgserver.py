"""A private, throw-away PostgreSQL server for the tests (no system cluster is used or needed).

Owns: finding the server binaries, initdb (trust authentication, superuser "greenmail") into a
directory, the postmaster on a free port of 127.0.0.1 only with its socket inside that directory,
stopping it (fast shutdown), crashing it (SIGKILL), starting it again on the same data and port,
and creating and dropping databases (with createdb/dropdb: this module never imports psycopg, so
the pytest process does not pick psycopg's wait function before a test means it to).
Must not touch: greenmail's schema or rows, any other PostgreSQL on the machine.

As root the server runs as the "postgres" user (else "nobody"), since initdb refuses root: the
directory given to PgServer.start must be reachable by that user (``temporary()`` makes one).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

from support import free_port, wait_until

USER = "greenmail"  # the superuser initdb creates; every connection uses it (trust authentication)
START_TIMEOUT = 60.0  # seconds for the server to accept connections (crash recovery included)
STOP_TIMEOUT = 30.0  # seconds for a fast shutdown before SIGKILL


class PgServerError(RuntimeError):
    """The server could not be set up or started; the message carries its log's end."""


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb, else ``pg_config --bindir``'s; None if none."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if found:
        return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    bindir = Path(out.stdout.strip())
    return bindir if out.returncode == 0 and (bindir / "initdb").exists() else None


def _account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root ("postgres", else "nobody"); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise PgServerError("running as root, but there is neither a postgres nor a nobody user")


def _env() -> dict[str, str]:
    """The caller's environment without libpq's PG* variables (they would redirect the tools)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    e["LC_ALL"] = "C"
    return e


class PgServer:
    """One postmaster on 127.0.0.1:``port`` over ``directory``/data; see the module's docstring."""

    def __init__(
        self, bindir: Path, directory: Path, account: tuple[int, int] | None, durable: bool = False
    ) -> None:
        self.durable = durable  # fsync on (a benchmark's server); tests run without
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.sockets = directory / "run"  # unix_socket_directories: never /var/run/postgresql
        self.log = directory / "postgres.log"
        self.port = 0
        self._account = account
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, directory: Path, bindir: Path | None = None, durable: bool = False) -> PgServer:
        """initdb into ``directory``/data and start the server on a free port; raises PgServerError.
        ``durable``: fsync on, as a production server (bench/); else off (a throw-away server)."""
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PgServerError("PostgreSQL's server binaries (initdb, postgres) are not installed")
        server = cls(bindir, directory, _account(), durable)
        server._initdb()
        for attempt in range(3):  # free_port() can race with another process taking the port
            server.port = free_port()
            try:
                server._launch()
                return server
            except PgServerError:
                if attempt == 2 or "Address already in use" not in server._log_tail():
                    raise
        raise AssertionError("unreachable")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def create_database(self, name: str) -> str:
        """A new, empty database ``name``; its DSN."""
        self._client("createdb", name)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, ending its sessions."""
        self._client("dropdb", "--if-exists", "--force", name)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended, a checkpoint is written); waits for the exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._proc = None

    def start_again(self) -> None:
        """Start the stopped (or killed) server on the same data and port; crash recovery if killed."""
        if self.running:
            raise PgServerError("the server is running")
        self._launch()

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster; waits until it and its children are gone."""
        proc = self._proc
        if proc is None:
            return
        children = self._children(proc.pid)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self._proc = None

        def orphans_gone() -> bool:  # they notice the postmaster's death and exit by themselves
            return not any(Path(f"/proc/{pid}").exists() for pid in children)

        try:
            wait_until(orphans_gone, timeout=10, what="the killed postmaster's children to exit")
        except AssertionError:
            for pid in children:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the processes -----------------------------------------------------------------------

    def _as_user(self, argv: list[str], *extra: str) -> list[str]:
        if self._account is None:
            return argv
        uid, gid = self._account
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *extra, "--", *argv]

    def _initdb(self) -> None:
        self.data.mkdir(mode=0o700, parents=True)
        self.sockets.mkdir(mode=0o700)
        if self._account is not None:
            for d in (self.data, self.sockets):
                os.chown(d, *self._account)
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", USER]
        argv += ["-E", "UTF8", "--no-locale", "--no-sync"]
        r = subprocess.run(
            self._as_user(argv), cwd=self.directory, capture_output=True, text=True, env=_env(), timeout=120
        )
        if r.returncode != 0:
            raise PgServerError(
                f"initdb failed ({r.returncode}); is {self.directory} reachable by the server's user?\n"
                f"{r.stdout}{r.stderr}"
            )
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.sockets),
            "fsync": "on" if self.durable else "off",  # synchronous_commit and the rest: defaults
            "max_connections": "100",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/pgserver.py\n")
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())

    def _launch(self) -> None:
        """Start the postmaster on self.port and poll until it accepts connections."""
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                # the server gets SIGINT (fast shutdown) should pytest die without stopping it
                self._as_user(argv, "--pdeathsig", "SIGINT"),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        try:
            wait_until(self._ready, timeout=START_TIMEOUT, what=f"PostgreSQL on 127.0.0.1:{self.port}")
        except AssertionError as e:
            self.kill()
            raise PgServerError(f"{e}\n{self._log_tail()}") from None

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self._proc = None
            raise PgServerError(f"postgres exited ({code}) before accepting connections\n{self._log_tail()}")
        argv = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        argv += ["-U", USER, "-d", "postgres", "-t", "2"]
        return subprocess.run(argv, env=_env(), timeout=10).returncode == 0

    def _client(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-w", *args]
        r = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=60)
        if r.returncode != 0:
            raise PgServerError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @staticmethod
    def _children(pid: int) -> list[int]:
        """The processes whose parent is ``pid`` (the postmaster's backends and workers)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after ")"
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(pid):
                found.append(int(stat.parent.name))
        return found


@contextmanager
def temporary(bindir: Path | None = None) -> Iterator[PgServer]:
    """A started PgServer in a new directory under the system's temporary one (mode 0711, so the
    server's user reaches it; pytest's own tmp dirs are 0700 root's); stopped and removed after."""
    directory = Path(tempfile.mkdtemp(prefix="greenmail-pg-"))
    try:
        directory.chmod(0o711)
        server = PgServer.start(directory, bindir)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
