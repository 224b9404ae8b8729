"""Queue management while the daemon runs: hold, release, delete (--all-failed), retry.

A real ``greenmail run`` (check_interval = 1 s, metrics on) delivers to a real
``greenmail sink``; the queue commands are run beside it as separate processes,
as an operator would. Failures come from an in-process fault server.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import support
from aiosmtpd_server import start_daemon
from faultserver import FaultServer

SENDER = "sender@example.org"
EX_DATAERR, EX_TEMPFAIL = 65, 75


def message(subject: str) -> bytes:
    return f"From: {SENDER}\nTo: rcpt@example.net\nSubject: {subject}\n\nbody of {subject}\n".encode()


class Setup:
    """A config (check_interval 1 s, metrics on), its spool, a relay port and the daemon's log."""

    def __init__(self, root: Path, relay_port: int, **sections: dict[str, Any]) -> None:
        self.root = root
        self.relay_port = relay_port
        self.mport = support.free_port()
        sections.setdefault("delivery", {}).update({"check_interval": 1, "shutdown_grace": 2})
        sections["metrics"] = {"listen": f"127.0.0.1:{self.mport}"}
        self.cfg = support.write_config(root, relay_port, **sections)
        self.spool = root / "spool"
        self.maildir = root / "maildir"
        self.daemon: support.Process | None = None

    def start(self) -> support.Process:
        self.daemon = start_daemon(self.cfg, self.root / "daemon.log", metrics_port=self.mport)
        return self.daemon

    def cmd(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return support.greenmail(*args, config=self.cfg, stdin=stdin)

    def enqueue(self, subject: str, *to: str) -> str:
        return support.enqueue(self.cfg, message(subject), SENDER, *(to or ("rcpt@example.net",)))

    def queue(self) -> dict[str, dict[str, Any]]:
        r = self.cmd("queue", "list", "--json")
        assert r.returncode == 0, r.stderr
        return {m["id"]: m for m in json.loads(r.stdout)}

    def state(self, qid: str) -> str | None:
        """The message's state as ``queue list`` reports it (None: not in the queue)."""
        m = self.queue().get(qid)
        return m["state"] if m else None

    def where(self, qid: str) -> str | None:
        """The same state read from the spool's directories: cheap enough to poll."""
        for sub, state in (("outgoing_active", "active"), ("hold", "held"), ("failed", "failed")):
            if any(n.split(",")[0] == qid for n in support.spool_files(self.spool, sub)):
                return state
        for n in support.spool_files(self.spool, "outgoing"):
            if n.split(",")[0] == qid:
                return "deferred" if n.count(",") == 2 and n.split(",")[1] != "0" else "queued"
        return None

    def empty(self) -> bool:
        return not any(
            support.spool_files(self.spool, d) for d in ("outgoing", "outgoing_active", "failed", "hold")
        )

    def delivered(self) -> list[str]:
        """Subjects of the messages the sink stored, in no particular order."""
        new = self.maildir / "new"
        if not new.exists():
            return []
        out = []
        for f in new.iterdir():
            msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
            out.append(str(msg["Subject"]))
        return out

    def scans(self) -> float:
        """greenmail_spool_scans_total{trigger="periodic"}: how many periodic checks have run."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(r'^greenmail_spool_scans_total\{trigger="periodic"\} (\S+)$', text, re.MULTILINE)
        assert m, "no periodic scan counter"
        return float(m.group(1))

    def wait_periodic_checks(self, n: int = 2) -> None:
        start = self.scans()
        support.wait_until(lambda: self.scans() >= start + n, 10, 0.1, what=f"{n} periodic checks")


@pytest.fixture
def sinked(tmp_path: Path) -> Iterator[Setup]:
    """A sink relay, and a daemon started by the test (stopped at the end)."""
    s = Setup(tmp_path, support.free_port())
    sink = support.sink(s.relay_port, s.maildir, tmp_path / "sink.log")
    try:
        yield s
    finally:
        if s.daemon is not None:
            s.daemon.stop()
        sink.stop()


def test_held_message_is_not_sent_until_released(sinked: Setup) -> None:
    s = sinked
    held = s.enqueue("held")
    r = s.cmd("queue", "hold", held)
    assert r.returncode == 0, r.stderr
    assert b"held" in r.stdout
    m = s.queue()[held]
    assert (m["state"], m["next_attempt"]) == ("held", None)
    listing = s.cmd("queue", "list").stdout.decode()
    assert re.search(rf"^{held}\s+held\b", listing, re.MULTILINE), listing

    s.start()
    s.enqueue("before the checks")  # a wake-up delivers this one...
    support.wait_until(lambda: "before the checks" in s.delivered(), 10)
    s.wait_periodic_checks(2)  # ... and full scans find the held one and leave it
    s.enqueue("after the checks")
    support.wait_until(lambda: "after the checks" in s.delivered(), 10)
    assert "held" not in s.delivered()
    assert s.state(held) == "held"
    assert support.spool_files(s.spool, "hold") == [held]

    released = time.monotonic()
    r = s.cmd("queue", "release", held)
    assert r.returncode == 0, r.stderr
    assert b"released" in r.stdout
    support.wait_until(lambda: "held" in s.delivered(), 5, what="the released message")
    assert time.monotonic() - released < 3.0
    assert sorted(s.delivered()) == ["after the checks", "before the checks", "held"]
    support.wait_until(s.empty, 5)
    assert s.queue() == {}


def test_hold_twice_and_release_of_a_message_not_held(tmp_path: Path) -> None:
    s = Setup(tmp_path, support.free_port())
    qid = s.enqueue("twice")
    assert s.cmd("queue", "hold", qid).returncode == 0
    again = s.cmd("queue", "hold", qid)
    assert again.returncode == 0 and b"already held" in again.stdout
    assert s.cmd("queue", "release", qid).returncode == 0
    not_held = s.cmd("queue", "release", qid)
    assert not_held.returncode == 0 and b"not held" in not_held.stdout
    assert s.state(qid) == "queued"


def test_hold_and_delete_while_the_daemon_runs(tmp_path: Path) -> None:
    """The relay is down: messages wait in outgoing/ (nothing claimed), so hold works at once.

    Then the relay comes up: the other message goes, the held one stays, and is deleted.
    """
    s = Setup(tmp_path, support.free_port())
    sink: support.Process | None = None
    try:
        s.start()
        keep = s.enqueue("keep me back")
        other = s.enqueue("let me go")
        support.wait_until(lambda: "refused" in s.daemon.text() if s.daemon else False, 10)
        r = s.cmd("queue", "hold", keep)
        assert r.returncode == 0, r.stderr
        q = s.queue()
        assert (q[keep]["state"], q[other]["state"], q[other]["attempts"]) == ("held", "queued", 0)

        sink = support.sink(s.relay_port, s.maildir, tmp_path / "sink.log")
        support.wait_until(lambda: "let me go" in s.delivered(), 10, what="the next periodic check")
        s.wait_periodic_checks(1)  # one more full scan after the one that delivered
        assert s.delivered() == ["let me go"]
        assert s.state(keep) == "held"
        retry = s.cmd("queue", "retry", keep)
        assert retry.returncode != 0 and b"hold" in retry.stderr  # release it first

        r = s.cmd("queue", "delete", keep)
        assert r.returncode == 0, r.stderr
        assert s.queue() == {}
        assert support.spool_files(s.spool, "hold") == []
        assert not os.path.exists(s.spool / "meta" / f"{keep}.json")
        assert s.delivered() == ["let me go"]
    finally:
        if s.daemon is not None:
            s.daemon.stop()
        if sink is not None:
            sink.stop()


@pytest.mark.parametrize("command", ["hold", "release", "delete", "retry", "show"])
def test_unknown_id(tmp_path: Path, command: str) -> None:
    s = Setup(tmp_path, support.free_port())
    s.enqueue("some message")
    r = s.cmd("queue", command, "NOSUCHID0000000000000000")
    assert r.returncode == EX_DATAERR, r
    assert b"NOSUCHID0000000000000000" in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


# -- failed and deferred messages against a running daemon ------------------------------------------------


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[tuple[Setup, FaultServer]]:
    relay = FaultServer()
    relay.start()
    s = Setup(tmp_path, relay.port, retry={"min_backoff": 300})
    try:
        yield s, relay
    finally:
        if s.daemon is not None:
            s.daemon.stop()
        relay.stop()


def originals(relay: FaultServer) -> list[dict[str, Any]]:
    return [m for m in relay.messages if m["sender"] == SENDER and (m["reply"] or "").startswith("250")]


def test_retry_and_delete_all_failed_while_running(faulty: tuple[Setup, FaultServer]) -> None:
    s, relay = faulty
    relay.script = {
        "rcpt": {"when": {"<bad@": "550 5.1.1 no such user", "<later@": "451 4.2.0 try later"}},
    }
    s.start()
    failed = s.enqueue("partly failing", "good@example.net", "bad@example.net")
    deferred = s.enqueue("deferred", "later@example.net")
    support.wait_until(lambda: s.where(failed) == "failed" and s.where(deferred) == "deferred", 10)
    q = s.queue()
    assert q[failed]["recipient_states"] == {"good@example.net": "delivered", "bad@example.net": "failed"}
    assert "550 5.1.1" in q[failed]["last_error"]
    table = s.cmd("queue", "list").stdout.decode()
    assert re.search(r"\bdelivered\s+<good@example\.net>", table), table
    assert re.search(r"\bfailed\s+<bad@example\.net>", table), table
    assert re.search(r"\bpending\s+<later@example\.net>", table), table
    show = s.cmd("queue", "show", failed)
    assert show.returncode == 0, show.stderr
    text = show.stdout.decode()
    assert re.search(r"^state: failed$", text, re.MULTILINE), text
    assert "bad@example.net" in text and "Subject: partly failing" in text
    # the bounce is delivered by the daemon like any message
    support.wait_until(lambda: [m for m in relay.messages if m["sender"] == ""], 10, what="the bounce")

    # the relay is fixed: retry brings the failed message back for its failed recipient only
    relay.script = {}
    r = s.cmd("queue", "retry", failed)
    assert r.returncode == 0, r.stderr
    support.wait_until(lambda: s.where(failed) is None, 10, what="the retried message")
    assert [m["recipients"] for m in originals(relay)] == [["good@example.net"], ["bad@example.net"]]

    # the deferred one is due in 5 minutes; retry --all makes it due now
    assert s.state(deferred) == "deferred"
    r = s.cmd("queue", "retry", "--all")
    assert r.returncode == 0 and b"1 message due now" in r.stdout, r
    support.wait_until(lambda: s.where(deferred) is None, 5, what="the message made due")
    assert ["later@example.net"] in [m["recipients"] for m in originals(relay)]

    # two permanent failures, removed in one go
    relay.script = {"rcpt": {"when": {"<gone": "550 5.1.1 no such user"}}}
    doomed = [s.enqueue(f"doomed {i}", f"gone{i}@example.net") for i in range(2)]
    support.wait_until(lambda: all(s.where(q) == "failed" for q in doomed), 10)
    r = s.cmd("queue", "delete", "--all-failed")
    assert r.returncode == 0, r.stderr
    assert b"2 failed messages deleted" in r.stdout
    assert support.spool_files(s.spool, "failed") == []
    assert all(s.state(q) is None for q in doomed)
    support.wait_until(s.empty, 10, what="their bounces to be delivered")
    assert len([m for m in relay.messages if m["sender"] == ""]) == 3


def test_a_message_being_sent_cannot_be_deleted_or_held(faulty: tuple[Setup, FaultServer]) -> None:
    s, relay = faulty
    relay.script = {"data": "stall"}
    s.cfg = support.write_config(
        s.root,
        relay.port,
        delivery={"check_interval": 1, "shutdown_grace": 2},
        timeouts={"data_init": 6},  # long enough for both commands on a loaded machine
        metrics={"listen": f"127.0.0.1:{s.mport}"},
    )
    s.start()
    qid = s.enqueue("in flight")
    support.wait_until(lambda: "DATA" in relay.verbs(), 10, what="the session to reach DATA")
    assert s.state(qid) == "active"
    for command in ("delete", "hold"):
        r = s.cmd("queue", command, qid)
        assert r.returncode == EX_TEMPFAIL, (command, r)
        assert b"being delivered" in r.stderr, r.stderr
    # the stalled attempt times out; the message comes back, and can be deleted now
    support.wait_until(lambda: s.where(qid) == "deferred", 20)
    assert s.state(qid) == "deferred"
    r = s.cmd("queue", "delete", qid)
    assert r.returncode == 0, r.stderr
    assert s.queue() == {}
