"""Logs that mail tools read, end to end: pflogsumm (Debian package ``pflogsumm``) on the real
daemon's log counts what /metrics counts; the log targets (a file reopened on SIGUSR1, syslog,
journald's stderr) with the real ``greenmail run``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import promtool_support as pt
import pytest
import support
from faultserver import FaultServer

from greenmail import logfmt, maillog

pytestmark = pytest.mark.timeout(120)
MESSAGE = b"Subject: mail log\n\nhello\n"
# RFC 3339 time, host, greenmail/SERVICE[pid]: -- what pflogsumm's second time format expects
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d \S+ greenmail/[a-z]+\[\d+\]: .*")
SENT = re.compile(r"greenmail/smtp\[\d+\]: ([0-9A-F]{24}): to=<[^>]+>, .* status=sent \(")


def pflogsumm() -> str:
    return support.need_tool("pflogsumm", "pflogsumm")


def summary(log: Path) -> dict[str, int]:
    """pflogsumm's grand totals: received, delivered, deferred, deferrals, bounced, bytes received."""
    r = subprocess.run(
        [pflogsumm(), "--syslog-name=greenmail", "--problems-first", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, int] = {"deferrals": 0}
    for name in ("received", "delivered", "bounced", "bytes received"):
        m = re.search(rf"^\s*(\d+)\s+{name}$", r.stdout, re.M)
        assert m, r.stdout
        out[name] = int(m[1])
    m = re.search(r"^\s*(\d+)\s+deferred(?:\s+\((\d+)\s+deferrals\))?$", r.stdout, re.M)
    assert m, r.stdout
    out["deferred"] = int(m[1])
    out["deferrals"] = int(m[2] or 0)
    return out


# -- pflogsumm counts what /metrics counts ----------------------------------------------------

SCRIPT = {
    "mail": {"when": {"dropper@": "drop"}, "else": "250 2.1.0 ok"},  # the connection lost mid-transaction
    "rcpt": {
        "when": {"defer": "451 4.7.1 greylisted", "bounce": "550 5.1.1 no such user"},
        "else": "250 2.1.5 ok",
    },
}
MESSAGES = [  # sender, recipients
    ("a@example.org", ["ok1@example.net", "ok2@example.net"]),  # 2 sent
    ("b@example.org", ["ok3@example.net", "defer1@example.net", "bounce1@example.net"]),  # + a bounce to b@
    ("<>", ["bounce2@example.net"]),  # a null sender: no bounce
    ("dropper@example.org", ["ok4@example.net", "ok5@example.net"]),  # 2 deferred by the lost connection
]
K = pt.key


def recipients(port: int) -> dict[str, float]:
    samples = pt.parse(pt.metrics_text(port))
    out = {r: samples[K("greenmail_recipients_total", result=r)] for r in ("delivered", "deferred", "failed")}
    out["deferred messages"] = samples[K("greenmail_delivery_attempts_total", result="deferred")]
    return out


def test_pflogsumm_reports_the_counts_of_metrics(tmp_path: Path) -> None:
    pflogsumm()
    with FaultServer(SCRIPT) as relay:
        mport = support.free_port()
        config = support.write_config(
            tmp_path, relay.port, metrics={"listen": f"127.0.0.1:{mport}"}, delivery={"max_connections": 2}
        )
        daemon = support.daemon(config, tmp_path / "daemon.log")
        try:
            support.wait_until(lambda: healthz(mport) == 200, 20, what="/healthz 200")
            before = recipients(mport)
            for sender, rcpts in MESSAGES:
                support.enqueue(config, MESSAGE, sender, *rcpts)
            expected = {"delivered": 4, "deferred": 3, "failed": 2, "deferred messages": 2}

            def settled() -> dict[str, float]:
                now = recipients(mport)
                return {k: now[k] - before[k] for k in now}

            delta = support.wait_until(
                lambda: (d := settled()) == expected and d, 30, what=f"deltas {expected}"
            )
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            daemon.stop()
    log = tmp_path / "daemon.log"
    counts = summary(log)
    assert counts["delivered"] == delta["delivered"]
    assert counts["deferrals"] == delta["deferred"]  # pflogsumm: deferral lines; /metrics: per recipient
    assert counts["deferred"] == delta["deferred messages"]  # and the messages deferred
    assert counts["bounced"] == delta["failed"]
    lines = log.read_text().splitlines()
    assert all(LINE.fullmatch(x) for x in lines if x.strip() and not x[0].isspace()), lines  # (continuations)
    check_delays(lines)


def healthz(port: int) -> int:
    try:
        return pt.http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)[0]
    except OSError:
        return 0


def check_delays(lines: list[str]) -> None:
    """Each delivery line's delays=a/b/c/d add up to its delay= (each rounded to 0.01 s)."""
    found = 0
    for line in lines:
        m = re.search(r", delay=([\d.]+), delays=([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+), dsn=", line)
        if m:
            found += 1
            assert abs(sum(float(x) for x in m.groups()[1:]) - float(m[1])) <= 0.03, line
    assert found


def test_pflogsumm_reads_every_line_kind_greenmail_writes(tmp_path: Path) -> None:
    """The lines as the formatter writes them, through the real tool: received (pickup),
    sizes (queue entry), sent, deferred, bounced, a bounce notice, removed, a warning."""
    pflogsumm()
    path = tmp_path / "mail.log"
    h = logfmt.handler("text", f"file:{path}")
    now = time.time()
    timing = maillog.Timing(now - 1, now - 1, now - 0.5, True, now - 0.2)
    qid, dsn_id = "661A3F780866407B15A3415E", "661A3F7859A8B07B181BAF49"
    relay = "relay.example[192.0.2.1]:25"

    def delivery(rcpt: str, result: tuple[str, str, str]) -> str:
        return maillog.delivery(qid, rcpt, relay, timing, result, 1)[0]

    lines = [
        ("greenmail.pickup", logging.INFO, maillog.pickup(qid, 1000, "a@example.org")[0]),
        ("greenmail.queue", logging.INFO, maillog.queue_entry(qid, "a@example.org", 4321, 3)[0]),
        ("greenmail.session", logging.INFO, delivery("x@example.net", ("2.0.0", "sent", "250 2.0.0 Ok"))),
        (
            "greenmail.session",
            logging.INFO,
            delivery("y@example.net", ("4.7.1", "deferred", "451 4.7.1 later")),
        ),
        (
            "greenmail.session",
            logging.INFO,
            delivery("z@example.net", ("5.1.1", "bounced", "550 5.1.1 unknown")),
        ),
        ("greenmail.bounce", logging.INFO, f"{qid}: sender non-delivery notification: {dsn_id}"),
        ("greenmail.queue", logging.INFO, f"{qid}: removed"),
        ("greenmail.scheduler", logging.WARNING, "3 failed connects to the relay in this check"),
    ]
    for name, level, msg in lines:
        h.handle(logging.LogRecord(name, level, __file__, 1, msg, None, None))
    h.close()
    assert summary(path) == {
        "received": 1,
        "delivered": 1,
        "deferred": 1,
        "deferrals": 1,
        "bounced": 1,
        "bytes received": 4321,
    }
    report = subprocess.run(
        [pflogsumm(), "--syslog-name=greenmail", str(path)], capture_output=True, text=True
    )
    assert re.search(r"qmgr \(total: 1\)\s+1\s+3 failed connects", report.stdout), report.stdout


# -- a log file, reopened on SIGUSR1 --------------------------------------------------------


def test_sigusr1_reopens_the_log_file_in_every_delivery_process_and_loses_no_line(tmp_path: Path) -> None:
    n = 60
    log = tmp_path / "greenmail.log"
    with FaultServer() as relay:
        config = support.write_config(tmp_path, relay.port, delivery={"processes": 2, "max_connections": 4})
        daemon = support.daemon(config, tmp_path / "stderr.log", "--log-target", f"file:{log}")
        try:
            support.wait_until(lambda: text(log).count("]: greenmail started") == 2, 20, what="2 processes")
            qids: list[str] = []
            feeder = threading.Thread(target=lambda: qids.extend(enqueue_many(config, n)))
            feeder.start()
            support.wait_until(lambda: len(SENT.findall(text(log))) >= 10, 30, what="10 deliveries")
            log.rename(tmp_path / "greenmail.log.1")  # logrotate
            daemon.signal(signal.SIGUSR1)
            support.wait_until(
                lambda: text(log).count("signal SIGUSR1: log file reopened") == 2, 10, what="reopen"
            )
            feeder.join(60)
            support.wait_until(lambda: len(sent(tmp_path)) == n, 30, what=f"{n} deliveries")
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            daemon.stop()
    old, new = text(tmp_path / "greenmail.log.1"), text(log)
    assert Counter(sent(tmp_path)) == Counter(qids)  # each delivery line once, none lost
    assert SENT.search(new), "no delivery after the reopen: the test proves little"
    assert "SIGUSR1" not in old and new.count("]: greenmail stopped") == 2
    for body in (old, new):
        heads = [x for x in body.splitlines() if x.strip() and not x[0].isspace()]  # a warning's text goes on
        assert all(LINE.fullmatch(x) for x in heads), body  # no torn line
    assert text(tmp_path / "stderr.log") == ""


def text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def sent(tmp: Path) -> list[str]:
    return SENT.findall(text(tmp / "greenmail.log.1")) + SENT.findall(text(tmp / "greenmail.log"))


def enqueue_many(config: Path, n: int) -> list[str]:
    return [support.enqueue(config, MESSAGE, "me@example.org", f"r{i}@example.net") for i in range(n)]


def test_a_log_file_that_cannot_be_opened_is_an_error_at_start(tmp_path: Path) -> None:
    config = support.write_config(tmp_path, support.free_port())
    r = support.greenmail("run", "--once", "--log-target", f"file:{tmp_path}/missing/x.log", config=config)
    assert r.returncode == 73 and b"cannot log to file:" in r.stderr and b"No such file" in r.stderr
    r = support.greenmail("run", "--once", "--log-target", f"syslog:{tmp_path}/nobody", config=config)
    assert r.returncode == 73 and b"cannot send to syslog" in r.stderr
    r = support.greenmail("run", "--once", "--log-target", "journal", config=config)
    assert r.returncode == 2 and b"expected stderr, syslog, syslog:SOCKET or file:PATH" in r.stderr


# -- syslog and journald ---------------------------------------------------------------------


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A datagram socket standing in for /dev/log, and what it received."""
    path = tmp_path / "devlog"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                got.append(sock.recv(65536))
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    yield path, got
    done.set()
    reader.join(5)
    sock.close()


def test_syslog_target_sends_mail_facility_datagrams_with_the_tags(
    tmp_path: Path, syslog: tuple[Path, list[bytes]]
) -> None:
    path, got = syslog
    with FaultServer() as relay:
        config = support.write_config(tmp_path, relay.port)
        qid = support.enqueue(config, MESSAGE, "me@example.org", "you@example.net")
        r = support.greenmail("run", "--once", "--log-target", f"syslog:{path}", config=config)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    support.wait_until(lambda: any(b"greenmail stopped" in d for d in got), 5, what="the last datagram")
    lines = [d.decode() for d in got]
    pid = int(re.search(r"greenmail/master\[(\d+)\]", lines[0])[1])
    assert lines[0].startswith(f"<22>greenmail/master[{pid}]: configuration: spool.path=")
    assert f"<22>greenmail/master[{pid}]: greenmail stopped" in lines
    assert any(x.startswith(f"<22>greenmail/smtp[{pid}]: {qid}: to=<you@example.net>, relay=") for x in lines)
    assert any(x.startswith(f"<22>greenmail/qmgr[{pid}]: {qid}: from=<me@example.org>, size=") for x in lines)
    assert f"<22>greenmail/qmgr[{pid}]: {qid}: removed" in lines


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_stderr_on_the_journal_gets_priorities_and_no_stamp(tmp_path: Path, fmt: str) -> None:
    config = support.write_config(tmp_path, support.free_port(), delivery={"connect_tries": 1})  # no relay
    support.enqueue(config, MESSAGE, "me@example.org", "you@example.net")
    err = tmp_path / "journal"
    with open(err, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = {**support.env(), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        cmd = [*support.GREENMAIL, "run", "--once", "--log-format", fmt, "--config", str(config)]
        r = subprocess.run(cmd, stderr=stream, stdout=subprocess.DEVNULL, env=env, timeout=60)
    assert r.returncode == 0
    lines = err.read_text().splitlines()
    assert all(re.match(r"<[2-7]>", x) for x in lines), lines
    first = "<6>configuration: spool.path=" if fmt == "text" else '<6>{"time": '
    assert lines[0].startswith(first), lines[0]
    assert any(x.startswith("<4>") and "connect to 127.0.0.1" in x for x in lines), lines  # a warning
