"""``greenmail queue list|show|delete|retry`` against real spools, with real delivery attempts.

Contract sections 3 (the spool) and 4 (commands). Temporary and permanent
failures come from an aiosmtpd relay whose RCPT answer is set per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import support
from aiosmtpd.controller import Controller

SENDER = "sender@example.org"
RCPT = "rcpt@example.net"


def message(subject: str) -> bytes:
    return f"Subject: {subject}\nFrom: {SENDER}\nTo: {RCPT}\n\nbody of {subject}\n".encode()


# -- a relay that refuses recipients --------------------------------------------------------------


class RcptHandler:
    """Answers every RCPT with ``reply`` (and records the addresses)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.rcpts: list[str] = []
        self.messages: list[bytes] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:  # noqa: N802
        self.rcpts.append(address)
        if self.reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.original_content or envelope.content)
        return "250 2.0.0 ok"


class Relay:
    def __init__(self, reply: str) -> None:
        self.port = support.free_port()
        self.handler = RcptHandler(reply)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Relay:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class Queue:
    """A config and its spool in one directory; the relay port can be changed between runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = root / "spool"
        self.cfg = self.config(support.free_port())

    def config(self, relay_port: int) -> Path:
        self.cfg = support.write_config(self.root, relay_port, retry={"min_backoff": 300, "bounce": False})
        return self.cfg

    def cmd(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return support.greenmail(*args, config=self.cfg, stdin=stdin)

    def enqueue(self, subject: str, *to: str, sender: str = SENDER) -> str:
        return support.enqueue(self.cfg, message(subject), sender, *to)

    def list(self) -> list[dict[str, Any]]:
        r = self.cmd("queue", "list", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert isinstance(data, list)
        return data

    def by_id(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.list()}

    def run_once(self, relay_port: int) -> str:
        self.config(relay_port)
        r = self.cmd("run", "--once")
        log = r.stderr.decode(errors="replace")
        assert r.returncode == 0, log
        return log

    def deliver_to_sink(self) -> Path:
        """run --once against a fresh ``greenmail sink``; its maildir/new."""
        port = support.free_port()
        maildir = self.root / f"maildir-{port}"
        sink = support.sink(port, maildir, self.root / f"sink-{port}.log")
        try:
            self.run_once(port)
        finally:
            sink.stop()
        return maildir / "new"

    def files(self, sub: str) -> list[str]:
        return support.spool_files(self.spool, sub)


@pytest.fixture
def q(tmp_path: Path) -> Queue:
    return Queue(tmp_path)


@pytest.fixture
def tempfail() -> Iterator[Relay]:
    with Relay("451 4.3.0 try later") as relay:
        yield relay


@pytest.fixture
def permfail() -> Iterator[Relay]:
    with Relay("550 5.1.1 no such user") as relay:
        yield relay


def iso(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    assert t.tzinfo is not None, f"{value!r} has no time zone"
    return t


def body_size(spool: Path, sub: str, name: str) -> int:
    data = (spool / sub / name).read_bytes()
    return len(data.split(b"\n", 2)[2])


def one_error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.decode(errors="replace").splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("greenmail:"), err
    return err[0]


# -- list ------------------------------------------------------------------------------------------


def test_list_json_on_an_empty_spool(q: Queue) -> None:
    assert q.list() == []


def test_list_plain_on_an_empty_spool(q: Queue) -> None:
    r = q.cmd("queue", "list")
    assert r.returncode == 0, r.stderr


def test_list_json_describes_each_queued_message(q: Queue) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    a = q.enqueue("first")
    b = q.enqueue("second", "x@example.net", "y@example.com")
    c = q.enqueue("third", sender="<>")
    after = datetime.now(UTC)
    items = q.list()
    assert sorted(m["id"] for m in items) == sorted([a, b, c])
    msgs = {m["id"]: m for m in items}
    assert msgs[a]["recipients"] == [RCPT]
    assert msgs[b]["recipients"] == ["x@example.net", "y@example.com"]
    assert msgs[a]["sender"] == SENDER
    assert msgs[c]["sender"] in ("", "<>")
    for qid, m in msgs.items():
        assert m["state"] == "queued"
        assert m["attempts"] == 0
        assert m["next_attempt"] is None
        assert m["last_error"] is None
        assert m["size"] == body_size(q.spool, "outgoing", qid)
        assert isinstance(m["size"], int)
        assert before.timestamp() - 2 <= iso(m["queued_at"]).timestamp() <= after.timestamp() + 2


def test_list_plain_shows_every_id(q: Queue) -> None:
    ids = [q.enqueue(f"m{i}") for i in range(3)]
    r = q.cmd("queue", "list")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for qid in ids:
        assert qid in out, out


def test_list_includes_a_message_dropped_in_by_another_program(q: Queue) -> None:
    own = q.enqueue("create the spool")
    tmp = q.spool / "tmp" / "writer"
    tmp.write_bytes(f"{SENDER}\r\n{RCPT},b@example.com\r\nSubject: dropped\r\n\r\nbody\r\n".encode())
    os.rename(tmp, q.spool / "outgoing" / "dropped1")
    msgs = q.by_id()
    assert len(msgs) == 2 and own in msgs
    (m,) = [m for qid, m in msgs.items() if qid != own]
    assert m["state"] == "queued"
    assert m["sender"] == SENDER
    assert m["recipients"] == [RCPT, "b@example.com"]
    assert m["size"] == len(b"Subject: dropped\r\n\r\nbody\r\n")


def test_list_includes_a_file_with_a_foreign_name(q: Queue) -> None:
    """Any program may rename a queue file into outgoing/ (contract 3); list shows it at once."""
    own = q.enqueue("ours")
    tmp = q.spool / "tmp" / "writer"
    tmp.write_bytes(f"{SENDER}\n{RCPT}\nSubject: foreign\n\nbody\n".encode())
    os.rename(tmp, q.spool / "outgoing" / "message from cron, #1")
    msgs = q.list()
    assert len(msgs) == 2, msgs
    assert own in {m["id"] for m in msgs}


def test_list_survives_a_corrupt_file_in_outgoing(q: Queue) -> None:
    own = q.enqueue("ours")
    tmp = q.spool / "tmp" / "writer"
    tmp.write_bytes(b"only one line\n")
    os.rename(tmp, q.spool / "outgoing" / "broken")
    r = q.cmd("queue", "list")
    assert r.returncode == 0, r.stderr
    assert own in r.stdout.decode()
    assert own in q.by_id()


def test_list_survives_unreadable_delivery_state(q: Queue, tempfail: Relay) -> None:
    bad = q.enqueue("state will be damaged")
    good = q.enqueue("fine")
    q.run_once(tempfail.port)
    meta = q.spool / "meta" / f"{bad}.json"
    assert meta.exists()
    meta.write_bytes(b"{not json")
    r = q.cmd("queue", "list", "--json")
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert {m["id"] for m in json.loads(r.stdout)} == {bad, good}


# -- deferred ----------------------------------------------------------------------------------------


def test_tempfail_makes_the_message_deferred(q: Queue, tempfail: Relay) -> None:
    qid = q.enqueue("later")
    before = time.time()
    q.run_once(tempfail.port)
    assert tempfail.handler.rcpts == [RCPT]
    (m,) = q.list()
    assert m["id"] == qid
    assert m["state"] == "deferred"
    assert m["attempts"] == 1
    assert m["next_attempt"] is not None
    next_at = iso(m["next_attempt"]).timestamp()
    assert before + 200 <= next_at <= time.time() + 400, m  # min_backoff is 300
    assert m["last_error"] is not None and "451" in m["last_error"], m
    assert m["size"] == body_size(q.spool, "outgoing", q.files("outgoing")[0])

    r = q.cmd("queue", "show", qid)
    assert r.returncode == 0, r.stderr
    shown = r.stdout.decode(errors="replace")
    assert "deferred" in shown and "451" in shown, shown
    assert shown.endswith("body of later\n")

    # a second run --once does not touch a message that is not due yet
    q.run_once(tempfail.port)
    assert tempfail.handler.rcpts == [RCPT]
    assert q.list()[0]["attempts"] == 1


def test_retry_id_makes_a_deferred_message_due_and_it_is_delivered(q: Queue, tempfail: Relay) -> None:
    qid = q.enqueue("retry me")
    other = q.enqueue("stay deferred")
    q.run_once(tempfail.port)
    assert {m["state"] for m in q.list()} == {"deferred"}

    r = q.cmd("queue", "retry", qid)
    assert r.returncode == 0, r.stderr
    msgs = q.by_id()
    m = msgs[qid]
    assert m["next_attempt"] is None or iso(m["next_attempt"]).timestamp() <= time.time(), m
    assert m["attempts"] == 1
    assert msgs[other]["next_attempt"] is not None
    assert iso(msgs[other]["next_attempt"]).timestamp() > time.time()

    new = q.deliver_to_sink()
    received = [p.read_bytes() for p in new.iterdir()]
    assert len(received) == 1 and b"Subject: retry me" in received[0], received
    assert list(q.by_id()) == [other]
    assert not (q.spool / "meta" / f"{qid}.json").exists()


def test_retry_all_makes_every_deferred_message_due(q: Queue, tempfail: Relay) -> None:
    ids = {q.enqueue("one"), q.enqueue("two", "a@example.net", "b@example.net")}
    q.run_once(tempfail.port)
    assert {m["state"] for m in q.list()} == {"deferred"}
    r = q.cmd("queue", "retry", "--all")
    assert r.returncode == 0, r.stderr
    for m in q.list():
        assert m["next_attempt"] is None or iso(m["next_attempt"]).timestamp() <= time.time(), m
    assert set(q.by_id()) == ids
    new = q.deliver_to_sink()
    assert len(list(new.iterdir())) == 2
    assert q.list() == []
    assert q.files("outgoing") == [] and q.files("meta") == []


def test_retry_without_id_or_all_is_a_usage_error(q: Queue) -> None:
    q.enqueue("x")
    r = q.cmd("queue", "retry")
    assert r.returncode != 0
    assert r.stderr.strip()


def test_retry_with_both_id_and_all_is_a_usage_error(q: Queue) -> None:
    qid = q.enqueue("x")
    r = q.cmd("queue", "retry", qid, "--all")
    assert r.returncode != 0
    assert r.stderr.strip()


def test_retry_unknown_id(q: Queue) -> None:
    q.enqueue("x")
    one_error_line(q.cmd("queue", "retry", "NOSUCHID0000"))


def test_retry_of_a_queued_message_changes_nothing(q: Queue) -> None:
    qid = q.enqueue("x")
    before = q.files("outgoing")
    r = q.cmd("queue", "retry", qid)
    assert r.returncode == 0, r.stderr
    assert q.files("outgoing") == before
    assert q.by_id()[qid]["state"] == "queued"


# -- failed ------------------------------------------------------------------------------------------------


def test_permanent_failure_makes_the_message_failed_and_retry_brings_it_back(
    q: Queue, permfail: Relay
) -> None:
    qid = q.enqueue("doomed")
    q.run_once(permfail.port)
    assert permfail.handler.rcpts == [RCPT]
    msgs = q.by_id()
    assert list(msgs) == [qid]
    m = msgs[qid]
    assert m["state"] == "failed"
    assert m["attempts"] == 1
    assert m["next_attempt"] is None
    assert m["last_error"] is not None and "550" in m["last_error"], m
    assert q.files("outgoing") == []
    assert len(q.files("failed")) == 1
    assert m["size"] == body_size(q.spool, "failed", q.files("failed")[0])

    # retry --all is for deferred messages: a failed one stays failed
    r = q.cmd("queue", "retry", "--all")
    assert r.returncode == 0, r.stderr
    assert q.by_id()[qid]["state"] == "failed"

    # retry ID puts it back for another attempt
    r = q.cmd("queue", "retry", qid)
    assert r.returncode == 0, r.stderr
    m = q.by_id()[qid]
    assert m["state"] in ("queued", "deferred"), m
    assert m["next_attempt"] is None or iso(m["next_attempt"]).timestamp() <= time.time(), m
    assert q.files("failed") == []

    new = q.deliver_to_sink()
    received = [p.read_bytes() for p in new.iterdir()]
    assert len(received) == 1 and b"Subject: doomed" in received[0], received
    assert q.list() == []


# -- show ------------------------------------------------------------------------------------------------


def test_show_prints_envelope_state_and_message(q: Queue) -> None:
    qid = q.enqueue("shown", "x@example.net", "y@example.com")
    r = q.cmd("queue", "show", qid)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    data = (q.spool / "outgoing" / qid).read_bytes()
    body = data.split(b"\n", 2)[2]
    assert out.endswith(body)
    head = out[: -len(body)].decode()
    for text in (qid, SENDER, "x@example.net", "y@example.com", "queued"):
        assert text in head, head


def test_show_unknown_id(q: Queue) -> None:
    q.enqueue("x")
    r = q.cmd("queue", "show", "NOSUCHID0000")
    one_error_line(r)
    assert r.stdout == b""


# -- delete ------------------------------------------------------------------------------------------------


def test_delete_removes_the_message(q: Queue) -> None:
    qid = q.enqueue("unwanted")
    keep = q.enqueue("wanted")
    r = q.cmd("queue", "delete", qid)
    assert r.returncode == 0, r.stderr
    assert list(q.by_id()) == [keep]
    assert q.files("outgoing") == [keep]
    assert os.listdir(q.spool / "tmp") == []


def test_delete_removes_a_deferred_message_and_its_state(q: Queue, tempfail: Relay) -> None:
    qid = q.enqueue("unwanted")
    keep = q.enqueue("wanted")
    q.run_once(tempfail.port)
    assert (q.spool / "meta" / f"{qid}.json").exists()  # where this spool keeps the state
    r = q.cmd("queue", "delete", qid)
    assert r.returncode == 0, r.stderr
    assert list(q.by_id()) == [keep]
    assert [n.split(",")[0] for n in q.files("outgoing")] == [keep]
    assert not (q.spool / "meta" / f"{qid}.json").exists()
    assert (q.spool / "meta" / f"{keep}.json").exists()
    assert os.listdir(q.spool / "tmp") == []


def test_delete_a_failed_message(q: Queue, permfail: Relay) -> None:
    qid = q.enqueue("doomed")
    q.run_once(permfail.port)
    r = q.cmd("queue", "delete", qid)
    assert r.returncode == 0, r.stderr
    assert q.list() == []
    assert q.files("failed") == [] and q.files("meta") == []


def test_delete_unknown_id(q: Queue) -> None:
    qid = q.enqueue("x")
    one_error_line(q.cmd("queue", "delete", "NOSUCHID0000"))
    assert list(q.by_id()) == [qid]


def test_delete_twice(q: Queue) -> None:
    qid = q.enqueue("x")
    assert q.cmd("queue", "delete", qid).returncode == 0
    one_error_line(q.cmd("queue", "delete", qid))


def test_message_being_delivered_cannot_be_deleted_or_retried(q: Queue) -> None:
    qid = q.enqueue("in flight")
    claimed = q.spool / "outgoing_active" / f"{qid}@otherhost.4242.deadbeef"
    os.rename(q.spool / "outgoing" / qid, claimed)
    content = claimed.read_bytes()

    m = q.by_id()[qid]
    assert m["state"] == "active"

    r = q.cmd("queue", "delete", qid)
    line = one_error_line(r)
    assert "being delivered" in line, line
    assert claimed.read_bytes() == content
    assert q.files("outgoing_active") == [claimed.name]

    r = q.cmd("queue", "retry", qid)
    one_error_line(r)
    assert q.files("outgoing_active") == [claimed.name]
    assert q.files("outgoing") == []
