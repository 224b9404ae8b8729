"""The systemd unit and sd_notify end to end: the real ``greenmail run`` with a $NOTIFY_SOCKET
the test binds (systemd's part played by a datagram socket that records each notification
and, through SO_PASSCRED, the pid that sent it), and conf/greenmail.service checked by
systemd-analyze (Debian package ``systemd``; it runs without systemd running).
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promtool_support as pt
import pytest
import support
from faultserver import FaultServer

from greenmail.config import DeliveryConfig
from greenmail.workers import STOP_MARGIN

pytestmark = pytest.mark.timeout(120)
UNIT = support.ROOT / "conf" / "greenmail.service"
WATCHDOG_USEC = 1_000_000  # the daemon pings every 0.5 s
MESSAGE = b"Subject: systemd\n\nhello\n"


@dataclass
class Note:
    at: float  # time.monotonic() on arrival
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]


class NotifySocket:
    """Stands in for systemd's notify socket: every datagram is recorded by a reader thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.notes: list[Note] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def env_value(self) -> str:
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _read(self) -> None:
        size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while not self._closed:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next(struct.unpack("iII", d)[0] for lvl, typ, d in anc if typ == socket.SCM_CREDENTIALS)
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
            self.notes.append(Note(time.monotonic(), pid, fields))

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout: float = 20) -> int:
        """The index of the first note from ``after`` on with ``key`` (= ``value``)."""

        def found() -> int | None:
            for i, n in enumerate(self.notes[after:], after):
                if key in n.fields and (value is None or n.fields[key] == value):
                    return i + 1  # truthy even for the first note
            return None

        return support.wait_until(found, timeout, what=f"{key}={value} on the notify socket") - 1

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"\0greenmail-test-{uuid.uuid4().hex}"
    s = NotifySocket(address)
    yield s
    s.close()


@pytest.fixture
def relay() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


def start(
    tmp: Path, relay: FaultServer, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch, **delivery: object
) -> tuple[support.Process, int]:
    mport = support.free_port()
    config = support.write_config(
        tmp, relay.port, metrics={"listen": f"127.0.0.1:{mport}"}, delivery={"check_interval": 60, **delivery}
    )
    monkeypatch.setenv("NOTIFY_SOCKET", notify.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    return support.daemon(config, tmp / "daemon.log"), mport


def healthz(port: int) -> int:
    try:
        return pt.http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0]
    except OSError:
        return 0


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [x.decode(errors="replace").partition("=") for x in f.read().split(b"\0") if x]
    return {k: v for k, _, v in pairs}


def pings(notify: NotifySocket, start: int = 0) -> list[Note]:
    return [n for n in notify.notes[start:] if n.fields.get("WATCHDOG") == "1"]


# -- READY, WATCHDOG, STOPPING ------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_ready_after_the_first_check_then_watchdog_then_stopping(
    tmp_path: Path,
    relay: FaultServer,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
    processes: int,
) -> None:
    daemon, mport = start(tmp_path, relay, notify_socket, monkeypatch, processes=processes, max_connections=4)
    try:
        ready = notify_socket.wait_for("READY", "1")
        assert healthz(mport) == 200  # READY=1 means: /healthz would answer 200
        assert notify_socket.notes[ready].fields["STATUS"].startswith("running (ok: last periodic check")
        support.wait_until(lambda: len(pings(notify_socket, ready)) >= 5, 20, what="5 watchdog pings")
        times = [n.at for n in pings(notify_socket, ready)]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(0.3 < g < WATCHDOG_USEC / 1e6 for g in gaps), gaps  # every half interval
        if processes > 1:
            kids = children(daemon.proc.pid)
            assert kids, "no delivery process to check"
            for kid in kids:
                assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(environ(kid)), kid
        daemon.signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING", "1", after=ready)
        assert daemon.wait(30) == 0
        assert stopping > ready
        assert {n.pid for n in notify_socket.notes} == {daemon.proc.pid}  # NotifyAccess=main holds
    finally:
        daemon.stop()


def test_without_notify_socket_nothing_changes(
    tmp_path: Path, relay: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))  # a watchdog without a socket: nothing to feed
    config = support.write_config(tmp_path, relay.port)
    support.enqueue(config, MESSAGE, "me@example.org", "you@example.net")
    r = support.greenmail("run", "--once", config=config)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "status=sent" in err and "notification" not in err


# -- a scheduler that stops: the pings stop ------------------------------------------------


@pytest.mark.parametrize("notify_socket", ["path"], indirect=True)
def test_a_frozen_daemon_stops_the_pings_and_a_stale_heartbeat_keeps_them_off(
    tmp_path: Path, relay: FaultServer, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP freezes the whole process, as a hang would, for longer than the watchdog interval.

    With check_interval = 0.3 s the heartbeat is stale after 0.9 s: once thawed, the
    daemon must not ping until a periodic check has succeeded again -- the first
    notification after SIGCONT says why it withholds the pings, and only then they resume.
    """
    daemon, _ = start(tmp_path, relay, notify_socket, monkeypatch, check_interval=0.3)
    try:
        ready = notify_socket.wait_for("READY", "1")
        support.wait_until(lambda: len(pings(notify_socket, ready)) >= 2, 20, what="watchdog pings")
        # A check that was just ending when the process froze may end first after the thaw and
        # rightly allow a ping (a few ms of every 300): a correct daemon shows the withheld
        # pings in nearly every freeze, one without the heartbeat test in none; hence 3 tries.
        outcomes: list[str] = []
        while "withheld" not in outcomes and len(outcomes) < 3:
            outcomes.append(freeze_and_thaw(daemon, notify_socket))
        assert "withheld" in outcomes, outcomes
        support.wait_until(lambda: "watchdog notifications resume" in daemon.text(), 5, what="the log line")
        assert "no watchdog notification until a periodic check succeeds" in daemon.text()
    finally:
        daemon.stop()


def freeze_and_thaw(daemon: support.Process, notify: NotifySocket) -> str:
    """SIGSTOP for 1.5 s (the heartbeat goes stale), SIGCONT; what came first after it."""
    since = len(notify.notes)
    support.wait_until(lambda: pings(notify, since), 10, what="a watchdog ping")  # pinging again
    daemon.signal(signal.SIGSTOP)
    time.sleep(0.3)  # what was sent before the stop has arrived
    frozen = len(notify.notes)
    time.sleep(1.5)  # absence is what is tested: nothing to poll for
    assert len(notify.notes) == frozen  # systemd would have fired WatchdogSec=1s
    daemon.signal(signal.SIGCONT)
    support.wait_until(lambda: len(notify.notes) > frozen, 10, what="a notification after SIGCONT")
    note = notify.notes[frozen]
    if note.fields.get("WATCHDOG") == "1":
        return "pinged at once"
    assert note.fields["STATUS"].startswith("no watchdog notification: stale"), note
    resumed = notify.wait_for("WATCHDOG", "1", after=frozen)  # once a periodic check has succeeded
    assert notify.wait_for("STATUS", after=resumed) == resumed + 1
    assert notify.notes[resumed + 1].fields == {"STATUS": "running"}
    return "withheld"


@pytest.mark.parametrize("notify_socket", ["path"], indirect=True)
def test_a_failing_check_stops_the_pings_until_it_succeeds_again(
    tmp_path: Path, relay: FaultServer, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outgoing/ replaced by a file: the periodic checks cannot scan it.

    The daemon keeps running and retries the check every second; once the heartbeat is
    stale it withholds the pings (systemd's watchdog then restarts it) and says why in
    STATUS=; when the spool is put right, the checks succeed and the pings resume.
    """
    daemon, _ = start(tmp_path, relay, notify_socket, monkeypatch, check_interval=0.5)
    try:
        ready = notify_socket.wait_for("READY", "1")
        support.wait_until(lambda: len(pings(notify_socket, ready)) >= 1, 20, what="a watchdog ping")
        outgoing = tmp_path / "spool" / "outgoing"
        outgoing.rename(tmp_path / "outgoing.away")
        outgoing.write_text("not a directory\n")
        withheld = (
            support.wait_until(
                lambda: next(
                    (
                        i + 1
                        for i, n in enumerate(notify_socket.notes)
                        if "no watchdog" in n.fields.get("STATUS", "")
                    ),
                    None,
                ),
                20,
                what="STATUS saying the pings are withheld",
            )
            - 1
        )
        assert notify_socket.notes[withheld].fields["STATUS"].startswith("no watchdog notification: stale")
        seen = len(notify_socket.notes)
        support.wait_until(lambda: "NotADirectoryError" in daemon.text(), 10, what="the failed check logged")
        assert daemon.proc.poll() is None, daemon.text()
        assert not pings(notify_socket, withheld)
        assert len(notify_socket.notes) >= seen
        outgoing.unlink()
        (tmp_path / "outgoing.away").rename(outgoing)
        resumed = notify_socket.wait_for("WATCHDOG", "1", after=withheld)
        assert notify_socket.wait_for("STATUS", "running", after=resumed) > resumed
        support.wait_until(lambda: "watchdog notifications resume" in daemon.text(), 5, what="the log line")
        support.enqueue(tmp_path / "greenmail.toml", MESSAGE, "me@example.org", "you@example.net")
        support.wait_until(lambda: relay.messages, 10, what="a delivery after the repair")
    finally:
        daemon.stop()


# -- the unit file -------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Every Key=value of the unit (repeatable keys keep each value), comments left out."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "min" else 1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("User", "greenmail"),
        ("ExecStart", "/usr/bin/greenmail run --config /etc/greenmail/greenmail.toml"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("KillMode", "mixed"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/spool/greenmail"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
    ],
)
def test_the_unit_says(key: str, value: str) -> None:
    assert unit_settings()[key][-1] == value


def test_the_unit_timeouts_fit_the_defaults() -> None:
    """TimeoutStopSec covers the children's shutdown_grace + STOP_MARGIN; WatchdogSec >= 2 check intervals."""
    units = unit_settings()
    d = DeliveryConfig()
    assert seconds(units["TimeoutStopSec"][-1]) > d.shutdown_grace + STOP_MARGIN
    assert seconds(units["WatchdogSec"][-1]) >= 2 * d.check_interval


def systemd_analyze() -> str:
    return support.need_tool("systemd-analyze", "systemd")


def runnable_unit(tmp: Path) -> Path:
    """The unit with ExecStart on a greenmail executable that exists here (verify looks for it)."""
    text = UNIT.read_text().replace(
        "ExecStart=/usr/bin/greenmail ", f"ExecStart={support.ROOT}/bin/greenmail "
    )
    assert text != UNIT.read_text()
    path = tmp / "greenmail.service"
    path.write_text(text)
    return path


def test_systemd_analyze_verify_passes_without_a_warning(tmp_path: Path) -> None:
    r = subprocess.run(
        [systemd_analyze(), "verify", str(runnable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout + r.stderr == ""  # verify reports unknown keys and bad values as warnings only


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    r = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(runnable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for greenmail\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= 2.0 and m[2] == "OK", m[0]


# -- MemoryDenyWriteExecute: CPython, gevent, ssl and ctypes survive it ------------------------

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # Linux >= 6.3: the kernel's own W^X for a process


def test_the_daemon_delivers_under_memory_deny_write_execute(tmp_path: Path, relay: FaultServer) -> None:
    """prctl(PR_SET_MDWE) refuses writable+executable memory, as the unit's MemoryDenyWriteExecute does."""
    probe = subprocess.run(
        [sys.executable, "-c", f"import ctypes; print(ctypes.CDLL(None).prctl({PR_SET_MDWE}, 1, 0, 0, 0))"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.stdout.strip() != "0":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    config = support.write_config(tmp_path, relay.port)
    qid = support.enqueue(config, MESSAGE, "me@example.org", "you@example.net")
    wrapper = (
        "import ctypes, os, sys, mmap\n"
        f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit('W+X memory was allowed: the test proves nothing')\n"
        "except PermissionError:\n"
        "    pass\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'greenmail', *sys.argv[1:]])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", wrapper, "run", "--once", "--config", str(config)],
        capture_output=True,
        timeout=60,
        env=support.env(),
    )
    assert r.returncode == 0, r.stderr
    assert f"{qid}: to=<you@example.net>" in r.stderr.decode() and "status=sent" in r.stderr.decode()
