"""Issue 11, items 7-12 and kill -9 trials, end to end: the real ``greenmail`` process.

The spool removed or replaced while the daemon runs, harmless signals, liveness that a removed
lock file cannot fake, a relay closing after its 250 while the next message was pipelined,
body lines over 998 octets at strict relays, a password file others may read, and SIGKILL
during a 20,000-message drain. Each test's docstring says what revision 6178367 (before the
fixes) did. As in test_reliability.py, the caller's PYTHONPATH selects the code under test.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from aiosmtpd_server import numbered, start_daemon, start_relay
from faultserver import FaultServer, ehlo

from greenmail.queuefile import name_id
from greenmail.spool import Spool

SENDER = "app@example.org"


@pytest.fixture
def relay() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def healthz(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def metrics_daemon(tmp_path: Path, relay_port: int) -> tuple[support.Process, Path, int]:
    port = support.free_port()
    config = support.write_config(
        tmp_path, relay_port, delivery={"check_interval": 1}, metrics={"listen": f"127.0.0.1:{port}"}
    )
    d = start_daemon(config, tmp_path / "daemon.log", metrics_port=port)
    support.wait_until(lambda: healthz(port)[0] == 200, 10, what="healthy")
    return d, config, port


# -- 7. the spool removed or replaced -----------------------------------------------------------


def test_the_spool_removed_while_running_is_made_again_and_delivery_resumes(
    tmp_path: Path, relay: FaultServer
) -> None:
    """Old code: the wake-up watcher died (FileNotFoundError) and the daemon exited 1."""
    d, config, port = metrics_daemon(tmp_path, relay.port)
    spool = tmp_path / "spool"
    try:
        shutil.rmtree(spool)
        status, why = support.wait_until(lambda: (h := healthz(port))[0] == 503 and h, 10, what="503")
        assert "spool" in why, why
        support.wait_until(lambda: (spool / "outgoing").is_dir() and (spool / "tmp").is_dir(), 10)
        assert d.proc.poll() is None, d.text()
        support.enqueue(config, numbered(1, "removed"))
        support.wait_until(lambda: len(relay.messages) == 1, 10, what="delivery in the new spool")
        support.wait_until(lambda: healthz(port)[0] == 200, 10, what="healthy again")
    finally:
        assert d.stop() == 0, d.text()
    assert "watching the spool failed" in d.text()


def test_the_spool_replaced_while_running_is_watched_again(tmp_path: Path, relay: FaultServer) -> None:
    """Old code: the wake-up watcher died (FileNotFoundError: outgoing/ of the new, empty spool)
    and the daemon exited 1."""
    d, config, port = metrics_daemon(tmp_path, relay.port)
    spool = tmp_path / "spool"
    try:
        spool.rename(tmp_path / "spool.old")
        spool.mkdir(mode=0o700)  # an empty directory in its place
        support.wait_until(lambda: (spool / "outgoing").is_dir(), 10, what="the spool's directories")
        support.enqueue(config, numbered(1, "replaced"))
        support.wait_until(lambda: len(relay.messages) == 1, 10, what="delivery from the new spool")
        support.wait_until(lambda: healthz(port)[0] == 200, 10, what="healthy")
        assert d.proc.poll() is None, d.text()
        live = [n for n in os.listdir(spool / "owners") if n.endswith(".lock") and not n.startswith(".")]
        assert len(live) == 1, live  # it announces itself in the new spool
    finally:
        assert d.stop() == 0, d.text()
    assert support.spool_files(spool, "outgoing_active") == []


# -- 8. harmless signals ------------------------------------------------------------------------


def test_sighup_and_sigusr2_never_kill_the_daemon_nor_leave_claims(tmp_path: Path) -> None:
    """Old code: SIGHUP killed the daemon (its default action: exit status 129, -1 to Popen) with
    its claim left in outgoing_active/."""
    slow = start_relay(tmp_path, delay_data=1.0)
    try:
        config = support.write_config(tmp_path, slow.port)
        spool = tmp_path / "spool"
        d = start_daemon(config, tmp_path / "daemon.log")
        try:
            support.enqueue(config, numbered(1, "hup"))
            support.wait_until(lambda: slow.stats()["data_started"] == 1, 10, what="the message in flight")
            d.signal(signal.SIGHUP)
            d.signal(signal.SIGUSR2)
            support.wait_until(lambda: slow.count() == 1, 10, what="the message delivered")
            support.wait_until(lambda: support.spool_files(spool, "outgoing_active") == [], 5)
            d.signal(signal.SIGHUP)
            support.enqueue(config, numbered(2, "hup"))
            support.wait_until(lambda: slow.count() == 2, 10, what="the next message delivered")
            assert d.proc.poll() is None, d.text()
        finally:
            assert d.stop() == 0, d.text()
    finally:
        slow.stop()
    text = d.text()
    assert text.count("signal SIGHUP") == 2 and "signal SIGUSR2" in text, text
    assert support.spool_files(spool, "outgoing_active") == []
    assert support.spool_files(spool, "outgoing") == []


# -- 9. liveness ----------------------------------------------------------------------------------


def test_a_removed_lock_file_does_not_let_a_second_daemon_take_live_claims(tmp_path: Path) -> None:
    """Old code: liveness was the lock file's path: with owners/OWNER.lock removed, a second daemon
    judged the live one dead, took its claims and sent them again."""
    stall = start_relay(tmp_path, "stall", delay_data=30)
    fast = start_relay(tmp_path, "fast")
    spool = tmp_path / "spool"
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    shared = {"path": str(spool)}
    config_a = support.write_config(
        a_dir,
        stall.port,
        spool=shared,
        delivery={"max_connections": 2, "shutdown_grace": 1},
        timeouts={"data_end": 120},
    )
    config_b = support.write_config(b_dir, fast.port, spool=shared)
    try:
        for i in range(3):
            support.enqueue(config_a, numbered(i, "live"))
        a = start_daemon(config_a, tmp_path / "a.log")
        try:
            support.wait_until(
                lambda: stall.stats()["data_started"] >= 2, 10, what="A's two sessions in DATA"
            )
            claims = support.spool_files(spool, "outgoing_active")
            assert len(claims) == 2, claims
            # A frozen, so that it cannot put its lock file back: only the byte lock speaks for it
            a.signal(signal.SIGSTOP)
            try:
                [lock] = [n for n in os.listdir(spool / "owners") if n.endswith(".lock") and n[0] != "."]
                (spool / "owners" / lock).unlink()
                r = support.greenmail("run", "--once", config=config_b, timeout=30)
                assert r.returncode == 0, r.stderr.decode()
                assert support.spool_files(spool, "outgoing_active") == claims, r.stderr.decode()
            finally:
                a.signal(signal.SIGCONT)
            assert len(fast.messages()) == 1  # only the message A had not claimed
            assert b"claims of dead daemons returned" not in r.stderr
            support.wait_until(lambda: (spool / "owners" / lock).exists(), 5, what="A's lock file put back")
            assert a.proc.poll() is None
        finally:
            a.stop()
    finally:
        stall.stop()
        fast.stop()
    assert "was removed or replaced: put back" in a.text()


# -- 10. the relay closes after its 250 while the next message was pipelined ---------------------


class HoldFirstDot(FaultServer):
    """hold_dot on the first connection only (later connections answer at once)."""

    def option(self, name: str) -> object:
        if name.startswith("hold_dot") and self.connections > 1:
            return None
        return super().option(name)


def test_the_next_message_goes_back_untouched_when_the_relay_closes_after_its_250(tmp_path: Path) -> None:
    """Old code: the message whose MAIL/RCPT/DATA were pipelined behind the previous message's end
    counted as an attempt and was deferred by min_backoff (300 s), though it was never sent."""
    script = {
        "ehlo": ehlo("PIPELINING"),
        "hold_dot": "RCPT",  # the 250 only once the next message's commands have arrived
        "message": {"reply": "250 2.0.0 queued", "then": "drop"},
    }
    srv = HoldFirstDot(script)
    srv.start()
    try:
        config = support.write_config(tmp_path, srv.port, delivery={"max_connections": 1})
        support.enqueue(config, numbered(1, "pipe"), SENDER, "one@example.net")
        support.enqueue(config, numbered(2, "pipe"), SENDER, "two@example.net")
        d = start_daemon(config, tmp_path / "daemon.log")
        try:
            support.wait_until(lambda: len(srv.messages) == 2, 10, what="both messages at the relay")
            spool = tmp_path / "spool"
            support.wait_until(lambda: support.spool_files(spool, "outgoing") == [], 5)
        finally:
            assert d.stop() == 0, d.text()
    finally:
        srv.stop()
    # the first 250 was held until RCPT TO:<two@...> arrived behind the final dot: it was pipelined
    # (a client that waited would have timed out instead: nothing of that in the log)
    assert [(m["conn"], m["recipients"]) for m in srv.messages] == [
        (0, ["one@example.net"]),
        (1, ["two@example.net"]),
    ]
    log = d.text()
    assert "status=deferred" not in log and "timeout after" not in log, log
    assert log.count("status=sent") == 2


# -- 11. body lines over 998 octets ------------------------------------------------------------


LONG = b"L" * 5000
DOTTED = b"." + b"D" * 2500
MESSAGE = (
    b"From: app@example.org\r\nTo: rcpt@example.net\r\nSubject: long lines\r\n"
    b"Date: Wed, 02 Dec 2026 12:00:00 +0000\r\nMessage-ID: <long@test>\r\n\r\n"
    b"short\r\n" + LONG + b"\r\n" + DOTTED + b"\r\n" + b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\nend\r\n"
)


def check_broken(received: bytes) -> None:
    """No line over 998 octets (1,000 with CRLF), and the original once each inserted CRLF SP is taken out."""
    lines = received.split(b"\r\n")
    assert max(len(ln) for ln in lines) <= 998, sorted(len(ln) for ln in lines)[-3:]
    assert received.replace(b"\r\n ", b"") == MESSAGE
    assert b"x" * 998 + b"\r\n" in received  # a line of exactly 998 octets is left whole


def test_long_body_lines_reach_a_strict_relay_broken_with_crlf_sp(tmp_path: Path) -> None:
    """Old code: the 5,000-octet line went out as it was; aiosmtpd (strict, RFC 5321 4.5.3.1.6)
    answered 500 "Line too long" and the message failed."""
    strict = start_relay(tmp_path)
    try:
        config = support.write_config(tmp_path, strict.port, retry={"bounce": False})
        support.enqueue(config, MESSAGE)
        r = support.greenmail("run", "--once", config=config)
        assert r.returncode == 0, r.stderr.decode()
        [got] = strict.messages()
    finally:
        strict.stop()
    check_broken(got.content)


def test_long_body_lines_are_broken_in_bdat_too(tmp_path: Path) -> None:
    """Old code: the BDAT chunk carried the 5,000-octet line as it was."""
    with FaultServer({"ehlo": ehlo("PIPELINING", "CHUNKING")}) as srv:
        config = support.write_config(tmp_path, srv.port)
        support.enqueue(config, MESSAGE)
        r = support.greenmail("run", "--once", config=config)
        assert r.returncode == 0, r.stderr.decode()
    [msg] = srv.messages
    assert "chunks" in msg  # it went as BDAT
    check_broken(msg["data"])


# -- 12. the password file -----------------------------------------------------------------------


def auth_config(tmp_path: Path, port: int, mode: int) -> tuple[Path, Path]:
    secret = tmp_path / "relay-password"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    relay_keys = {
        "tls": "none",
        "username": "user",
        "password_file": str(secret),
        "auth_allow_plaintext": True,
    }
    return support.write_config(tmp_path, port, relay=relay_keys), secret


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666], ids=oct)
def test_a_password_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Old code: the file was used whatever its mode (exit 0, the password sent)."""
    with FaultServer({"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN")}) as srv:
        config, secret = auth_config(tmp_path, srv.port, mode)
        support.enqueue(config, numbered(1, "secret"))
        r = support.greenmail("run", "--once", config=config)
        assert srv.connections == 0
    err = r.stderr.decode()
    assert r.returncode == 78, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("greenmail:")]
    assert str(secret) in line and "relay.password_file" in line and "chmod 600" in line, line
    assert support.spool_files(tmp_path / "spool", "outgoing") != []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400], ids=oct)
def test_a_private_password_file_is_used(tmp_path: Path, mode: int) -> None:
    with FaultServer({"ehlo": ehlo("PIPELINING", "AUTH PLAIN LOGIN")}) as srv:
        config, _ = auth_config(tmp_path, srv.port, mode)
        support.enqueue(config, numbered(1, "secret"))
        r = support.greenmail("run", "--once", config=config)
        assert r.returncode == 0, r.stderr.decode()
        assert any(c.startswith("AUTH PLAIN ") for c in srv.commands()), srv.commands()
        assert len(srv.messages) == 1


# -- kill -9 during a 20,000-message drain -----------------------------------------------------

TOTAL = 20_000
MAX_CONNECTIONS = 10
KILL_AT = (3_000, 8_000, 13_000)  # messages at the sink when each SIGKILL comes
_MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9A-F]{24})@", re.MULTILINE)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs when there is one (the drain measures greenmail, not the disk)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="greenmail-kill9-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def received_ids(maildir: Path) -> Counter[str]:
    got: Counter[str] = Counter()
    for name in os.listdir(maildir / "new"):
        with open(maildir / "new" / name, "rb") as f:
            m = _MESSAGE_ID.search(f.read(4096))
        assert m, name
        got[m.group(1).decode()] += 1
    return got


def test_kill_9_during_a_20000_message_drain_loses_nothing(tmp_path: Path, fast_dir: Path) -> None:
    """Three SIGKILLs mid-drain: every message arrives, and only claims a kill left in flight
    (their settlement not written) may arrive twice. (The old code passes this one too.)"""
    spool, maildir = fast_dir / "spool", fast_dir / "sink"
    port = support.free_port()
    sink = support.sink(port, maildir, tmp_path / "sink.log")
    try:
        config = support.write_config(
            tmp_path, port, spool={"path": str(spool)}, delivery={"max_connections": MAX_CONNECTIONS}
        )
        q = Spool(spool)
        q.ensure()
        qids: list[str] = []
        for start in range(0, TOTAL, 1000):
            batch = [
                (SENDER, ["drain@example.net"], b"Subject: drain %d\n\nbody\n" % i)
                for i in range(start, start + 1000)
            ]
            qids += q.enqueue_many(batch)
        in_flight: set[str] = set()
        started = time.monotonic()
        for n, at in enumerate(KILL_AT):
            d = start_daemon(config, tmp_path / f"daemon{n}.log")
            support.wait_until(lambda at=at: len(os.listdir(maildir / "new")) >= at, 40, interval=0.005)
            d.proc.kill()
            assert d.wait(5) == -signal.SIGKILL
            d.stop()
            claims = support.spool_files(spool, "outgoing_active")
            assert len(claims) <= 2 * MAX_CONNECTIONS, claims  # one sent, one pipelined behind it
            in_flight |= {name_id(c) for c in claims}
        assert len(os.listdir(maildir / "new")) < TOTAL, "the drain ended before the last kill"
        last = start_daemon(config, tmp_path / "last.log")
        try:
            support.wait_until(lambda: len(os.listdir(maildir / "new")) >= TOTAL, 40, interval=0.05)
            support.wait_until(
                lambda: (
                    support.spool_files(spool, "outgoing")
                    == support.spool_files(spool, "outgoing_active")
                    == []
                ),
                10,
            )
        finally:
            assert last.stop() == 0, last.text()
        elapsed = time.monotonic() - started
    finally:
        sink.stop()
    got = received_ids(maildir)
    assert set(got) == set(qids), f"lost: {sorted(set(qids) - set(got))[:5]}"
    twice = {qid for qid, n in got.items() if n > 1}
    assert twice <= in_flight, sorted(twice - in_flight)[:5]
    assert all(got[qid] == 2 for qid in twice)
    assert len(twice) <= len(KILL_AT) * 2 * MAX_CONNECTIONS
    assert support.spool_files(spool, "failed") == support.spool_files(spool, "corrupt") == []
    print(f"{len(KILL_AT)} kills: {elapsed:.1f}s, {len(twice)} sent twice, {len(in_flight)} in flight")
