"""Issue 11, items 1-6, end to end: the real ``greenmail`` process against real faults.

Foreign names reused in outgoing/, an envelope over 1 MiB, claims without an owner part,
a full disk (a size-limited tmpfs in a private mount namespace), a relay outage, and
running out of file descriptors. Each test's docstring says what revision 6178367 (before
the fixes) did.

The code under test: greenmail is started as ``python -P -m greenmail`` with the caller's
PYTHONPATH before this tree, so ``PYTHONPATH=OLD_TREE:tests pytest ...`` runs these tests
against another revision (``-P``: the working directory does not come first).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from aiosmtpd_server import drop, numbered, queued, start_daemon
from faultserver import FaultServer

from greenmail.layout import new_id
from greenmail.spool import Spool

SENDER = "app@example.org"
MAX_ENVELOPE = 1024 * 1024


@pytest.fixture
def relay() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def make_spool(spool: Path) -> Path:
    for d in ("tmp", "outgoing"):
        (spool / d).mkdir(parents=True, exist_ok=True)
    return spool


def run_once(config: Path) -> str:
    r = support.greenmail("run", "--once", config=config, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r.stderr.decode()


def queue_json(config: Path) -> list[dict[str, Any]]:
    r = support.greenmail("queue", "list", "--json", config=config)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def bodies(srv: FaultServer) -> list[tuple[list[str], bytes]]:
    return [(m["recipients"], m["data"]) for m in srv.messages]


# -- 1. foreign names -------------------------------------------------------------------------


def test_a_foreign_name_reused_while_the_first_is_deferred_loses_nothing(tmp_path: Path) -> None:
    """Old code: the second ``msg.4242`` took the id ``msg.4242`` and the first one's state, so it
    was never sent to a@ (already "delivered" for the first), and its settlement replaced the
    first message's state."""
    script = {"rcpt": {"when": {"later@": "450 4.2.1 mailbox busy"}}}
    with FaultServer(script) as srv:
        config = support.write_config(tmp_path, srv.port, retry={"bounce": False})
        spool = make_spool(tmp_path / "spool")
        first = b"Subject: first\r\n\r\nthe first msg.4242\r\n"
        drop(spool, "msg.4242", first, SENDER, "a@example.net", "later@example.net")
        run_once(config)
        assert bodies(srv) == [(["a@example.net"], first)]
        [deferred] = queued(spool)

        second = b"Subject: second\r\n\r\nthe second msg.4242\r\n"
        drop(spool, "msg.4242", second, SENDER, "a@example.net", "b@example.net")
        run_once(config)
        assert bodies(srv)[1:] == [(["a@example.net", "b@example.net"], second)]

    [info] = queue_json(config)  # the first message, its state intact
    assert info["state"] == "deferred"
    assert info["recipient_states"] == {"a@example.net": "delivered", "later@example.net": "pending"}
    assert "450 4.2.1 mailbox busy" in info["last_error"]
    assert support.spool_files(spool, "outgoing") == [deferred]
    assert not deferred.startswith("msg.4242"), "the foreign name became the message's identity"


def test_a_foreign_name_reused_while_the_first_is_failed_overwrites_nothing(tmp_path: Path) -> None:
    """Old code: the second ``msg.4242`` failed as ``failed/msg.4242,1,0`` too, renamed over the
    first one: the first failed message was gone."""
    with FaultServer({"rcpt": "550 5.1.1 no such user"}) as srv:
        config = support.write_config(tmp_path, srv.port, retry={"bounce": False})
        spool = make_spool(tmp_path / "spool")
        first = b"Subject: first\r\n\r\nthe first msg.4242\r\n"
        drop(spool, "msg.4242", first, SENDER, "bad@example.net")
        run_once(config)
        assert len(support.spool_files(spool, "failed")) == 1
        second = b"Subject: second\r\n\r\nthe second msg.4242\r\n"
        drop(spool, "msg.4242", second, SENDER, "bad@example.net")
        run_once(config)
        tried = srv.commands().count("RCPT TO:<bad@example.net>")

    failed = queued(spool, "failed")
    assert sorted(q.body for q in failed.values()) == [first, second]
    assert tried == 2  # the second was tried, not failed by the first one's state
    assert {i["state"] for i in queue_json(config)} == {"failed"}


# -- 2. an envelope too big -------------------------------------------------------------------


def addresses(n: int, length: int) -> list[str]:
    """``n`` distinct recipient addresses of ``length`` octets each."""
    domain = "@example.net"
    return [f"r{i:06d}".ljust(length - len(domain), "x") + domain for i in range(n)]


def at_the_limit() -> list[str]:
    """Recipients whose envelope (with SENDER) is exactly MAX_ENVELOPE octets."""
    fixed = len(SENDER) + 2  # the sender line's newline and the recipients line's
    k = (MAX_ENVELOPE - fixed - 100) // 255
    rcpts = addresses(k, 254)
    last = MAX_ENVELOPE - fixed - len(",".join(rcpts)) - 1
    assert 16 < last <= 254
    rcpts.append("last".ljust(last - len("@example.net"), "y") + "@example.net")
    assert fixed + len(",".join(rcpts)) == MAX_ENVELOPE
    return rcpts


def test_enqueue_refuses_an_envelope_over_1_mib_and_delivers_one_at_the_limit(tmp_path: Path) -> None:
    """Old code: 17,000 recipients (an envelope over 1 MiB) were enqueued with exit 0, then moved
    to corrupt/ by the daemon ("envelope lines longer than 1 MiB"), never sent."""
    spool = tmp_path / "spool"
    over = addresses(17_000, 63)
    size = len(SENDER) + 1 + len(",".join(over)) + 1
    assert size > MAX_ENVELOPE
    with FaultServer({"ehlo": "250-fault.test\n250 PIPELINING"}) as srv:
        config = support.write_config(tmp_path, srv.port)
        args = [a for r in over for a in ("--to", r)]
        r = support.greenmail("enqueue", "--from", SENDER, *args, config=config, stdin=b"Subject: big\n\nx\n")
        assert r.returncode == 65, (r.returncode, r.stdout, r.stderr[-300:])
        err = r.stderr.decode()
        assert err.startswith("greenmail: envelope too big: 17000 recipients"), err
        assert err.count("\n") == 1
        assert support.spool_files(spool, "outgoing") == []
        assert support.spool_files(spool, "tmp") == []

        # exactly at the limit: accepted, and delivered to every recipient
        rcpts = at_the_limit()
        qid = support.enqueue(config, b"Subject: at the limit\n\nx\n", SENDER, *rcpts)
        run_once(config)
        [msg] = srv.messages
        assert msg["recipients"] == rcpts
        assert support.spool_files(spool, "corrupt") == []
        assert support.spool_files(spool, "outgoing") == []
        assert qid


# -- 3. claims without an owner part --------------------------------------------------------


def test_a_claim_without_an_owner_goes_back_at_start_and_at_each_check(
    tmp_path: Path, relay: FaultServer
) -> None:
    """Old code: a file in outgoing_active/ without ``@OWNER`` was skipped by recovery forever
    (never sent, not even after a restart)."""
    spool = tmp_path / "spool"
    for d in ("tmp", "outgoing", "outgoing_active"):
        (spool / d).mkdir(parents=True)
    qid = new_id()  # one of greenmail's ids, claimed without an owner part
    (spool / "outgoing_active" / qid).write_bytes(f"{SENDER}\nstart@example.net\n".encode() + numbered(1))
    config = support.write_config(tmp_path, relay.port, delivery={"check_interval": 1})
    d = start_daemon(config, tmp_path / "daemon.log")
    try:
        support.wait_until(lambda: len(relay.messages) == 1, 10, what="the claim left at start-up sent")
        # a plain name, while the daemon runs: back at the next periodic check, adopted, sent
        (spool / "outgoing_active" / "plain-name").write_bytes(
            f"{SENDER}\nlater@example.net\n".encode() + numbered(2)
        )
        support.wait_until(lambda: len(relay.messages) == 2, 10, what="the claim left later sent")
        support.wait_until(lambda: support.spool_files(spool, "outgoing_active") == [], 5)
    finally:
        assert d.stop() == 0, d.text()
    assert [m["recipients"] for m in relay.messages] == [["start@example.net"], ["later@example.net"]]
    assert f"{qid}: claim without an owner returned to outgoing/" in d.text()
    assert support.spool_files(spool, "outgoing") == []


# -- 4. a full disk ---------------------------------------------------------------------------


class PrivateTmpfs:
    """A size-limited tmpfs mounted on ``mountpoint`` in a mount namespace of its own.

    A holder process keeps the namespace; commands run in it with nsenter; this test reads
    and writes the tmpfs through /proc/HOLDER/root.
    """

    def __init__(self, mountpoint: Path, size: str) -> None:
        mountpoint.mkdir(parents=True)
        script = f"mount -t tmpfs -o size={size},mode=0700 tmpfs {mountpoint} && echo READY && exec sleep 300"
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=subprocess.PIPE
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != b"READY\n":
            self.holder.kill()
            pytest.skip("cannot mount a tmpfs in a private mount namespace here")
        self.mountpoint = mountpoint

    def seen(self, path: Path) -> Path:
        """``path`` (under the mount point) as seen from this test's namespace."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def command(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *args]

    def fill(self, name: str = "filler") -> Path:
        """Write a file until the tmpfs is full; the file."""
        path = self.seen(self.mountpoint / name)
        with open(path, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        return path

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(5)


def test_a_deferral_that_cannot_be_written_on_a_full_disk_is_retried_once_there_is_room(
    tmp_path: Path,
) -> None:
    """Old code: the failed state write ended the session with an error and the claim stayed in
    outgoing_active/ as "active" until a restart: never retried, never sent."""
    fs = PrivateTmpfs(tmp_path / "spool", "1m")
    # the reply to MAIL never comes: the session times out and the deferral is written then
    srv = FaultServer({"hold_mail": "NEVER"})
    srv.start()
    try:
        config = support.write_config(
            tmp_path,
            srv.port,
            delivery={"check_interval": 1},
            retry={"min_backoff": 1, "max_backoff": 1},
            timeouts={"command": 2},
        )
        log = tmp_path / "daemon.log"
        d = support.Process(fs.command(*support.GREENMAIL, "run", "--config", str(config)), log)
        try:
            support.wait_until(
                lambda: "greenmail started" in d.text(), 15, what="the daemon in the namespace"
            )
            spool = fs.seen(fs.mountpoint)
            Spool(spool).enqueue(SENDER, ["full@example.net"], numbered(1, "full"))
            support.wait_until(lambda: srv.commands()[-1:] == ["MAIL FROM:<app@example.org>"], 10)
            filler = fs.fill()
            support.wait_until(lambda: "No space left on device" in d.text(), 10, what="the deferral to fail")
            assert d.proc.poll() is None
            [claim] = support.spool_files(spool, "outgoing_active")
            assert support.spool_files(spool, "outgoing") == []

            srv.script = {}  # the relay takes it now
            filler.unlink()
            support.wait_until(lambda: len(srv.messages) == 1, 10, what="the message sent once there is room")
            support.wait_until(lambda: support.spool_files(spool, "outgoing_active") == [], 5)
            assert support.spool_files(spool, "outgoing") == []
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0, d.text()
    finally:
        srv.stop()
        fs.close()
    assert srv.messages[0]["recipients"] == ["full@example.net"]
    assert "cannot record the attempt" in d.text()
    assert claim.split(",")[0].split("@")[0] in d.text()


# -- 5. after a relay outage ------------------------------------------------------------------


def wait_log(p: support.Process, text: str, timeout: float = 10) -> float:
    """When (monotonic) ``text`` was seen in the daemon's log."""
    support.wait_until(lambda: text in p.text(), timeout, interval=0.01, what=repr(text))
    return time.monotonic()


def test_after_a_relay_outage_mail_goes_out_within_seconds(tmp_path: Path) -> None:
    """Old code: after ``connect_tries`` failed connects nothing was tried before the next periodic
    check (check_interval = 60 s), and ``queue list`` did not say why due mail waited."""
    port = support.free_port()
    config = support.write_config(tmp_path, port, delivery={"check_interval": 60, "connect_tries": 1})
    d = start_daemon(config, tmp_path / "daemon.log")
    srv = FaultServer()
    try:
        support.enqueue(config, numbered(1, "outage"))
        wait_log(d, "failed connects to the relay")
        listing = support.greenmail("queue", "list", config=config).stdout.decode()
        assert "(waiting: relay unreachable since " in listing, listing

        srv.start(port)
        back = time.monotonic()
        support.wait_until(lambda: len(srv.messages) == 1, 10, what="the message after the outage")
        assert time.monotonic() - back < 8  # the backoff was 1 s, then 2 s: far below check_interval
        support.wait_until(
            lambda: "(waiting:" not in support.greenmail("queue", "list", config=config).stdout.decode(), 5
        )
    finally:
        srv.stop()
        assert d.stop() == 0, d.text()
    assert "the relay can be reached again" in d.text()


@pytest.mark.parametrize("command", [("queue", "retry", "--all"), ("sendmail", "-q")], ids=" ".join)
def test_queue_retry_all_wakes_a_daemon_held_back_by_an_outage(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Old code: ``queue retry --all`` said "0 messages due now" and did nothing for queued mail a
    running daemon held back after failed connects (it waited for the next periodic check; this
    test already fails at the backoff it waits for, which the old code did not have)."""
    port = support.free_port()
    config = support.write_config(tmp_path, port, delivery={"check_interval": 60, "connect_tries": 1})
    d = start_daemon(config, tmp_path / "daemon.log")
    srv = FaultServer()
    try:
        support.enqueue(config, numbered(1, "poke"))
        seen = wait_log(d, "next try in 4s", 15)  # the backoff's next wait: 4 s from now
        srv.start(port)
        r = support.greenmail(*command, config=config)
        assert r.returncode == 0, r.stderr
        support.wait_until(lambda: len(srv.messages) == 1, 10, what="the message after queue retry --all")
        assert time.monotonic() - seen < 3.0, "the message waited for the backoff, not for the retry"
    finally:
        srv.stop()
        assert d.stop() == 0, d.text()
    assert "asked to try the queue now" in d.text()


# -- 6. out of file descriptors ---------------------------------------------------------------


def open_fds(pid: int) -> set[int]:
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def lowest_free(fds: set[int]) -> int:
    return next(n for n in range(len(fds) + 1) if n not in fds)


def healthz(conn: http.client.HTTPConnection) -> tuple[int, str]:
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    return r.status, r.read().decode()


def test_out_of_descriptors_the_daemon_lives_says_so_and_delivers_when_they_free_up(
    tmp_path: Path, relay: FaultServer
) -> None:
    """Old code: EMFILE from the periodic check's directory scan killed the scheduler greenlet and
    the daemon exited 1 (a claim that could not be opened even went to corrupt/)."""
    metrics = support.free_port()
    config = support.write_config(
        tmp_path, relay.port, delivery={"check_interval": 1}, metrics={"listen": f"127.0.0.1:{metrics}"}
    )
    spool = tmp_path / "spool"
    d = start_daemon(config, tmp_path / "daemon.log", metrics_port=metrics)
    conn = http.client.HTTPConnection("127.0.0.1", metrics, timeout=5)  # kept alive: no new descriptor later
    try:
        support.wait_until(lambda: healthz(conn)[0] == 200, 10, what="healthy")
        pid = d.proc.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free(open_fds(pid)), limits[1]))
        Spool(spool).enqueue(SENDER, ["fd@example.net"], numbered(1, "fd"))
        wait_log(d, "Too many open files")
        status, why = support.wait_until(lambda: (h := healthz(conn))[0] == 503 and h, 10, what="503")
        assert "out of file descriptors" in why, why
        time.sleep(1.5)  # a few periodic checks fail meanwhile
        assert d.proc.poll() is None, d.text()
        assert relay.messages == []

        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        support.wait_until(lambda: len(relay.messages) == 1, 10, what="delivery once descriptors are back")
        support.wait_until(lambda: healthz(conn)[0] == 200, 10, what="healthy again")
    finally:
        conn.close()
        assert d.stop() == 0, d.text()
    assert support.spool_files(spool, "corrupt") == []
    assert support.spool_files(spool, "outgoing") == []


def test_idle_metrics_clients_do_not_take_the_descriptors_delivery_needs(
    tmp_path: Path, relay: FaultServer
) -> None:
    """Old code: every idle /metrics client was accepted and kept forever; with ``ulimit -n 64`` a
    hundred of them left no descriptor, the scan failed with EMFILE and the daemon exited 1."""
    metrics = support.free_port()
    config = support.write_config(tmp_path, relay.port, metrics={"listen": f"127.0.0.1:{metrics}"})
    limit = 64
    args = ["prlimit", f"--nofile={limit}:{limit}", "--", *support.GREENMAIL, "run", "--config", str(config)]
    d = support.Process(args, tmp_path / "daemon.log")
    clients: list[socket.socket] = []
    try:
        support.wait_port(metrics)
        base = len(open_fds(d.proc.pid))
        for _ in range(100):  # connect and say nothing
            clients.append(socket.create_connection(("127.0.0.1", metrics), timeout=5))
        assert base + len(clients) > limit  # accepting them all would exhaust the descriptors
        support.wait_until(lambda: len(open_fds(d.proc.pid)) >= base + 10, 5, what="clients accepted")
        for i in range(5):
            support.enqueue(config, numbered(i, "idle"))
        support.wait_until(lambda: len(relay.messages) == 5, 10, what="delivery beside idle HTTP clients")
        assert d.proc.poll() is None, d.text()
    finally:
        for c in clients:
            c.close()
        assert d.stop() == 0, d.text()
    assert support.spool_files(tmp_path / "spool", "corrupt") == []
