"""Delivery failures end to end: the real ``greenmail run --once`` against a fault-injecting relay.

The matrix: every SMTP stage (banner, helo, mail, rcpt, data, message) x every kind of
answer (2xx, 4xx, 5xx, drop, stall), for a one-recipient and a three-recipient
message, with tests/faultserver.py run as a subprocess (a relay without PIPELINING, so
every command waits for its reply; then the MAIL and RCPT faults again with a relay
that offers PIPELINING). At the rcpt stage only <b@example.net> gets the fault, so the
three-recipient message shows per-recipient results. For each case the test checks,
byte for byte, what the relay received, the queue afterwards (``queue list --json``),
the bounce when one is due (read back from the spool and parsed with the email
package), and then a second pass (``queue retry --all``, and ``queue retry ID`` for a
failed message) against a well-behaved relay: it must get exactly the recipients that
were not delivered, never one that was, and the bounce.

Both messages of a case pair (different senders) go through one relay and one
``run --once``: a scenario. The scenarios are independent (own directory, relay,
spool) and run in parallel threads by a module fixture; each parametrized test then
checks one message of one scenario.

Further tests: the retry schedule, expiry (greenmail_messages_expired_total),
no bounce for a null sender, retry.bounce = false, the delay warning, RCPT 452,
Message-ID across retries.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import sys
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import support
from faultserver import FaultServer

from greenmail.spool import Spool
from greenmail.wire import normalise

SENDER = "sender@example.org"
A, B, C = "a@example.net", "b@example.net", "c@example.net"
FAULTED = B  # at the rcpt stage only this recipient gets the fault
HELO = "client.test"
MIN_BACKOFF = 300
MESSAGE = (
    b"From: Sender <sender@example.org>\n"
    b"To: a@example.net, b@example.net, c@example.net\n"
    b"Subject: matrix message\n"
    b"\n"
    b"Hello,\n"
    b".a line with a leading dot\n"
    b"bye\n"
)
FAULTSERVER = support.ROOT / "tests" / "faultserver.py"

STAGES = ("banner", "helo", "mail", "rcpt", "data", "message")
OUTCOMES = ("2xx", "4xx", "5xx", "drop", "stall")
REPLIES = {
    "banner": {
        "2xx": "220 fault.test ESMTP ready",
        "4xx": "421 4.3.2 busy, come back later",
        "5xx": "554 5.3.2 no service",
    },
    "helo": {"2xx": "250 fault.test", "4xx": "421 4.3.2 busy", "5xx": "550 5.5.1 not today"},
    "mail": {
        "2xx": "250 2.1.0 sender ok",
        "4xx": "451 4.3.0 sender check later",
        "5xx": "553 5.1.8 sender rejected",
    },
    "rcpt": {
        "2xx": "250 2.1.5 recipient ok",
        "4xx": "450 4.2.1 mailbox busy",
        "5xx": "550 5.1.1 no such user",
    },
    # the reply to DATA: a 2xx is not what DATA expects (354), so it is a protocol error
    "data": {"2xx": "250 2.0.0 not a 354", "4xx": "451 4.3.0 no DATA now", "5xx": "554 5.6.0 no DATA"},
    "message": {
        "2xx": "250 2.0.0 queued as X1",
        "4xx": "451 4.3.1 out of space",
        "5xx": "554 5.7.1 content rejected",
    },
}
TIMEOUT_KEY = {
    "banner": "banner",
    "helo": "command",
    "mail": "command",
    "rcpt": "command",
    "data": "data_init",
    "message": "data_end",
}
RELAXED = {"connect": 5, "banner": 5, "command": 5, "data_init": 5, "data_block": 5, "data_end": 5}


# -- helpers: relays, the queue, bounces -------------------------------------------------------------


class FaultRelay:
    """tests/faultserver.py as a subprocess; stop() returns its JSON log (complete once it has exited)."""

    def __init__(self, script: dict[str, Any], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(FAULTSERVER),
                "--port",
                "0",
                "--script",
                json.dumps(script),
                "--log",
                str(log),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=support.env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.proc.kill()
            raise AssertionError(f"faultserver did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        support.terminate(self.proc)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return json.loads(self.log.read_text())


def relay_messages(log: dict[str, Any]) -> list[dict[str, Any]]:
    return log["messages"]


def rcpt_commands(commands: list[str]) -> list[str]:
    """The addresses of the RCPT TO commands, in order."""
    return [m.group(1) for c in commands if (m := re.match(r"(?i)RCPT TO:<([^>]*)>", c))]


def verbs(commands: list[str]) -> list[str]:
    return [c.split(" ", 1)[0].upper() for c in commands]


def config(directory: Path, relay_port: int, **sections: dict[str, Any]) -> Path:
    sections.setdefault("delivery", {}).setdefault("connect_tries", 1)
    sections.setdefault("retry", {}).setdefault("min_backoff", MIN_BACKOFF)
    sections.setdefault("timeouts", dict(RELAXED))
    return support.write_config(directory, relay_port, **sections)


def run_once(cfg: Path) -> str:
    r = support.greenmail("run", "--once", config=cfg, timeout=60)
    log = r.stderr.decode(errors="replace")
    assert r.returncode == 0, log
    return log


def queue_list(cfg: Path) -> list[dict[str, Any]]:
    r = support.greenmail("queue", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list)
    return data


def queue_cmd(cfg: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return support.greenmail("queue", *args, config=cfg)


def enqueue(cfg: Path, rcpts: list[str], message: bytes = MESSAGE, sender: str = SENDER) -> str:
    """Through the spool's Python enqueue API (what ``greenmail enqueue`` calls), to save a process."""
    spool = Spool(cfg.parent / "spool")
    spool.ensure()
    return spool.enqueue(sender, rcpts, message)


@dataclass
class Spooled:
    directory: str
    name: str
    sender: str
    recipients: list[str]
    body: bytes


def spooled(spool: Path) -> list[Spooled]:
    """Every queue file in outgoing/ and failed/ (and hold/), with its envelope."""
    out = []
    for sub in ("outgoing", "outgoing_active", "failed", "hold"):
        for name in support.spool_files(spool, sub):
            sender, rcpts, body = (spool / sub / name).read_bytes().split(b"\n", 2)
            out.append(
                Spooled(
                    sub, name, sender.rstrip(b"\r").decode(), rcpts.rstrip(b"\r").decode().split(","), body
                )
            )
    return out


def bounces(spool: Path) -> list[Spooled]:
    return [s for s in spooled(spool) if s.sender in ("", "<>")]


def parse(data: bytes | str) -> EmailMessage:
    raw = data.encode("latin-1") if isinstance(data, str) else data
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def message_id(data: bytes | str) -> str | None:
    mid = parse(data)["Message-ID"]
    return str(mid).strip() if mid is not None else None


@dataclass
class Dsn:
    msg: EmailMessage
    per_message: dict[str, str]
    recipients: dict[str, dict[str, str]]
    original_headers: str


def parse_dsn(data: bytes | str) -> Dsn:
    """An RFC 3464 report, checked for its structure; its fields, by recipient."""
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    types = [p.get_content_type() for p in parts]
    assert types[0] == "text/plain", types
    assert "message/delivery-status" in types, types
    assert "text/rfc822-headers" in types, types
    status = parts[types.index("message/delivery-status")]
    groups = [{k: str(v) for k, v in g.items()} for g in status.get_payload()]
    per_rcpt = {}
    for g in groups[1:]:
        per_rcpt[g["Final-Recipient"].split(";", 1)[1].strip()] = g
    headers = parts[types.index("text/rfc822-headers")].get_content()
    return Dsn(msg, groups[0], per_rcpt, headers)


def check_failure_report(
    dsn: Dsn, failed: dict[str, str], original_mid: str | None, sender: str = SENDER
) -> None:
    """``failed``: recipient -> the relay's reply that failed it."""
    assert dsn.msg["To"].addresses[0].addr_spec == sender
    assert dsn.per_message["Reporting-MTA"] == f"dns; {HELO}"
    assert sorted(dsn.recipients) == sorted(failed)
    for rcpt, reply in failed.items():
        g = dsn.recipients[rcpt]
        assert g["Action"] == "failed"
        enhanced = reply.split()[1] if re.match(r"\d\d\d [245]\.\d+\.\d+", reply) else f"{reply[0]}.0.0"
        assert g["Status"] == enhanced
        assert g["Diagnostic-Code"] == f"smtp; {reply}"
    original = parse(dsn.original_headers)
    assert original["Subject"] == "matrix message"
    if original_mid is not None:
        assert str(original["Message-ID"]).strip() == original_mid
    assert "Hello," not in dsn.original_headers  # the headers only, not the body


def iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def metric(port: int, name: str) -> float | None:
    """One sample of the live /metrics (None while the endpoint is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


class GoodRelay(FaultServer):
    """An in-process fault server with no faults, for the second pass."""

    def wait_idle(self) -> None:
        support.wait_until(lambda: self.closed == self.connections, 10, what="the relay's sessions to end")


# -- the matrix: expectations ------------------------------------------------------------------------

LOCKSTEP_EHLO = "250 fault.test"  # an EHLO reply without PIPELINING: one command, one reply
ONE, THREE = "one@example.org", "three@example.org"  # the senders of a scenario's two messages


@dataclass(frozen=True)
class Scenario:
    """One relay behaviour; both messages (one recipient, three recipients) go through it."""

    stage: str
    outcome: str
    pipelined: bool = False  # the relay offers PIPELINING (MAIL, RCPTs and DATA in one write)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.outcome}" + ("-pipelined" if self.pipelined else "")

    @property
    def action(self) -> Any:
        return REPLIES[self.stage][self.outcome] if self.outcome in ("2xx", "4xx", "5xx") else self.outcome

    @property
    def script(self) -> dict[str, Any]:
        if self.stage == "rcpt":
            script: dict[str, Any] = {"rcpt": {"when": {f"<{FAULTED}>": self.action}}}
        else:
            script = {self.stage: self.action}
        if not self.pipelined and self.stage != "helo":  # at the helo stage the fault is the EHLO reply
            script["ehlo"] = LOCKSTEP_EHLO
        return script

    @property
    def timeouts(self) -> dict[str, float]:
        t = dict(RELAXED)
        if self.outcome == "stall":
            t[TIMEOUT_KEY[self.stage]] = 1
        return t


@dataclass(frozen=True)
class Case:
    stage: str
    outcome: str
    n: int  # recipients: 1 (just b) or 3 (a, b, c)
    pipelined: bool = False

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.outcome}-{self.n}rcpt" + ("-pipelined" if self.pipelined else "")

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.stage, self.outcome, self.pipelined)

    @property
    def sender(self) -> str:
        return ONE if self.n == 1 else THREE

    @property
    def rcpts(self) -> list[str]:
        return [B] if self.n == 1 else [A, B, C]


@dataclass
class Expect:
    delivered: list[str]
    pending: list[str]
    failed: list[str]
    state: str | None  # None: the message is gone from the queue
    attempts: int
    last_error: str | None  # a substring (None: no last error)
    rcpt_seen: dict[str, int]  # RCPT commands per recipient in the first pass
    data_sent: bool  # the DATA command was sent
    body_received: bool  # the relay read the message up to the final dot
    twice_warning: bool
    reply: str | None = None  # the relay's reply that decided the failed/deferred recipients


def expect(case: Case) -> Expect:
    rcpts, stage, outcome = case.rcpts, case.stage, case.outcome
    reply = REPLIES[stage].get(outcome)
    nothing_seen = {r: 0 for r in rcpts}
    all_seen = {r: 1 for r in rcpts}
    if outcome == "2xx" and stage != "data":
        return Expect(rcpts, [], [], None, 0, None, all_seen, True, True, False)
    if stage in ("banner", "helo"):
        # the relay refuses (or fails) the session: no message is to blame, none is touched
        return Expect([], rcpts, [], "queued", 0, None, nothing_seen, False, False, False)
    if outcome in ("drop", "stall") or (stage == "data" and outcome == "2xx"):
        why = {"drop": "connection", "stall": "timeout", "2xx": "250"}[outcome]
        seen = nothing_seen if stage == "mail" else all_seen
        if stage == "rcpt":  # the connection died at b: c was never asked for
            seen = {r: (1 if r in (A, B) else 0) for r in rcpts}
        data_sent = stage in ("data", "message")
        return Expect(
            [], rcpts, [], "deferred", 1, why, seen, data_sent, stage == "message", stage == "message"
        )
    # 4xx / 5xx at mail, rcpt, data, message
    hit = [FAULTED] if stage == "rcpt" else rcpts
    ok = [r for r in rcpts if r not in hit]
    seen = nothing_seen if stage == "mail" else all_seen
    data_sent = stage in ("data", "message") or (stage == "rcpt" and bool(ok))
    if case.pipelined:  # RCPTs and DATA went out with MAIL: the relay saw (and refused) them all
        seen, data_sent = all_seen, True
    body = stage == "message" or (stage == "rcpt" and bool(ok))
    if outcome == "4xx":
        return Expect(ok, hit, [], "deferred", 1, reply, seen, data_sent, body, False, reply)
    return Expect(ok, [], hit, "failed", 1, reply, seen, data_sent, body, False, reply)


CASES = [Case(s, o, n) for s in STAGES for o in OUTCOMES for n in (1, 3)]
# pipelining changes what the relay sees from MAIL on: refusals and a drop there, with the relay offering it
CASES += [
    Case(s, o, n, pipelined=True) for s in ("mail", "rcpt") for o in ("4xx", "5xx", "drop") for n in (1, 3)
]
SCENARIOS = list(dict.fromkeys(c.scenario for c in CASES))


# -- the matrix: running the scenarios ---------------------------------------------------------------


def by_sender(connections: list[list[str]]) -> dict[str, list[str]]:
    """Commands by envelope sender: each MAIL FROM starts a transaction that runs to the next one."""
    out: dict[str, list[str]] = {}
    for conn in connections:
        current = None
        for c in conn:
            m = re.match(r"(?i)MAIL FROM:<([^>]*)>", c)
            if m:
                current = m.group(1)
                out.setdefault(current, [])
            if current is not None:
                out[current].append(c)
    return out


@dataclass
class Result:
    scenario: Scenario
    error: str | None = None
    ids: dict[str, str] = field(default_factory=dict)  # sender -> queue id
    message_ids: dict[str, str | None] = field(default_factory=dict)  # sender -> Message-ID
    bodies: dict[str, bytes] = field(default_factory=dict)  # sender -> the message as queued
    started: float = 0.0
    finished: float = 0.0
    log1: str = ""
    relay1: dict[str, Any] = field(default_factory=dict)
    queue1: list[dict[str, Any]] = field(default_factory=list)
    bounces1: list[Spooled] = field(default_factory=list)
    log2: str = ""
    relay2: list[dict[str, Any]] = field(default_factory=list)
    relay2_commands: list[list[str]] = field(default_factory=list)
    left2: list[Spooled] = field(default_factory=list)


def run_scenario(sc: Scenario, root: Path) -> Result:
    res = Result(sc)
    try:
        _run_scenario(sc, root / sc.id, res)
    except BaseException:
        res.error = traceback.format_exc()
    return res


def _run_scenario(sc: Scenario, d: Path, res: Result) -> None:
    d.mkdir(parents=True)
    spool = d / "spool"
    relay = FaultRelay(sc.script, d / "relay1.json")
    try:
        cfg = config(d, relay.port, timeouts=sc.timeouts)
        for sender, rcpts in ((ONE, [B]), (THREE, [A, B, C])):
            res.ids[sender] = enqueue(cfg, rcpts, sender=sender)
        for q in spooled(spool):
            res.message_ids[q.sender] = message_id(q.body)
            res.bodies[q.sender] = q.body
        res.started = time.time()
        res.log1 = run_once(cfg)
        res.finished = time.time()
    finally:
        res.relay1 = relay.stop()
    res.queue1 = queue_list(cfg)
    res.bounces1 = bounces(spool)
    if not spooled(spool):
        return  # all delivered, nothing left that could be sent again
    # the second pass: everything due again (failed messages too), a relay without faults
    states = [m["state"] for m in res.queue1]
    out = [queue_cmd(cfg, "retry", "--all")] if "deferred" in states else []
    out += [queue_cmd(cfg, "retry", m["id"]) for m in res.queue1 if m["state"] == "failed"]
    for r in out:
        assert r.returncode == 0, r.stderr
    with GoodRelay() as good:
        cfg = config(d, good.port)
        res.log2 = run_once(cfg)
        good.wait_idle()
        res.relay2 = good.messages
        res.relay2_commands = good.log()["commands"]
    res.left2 = spooled(spool)


@pytest.fixture(scope="module")
def matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[Scenario, Result]:
    """Run the scenarios of every selected matrix case, in parallel, once per module."""
    wanted = dict.fromkeys(
        item.callspec.params["case"].scenario
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and getattr(item, "originalname", "") == "test_matrix"
    )
    root = tmp_path_factory.mktemp("matrix")
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda sc: run_scenario(sc, root), wanted))
    return {r.scenario: r for r in results}


@pytest.mark.timeout(400)  # the first case waits for the whole matrix
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matrix(case: Case, matrix: dict[Scenario, Result]) -> None:
    res = matrix[case.scenario]
    if res.error:
        pytest.fail(f"running the scenario failed:\n{res.error}")
    exp = expect(case)
    qid, me = res.ids[case.sender], case.sender
    where = f"\n--- daemon log, first pass:\n{res.log1}"

    # 1. what the faulty relay saw of this message
    commands = by_sender(res.relay1["commands"]).get(me, [])
    seen = rcpt_commands(commands)
    assert {r: seen.count(r) for r in case.rcpts} == exp.rcpt_seen, (commands, where)
    assert ("DATA" in verbs(commands)) == exp.data_sent, (commands, where)
    if case.stage in ("banner", "helo") and case.outcome != "2xx":
        assert "MAIL" not in verbs([c for conn in res.relay1["commands"] for c in conn])
        assert res.relay1["connections"] == 1, "connect_tries = 1: one session, then give up"
    if case.outcome in ("4xx", "5xx") and case.stage in ("mail", "rcpt") and not exp.delivered:
        # a transaction without an accepted recipient (or refused at MAIL) is reset, never sent
        assert "RSET" in verbs(commands), commands
    msgs = [m for m in res.relay1["messages"] if m["sender"] == me]
    assert len(msgs) == (1 if exp.body_received else 0), msgs
    accepted = [r for m in msgs if (m["reply"] or "").startswith("250") for r in m["recipients"]]
    assert sorted(accepted) == sorted(exp.delivered), (msgs, where)
    for m in msgs:
        assert m["data"].encode("latin-1") == normalise(res.bodies[me]), "the message, byte for byte"
        assert message_id(m["data"]) == res.message_ids[me]
    warned = [ln for ln in res.log1.splitlines() if qid in ln and "may be delivered twice" in ln]
    assert bool(warned) == exp.twice_warning, where

    # 2. the queue afterwards
    mine = {m["id"]: m for m in res.queue1}.get(qid)
    if exp.state is None:
        assert mine is None, mine
    else:
        assert mine is not None, res.queue1
        assert mine["state"] == exp.state, (mine, where)
        assert mine["attempts"] == exp.attempts, mine
        assert (mine["sender"], mine["recipients"]) == (me, case.rcpts)
        states = {r: "delivered" for r in exp.delivered}
        states.update({r: "failed" for r in exp.failed})
        states.update({r: "pending" for r in exp.pending})
        assert mine["recipient_states"] == states, (mine, where)
        if exp.last_error is None:
            assert mine["last_error"] is None, mine
        else:
            assert exp.last_error in (mine["last_error"] or ""), mine
            if case.outcome in ("drop", "stall") or (case.stage, case.outcome) == ("data", "2xx"):
                assert f"stage {case.stage}" in mine["last_error"], mine
        if exp.state == "deferred":
            # min_backoff for the first retry, plus at most a quarter of jitter, never less
            nxt = iso(mine["next_attempt"])
            assert res.started + MIN_BACKOFF - 1 <= nxt <= res.finished + MIN_BACKOFF * 1.25 + 1, mine
        else:
            assert mine["next_attempt"] is None, mine
    others = [m for m in res.queue1 if m["id"] not in res.ids.values()]
    assert all(m["sender"] == "" for m in others), others  # nothing but bounces

    # 3. the bounce: one report for the failed recipients, from <> to the sender
    reports = [b for b in res.bounces1 if b.recipients == [me]]
    if exp.failed:
        assert len(reports) == 1, res.bounces1
        assert reports[0].directory == "outgoing"
        assert exp.reply is not None
        dsn = parse_dsn(reports[0].body)
        check_failure_report(dsn, dict.fromkeys(exp.failed, exp.reply), res.message_ids[me], me)
    else:
        assert reports == [], reports

    # 4. the second pass: exactly the recipients not yet delivered, never a delivered one again
    originals = [m for m in res.relay2 if m["sender"] == me]
    got = [r for m in originals for r in m["recipients"]]
    assert not set(got) & set(exp.delivered), f"delivered twice: {set(got) & set(exp.delivered)}"
    assert sorted(got) == sorted(exp.pending + exp.failed), (res.relay2_commands, res.log2)
    tried = rcpt_commands(by_sender(res.relay2_commands).get(me, []))
    assert not set(tried) & set(exp.delivered), tried
    for m in originals:
        assert m["reply"].startswith("250")
        assert m["data"] == normalise(res.bodies[me]), "the message, byte for byte"
        assert message_id(m["data"]) == res.message_ids[me]  # fixed at enqueue: the same on every attempt
    reports2 = [m for m in res.relay2 if m["sender"] == "" and m["recipients"] == [me]]
    assert len(reports2) == (1 if exp.failed else 0), reports2
    for m in reports2:
        assert parse_dsn(m["data"]).recipients.keys() == set(exp.failed)
    assert res.left2 == [], res.left2  # everything delivered: the spool is empty


def test_matrix_covers_every_stage_and_outcome() -> None:
    lockstep = [c for c in CASES if not c.pipelined]
    assert {(c.stage, c.outcome, c.n) for c in lockstep} == {
        (s, o, n) for s in STAGES for o in OUTCOMES for n in (1, 3)
    }
    assert len({c.id for c in CASES}) == len(CASES) == 72
    assert len(SCENARIOS) == 36


# -- more per-recipient cases -------------------------------------------------------------------------


@pytest.fixture
def relay() -> Any:
    srv = GoodRelay()
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
def test_no_accepted_recipient_no_data(tmp_path: Path, relay: GoodRelay, pipelined: bool) -> None:
    script: dict[str, Any] = {
        "rcpt": {
            "when": {f"<{A}>": "550 5.1.1 no a", f"<{B}>": "451 4.2.0 later b", f"<{C}>": "553 5.1.3 bad c"}
        }
    }
    if not pipelined:
        script["ehlo"] = LOCKSTEP_EHLO
    relay.script = script
    cfg = config(tmp_path, relay.port)
    qid = enqueue(cfg, [A, B, C])
    run_once(cfg)
    relay.wait_idle()
    if pipelined:  # DATA went out with the RCPTs; the relay refused it (503), no body followed
        assert relay.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "RSET", "QUIT"]
    else:
        assert relay.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "RSET", "QUIT"]
    assert relay.messages == []
    (m,) = [m for m in queue_list(cfg) if m["id"] == qid]
    assert m["state"] == "deferred"
    assert m["recipient_states"] == {A: "failed", B: "pending", C: "failed"}
    assert m["last_error"] is not None
    (b,) = bounces(tmp_path / "spool")
    dsn = parse_dsn(b.body)
    check_failure_report(dsn, {A: "550 5.1.1 no a", C: "553 5.1.3 bad c"}, None)


def test_rcpt_failure_then_message_deferral(tmp_path: Path, relay: GoodRelay) -> None:
    """b fails at RCPT; the reply after the dot (451) then applies to a and c only."""
    relay.script = {"rcpt": {"when": {f"<{B}>": "550 5.1.1 no b"}}, "message": "451 4.3.0 later"}
    cfg = config(tmp_path, relay.port)
    qid = enqueue(cfg, [A, B, C])
    run_once(cfg)
    relay.wait_idle()
    (sent,) = relay.messages
    assert sent["recipients"] == [A, C]
    (m,) = [m for m in queue_list(cfg) if m["id"] == qid]
    assert (m["state"], m["attempts"]) == ("deferred", 1)
    assert m["recipient_states"] == {A: "pending", B: "failed", C: "pending"}
    (b,) = bounces(tmp_path / "spool")
    check_failure_report(parse_dsn(b.body), {B: "550 5.1.1 no b"}, None)

    relay.script = {}
    assert queue_cmd(cfg, "retry", qid).returncode == 0
    run_once(cfg)
    relay.wait_idle()
    originals = [x for x in relay.messages if x["sender"] == SENDER]
    assert [x["recipients"] for x in originals] == [[A, C], [A, C]]
    assert originals[1]["reply"].startswith("250")
    assert [x["recipients"] for x in relay.messages if x["sender"] == ""] == [[SENDER]]
    assert rcpt_commands(relay.commands()).count(B) == 1  # a failed recipient is not tried again
    # a and c are delivered now; the message stays in failed/ for b, who is not reported twice
    (left,) = spooled(tmp_path / "spool")
    assert left.directory == "failed"
    (m,) = queue_list(cfg)
    assert (m["id"], m["state"]) == (qid, "failed")
    assert m["recipient_states"] == {A: "delivered", B: "failed", C: "delivered"}


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
def test_452_sends_the_rest_in_a_second_transaction(
    tmp_path: Path, relay: GoodRelay, pipelined: bool
) -> None:
    """A relay that takes one recipient per transaction: 452 to the rest, then a new transaction."""
    if pipelined:  # every RCPT of the first transaction is answered at once: 452 to b and c
        relay.script = {
            "rcpt": ["250 2.1.5 ok", "452 4.5.3 too many recipients", "452 4.5.3 too many recipients"]
        }
    else:  # c is not even tried after b's 452
        relay.script = {"rcpt": ["250 2.1.5 ok", "452 4.5.3 too many recipients"], "ehlo": LOCKSTEP_EHLO}
    cfg = config(tmp_path, relay.port)
    enqueue(cfg, [A, B, C])
    log = run_once(cfg)
    relay.wait_idle()
    assert relay.connections == 1, "the same connection"
    assert [m["recipients"] for m in relay.messages] == [[A], [B, C]]
    assert all(m["reply"].startswith("250") for m in relay.messages)
    transactions = " ".join(relay.verbs()).split("MAIL")
    assert len(transactions) == 3  # EHLO, then two transactions
    assert "RSET" not in relay.verbs() and relay.verbs()[-1] == "QUIT"
    assert message_id(relay.messages[0]["data"]) == message_id(relay.messages[1]["data"])
    assert spooled(tmp_path / "spool") == [], log
    assert "status=deferred" not in log
    assert log.count("status=sent") == 3


def test_452_with_a_relay_that_accepts_the_rest(tmp_path: Path, relay: GoodRelay) -> None:
    """Pipelined: b gets 452 but c is accepted in the same batch; b alone follows."""
    relay.script = {"rcpt": ["250 2.1.5 ok", "452 4.5.3 too many recipients"]}
    cfg = config(tmp_path, relay.port)
    enqueue(cfg, [A, B, C])
    run_once(cfg)
    relay.wait_idle()
    assert relay.connections == 1
    assert [m["recipients"] for m in relay.messages] == [[A, C], [B]]
    assert spooled(tmp_path / "spool") == []


def test_message_id_is_the_same_on_every_attempt(tmp_path: Path, relay: GoodRelay) -> None:
    """The message has no Message-ID: the one enqueue adds is sent on every retry."""
    relay.script = {"message": "451 4.3.0 later"}
    cfg = config(tmp_path, relay.port)
    qid = enqueue(cfg, [A], b"Subject: no id\n\nbody\n")
    (queued,) = spooled(tmp_path / "spool")
    mid = message_id(queued.body)
    assert mid and qid in mid
    for _ in range(2):
        run_once(cfg)
        relay.wait_idle()
        assert queue_cmd(cfg, "retry", "--all").returncode == 0
    relay.script = {}
    run_once(cfg)
    relay.wait_idle()
    assert [m["reply"][:3] for m in relay.messages] == ["451", "451", "250"]
    assert {message_id(m["data"]) for m in relay.messages} == {mid}
    assert spooled(tmp_path / "spool") == []


# -- the retry schedule --------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_is_never_early(tmp_path: Path, relay: GoodRelay) -> None:
    """min_backoff 100, max_backoff 250: retries after 100, 200, 250 s, each plus at most a quarter."""
    relay.script = {"rcpt": "451 4.2.0 later"}
    cfg = config(tmp_path, relay.port, retry={"min_backoff": 100, "max_backoff": 250})
    qid = enqueue(cfg, [A])
    for attempt, base in ((1, 100), (2, 200), (3, 250)):
        before = time.time()
        run_once(cfg)
        after = time.time()
        relay.wait_idle()
        (m,) = queue_list(cfg)
        assert (m["id"], m["state"], m["attempts"]) == (qid, "deferred", attempt)
        nxt = iso(m["next_attempt"])
        assert before + base - 1 <= nxt <= after + base * 1.25 + 1, (attempt, nxt - before)
        if attempt == 1:
            # not due yet: another pass sends nothing, however good the relay
            relay.script = {}
            sessions = relay.connections
            run_once(cfg)
            relay.wait_idle()
            assert relay.connections == sessions
            (m,) = queue_list(cfg)
            assert (m["attempts"], m["state"], m["next_attempt"]) == (1, "deferred", m["next_attempt"])
            relay.script = {"rcpt": "451 4.2.0 later"}
        r = queue_cmd(cfg, "retry", "--all")
        assert r.returncode == 0 and b"1 message due now" in r.stdout, r
    assert rcpt_commands(relay.commands()) == [A] * 3


def test_unreachable_relay_defers_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, support.free_port(), delivery={"connect_tries": 2})
    qid = enqueue(cfg, [A, B])
    log = run_once(cfg)
    (m,) = queue_list(cfg)
    assert (m["id"], m["state"], m["attempts"], m["next_attempt"]) == (qid, "queued", 0, None)
    assert m["recipient_states"] == {A: "pending", B: "pending"}
    assert bounces(tmp_path / "spool") == []
    assert "refused" in log


# -- expiry --------------------------------------------------------------------------------------------


def age(spool: Path, qid: str, seconds: float) -> None:
    """Make a queued message ``seconds`` old (its enqueue time is the file's mtime)."""
    (path,) = [spool / "outgoing" / n for n in os.listdir(spool / "outgoing") if n.split(",")[0] == qid]
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_expiry_fails_the_remaining_recipients_and_is_counted(tmp_path: Path, relay: GoodRelay) -> None:
    """A running daemon: a accepted, b and c deferred on a message older than max_lifetime.

    b and c fail at once, greenmail_messages_expired_total counts it, and the bounce
    is then delivered by the daemon like any other message.
    """
    relay.script = {"rcpt": {"when": {f"<{B}>": "451 4.2.0 b later", f"<{C}>": "450 4.2.1 c busy"}}}
    mport = support.free_port()
    cfg = config(
        tmp_path,
        relay.port,
        retry={"max_lifetime": 10},
        delivery={"check_interval": 1},
        metrics={"listen": f"127.0.0.1:{mport}"},
    )
    spool = tmp_path / "spool"
    qid = enqueue(cfg, [A, B, C])
    age(spool, qid, 100)
    daemon = support.daemon(cfg, tmp_path / "daemon.log")
    try:
        support.wait_until(
            lambda: [m for m in relay.messages if m["sender"] == ""], 10, what="the bounce to be delivered"
        )
        support.wait_until(lambda: metric(mport, "greenmail_messages_expired_total") == 1.0, 10, 0.1)
        assert metric(mport, "greenmail_bounces_total") == 1.0
        (m,) = queue_list(cfg)
        assert (m["id"], m["state"]) == (qid, "failed")
        assert m["recipient_states"] == {A: "delivered", B: "failed", C: "failed"}
        assert "expired" in m["last_error"]
        report = [x for x in relay.messages if x["sender"] == ""]
        assert len(report) == 1 and report[0]["recipients"] == [SENDER]
        dsn = parse_dsn(report[0]["data"])
        assert set(dsn.recipients) == {B, C}
        for g in dsn.recipients.values():
            assert g["Action"] == "failed"
            assert g["Status"].startswith(("4.", "5."))
            assert "expired" in g["Diagnostic-Code"]
        originals = [x for x in relay.messages if x["sender"] == SENDER]
        assert [x["recipients"] for x in originals] == [[A]]
        assert rcpt_commands(relay.commands()).count(B) == 1
    finally:
        daemon.stop()
    assert "expired" in daemon.text()


def test_expiry_after_run_once(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"mail": "451 4.3.0 later"}
    cfg = config(tmp_path, relay.port, retry={"max_lifetime": 1})
    spool = tmp_path / "spool"
    qid = enqueue(cfg, [A, B])
    age(spool, qid, 5)
    run_once(cfg)
    relay.wait_idle()
    (m,) = [m for m in queue_list(cfg) if m["id"] == qid]
    assert m["state"] == "failed"
    assert m["recipient_states"] == {A: "failed", B: "failed"}
    (b,) = bounces(spool)
    assert set(parse_dsn(b.body).recipients) == {A, B}


def test_young_message_does_not_expire(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"mail": "451 4.3.0 later"}
    cfg = config(tmp_path, relay.port, retry={"max_lifetime": 3600})
    qid = enqueue(cfg, [A])
    age(tmp_path / "spool", qid, 600)
    run_once(cfg)
    (m,) = queue_list(cfg)
    assert (m["state"], m["recipient_states"]) == ("deferred", {A: "pending"})
    assert bounces(tmp_path / "spool") == []


# -- bounces -------------------------------------------------------------------------------------------


def test_null_sender_is_never_bounced(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"rcpt": "550 5.1.1 no such user"}
    cfg = config(tmp_path, relay.port)
    spool = tmp_path / "spool"
    qid = enqueue(cfg, [A, B], sender="<>")
    log = run_once(cfg)
    relay.wait_idle()
    left = spooled(spool)
    assert [(s.directory, s.name.split(",")[0]) for s in left] == [("failed", qid)], left
    (m,) = queue_list(cfg)
    assert (m["state"], m["sender"]) == ("failed", "")
    assert "MAIL FROM:<>" in relay.commands()
    assert "null sender" in log
    # retried and failing again: still nothing new
    assert queue_cmd(cfg, "retry", qid).returncode == 0
    run_once(cfg)
    relay.wait_idle()
    assert [s.directory for s in spooled(spool)] == ["failed"]


def test_no_bounce_when_disabled(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"rcpt": {"when": {f"<{B}>": "550 5.1.1 no such user"}}}
    cfg = config(tmp_path, relay.port, retry={"bounce": False})
    qid = enqueue(cfg, [A, B])
    run_once(cfg)
    relay.wait_idle()
    left = spooled(tmp_path / "spool")
    assert [(s.directory, s.sender) for s in left] == [("failed", SENDER)], left
    (m,) = queue_list(cfg)
    assert (m["id"], m["recipient_states"]) == (qid, {A: "delivered", B: "failed"})


def test_bounce_of_an_8bit_message(tmp_path: Path, relay: GoodRelay) -> None:
    """A raw UTF-8 Subject (common from scripts) must not keep the bounce, and the message, in limbo."""
    relay.script = {"rcpt": {"when": {f"<{B}>": "550 5.1.1 no such user"}}}
    cfg = config(tmp_path, relay.port)
    spool = tmp_path / "spool"
    body = "From: sender@example.org\nSubject: Grüße aus Köln\n\nbody\n".encode()
    qid = enqueue(cfg, [A, B], body)
    log = run_once(cfg)
    relay.wait_idle()
    (m,) = [m for m in queue_list(cfg) if m["id"] == qid]
    assert m["state"] == "failed", (m, log)
    assert m["recipient_states"] == {A: "delivered", B: "failed"}
    (b,) = bounces(spool)
    dsn = parse_dsn(b.body)
    assert set(dsn.recipients) == {B}
    assert "Grüße" in dsn.original_headers


def test_delay_warning_is_sent_once(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"rcpt": {"when": {f"<{A}>": "451 4.2.0 still busy"}}}
    cfg = config(tmp_path, relay.port, retry={"delay_warning": 60})
    spool = tmp_path / "spool"
    qid = enqueue(cfg, [A])
    age(spool, qid, 120)
    run_once(cfg)
    relay.wait_idle()
    (b,) = bounces(spool)
    assert b.recipients == [SENDER]
    dsn = parse_dsn(b.body)
    (g,) = dsn.recipients.values()
    assert dsn.recipients.keys() == {A}
    assert g["Action"] == "delayed"
    assert g["Status"] == "4.2.0"
    assert g["Diagnostic-Code"] == "smtp; 451 4.2.0 still busy"
    (m,) = [m for m in queue_list(cfg) if m["id"] == qid]
    assert m["state"] == "deferred"

    # two more attempts, still deferred: the warning is delivered, and not repeated
    for _ in range(2):
        assert queue_cmd(cfg, "retry", "--all").returncode == 0
        run_once(cfg)
        relay.wait_idle()
    reports = [x for x in relay.messages if x["sender"] == ""]
    assert len(reports) == 1 and reports[0]["recipients"] == [SENDER]
    assert parse_dsn(reports[0]["data"]).recipients[A]["Action"] == "delayed"
    assert bounces(spool) == []
    (m,) = queue_list(cfg)
    assert (m["id"], m["state"], m["attempts"]) == (qid, "deferred", 3)


def test_no_delay_warning_before_its_age(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"rcpt": "451 4.2.0 later"}
    cfg = config(tmp_path, relay.port, retry={"delay_warning": 3600})
    enqueue(cfg, [A])
    run_once(cfg)
    assert bounces(tmp_path / "spool") == []


def test_no_delay_warning_when_bounces_are_off(tmp_path: Path, relay: GoodRelay) -> None:
    relay.script = {"rcpt": "451 4.2.0 later"}
    cfg = config(tmp_path, relay.port, retry={"delay_warning": 1, "bounce": False})
    qid = enqueue(cfg, [A])
    age(tmp_path / "spool", qid, 100)
    run_once(cfg)
    assert bounces(tmp_path / "spool") == []
