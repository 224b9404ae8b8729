"""Running greenmail's Session in-process against tests/faultserver.py (session tests).

The harness runs on one of two queue backends: "spool" (the maildir spool,
greenmail/spoolqueue.py) or "memory" (tests/memqueue.py). Its views of the
queue (``where``, ``names``, ``state``, ``others``, ``envelopes``) speak in
the spool's directory names for both, so a test's assertions hold on each.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gevent
from memqueue import MemQueue

from greenmail.config import from_dict
from greenmail.connection import Transport
from greenmail.daemon import offload, shielded
from greenmail.metrics import Metrics
from greenmail.outbox import Outbox
from greenmail.queuefile import Entry, State, parse_name
from greenmail.session import Session
from greenmail.shaping import RateLimiter, Throttle
from greenmail.spool import Spool
from greenmail.spoolqueue import SpoolQueue

BACKENDS = ("spool", "memory")
BACKEND = "spool"  # the backend a Harness gets when none is given (the session tests' fixture sets it)
MEMORY: dict[Path, MemQueue] = {}  # memory queues by spool path: harnesses on one path share one
PLACES = {"outgoing": "outgoing", "active": "outgoing_active", "failed": "failed"}  # memory -> spool names

MIN_BACKOFF = 300
TIMEOUTS = ("connect", "banner", "command", "data_init", "data_block", "data_end")
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
BODY = b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <m@test>\r\nSubject: hi\r\n\r\nhello\r\n"


def gwait(predicate, timeout: float = 10.0, what: str = ""):  # noqa: ANN001, ANN201
    """support.wait_until for gevent: poll with gevent.sleep so greenlets keep running."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        gevent.sleep(0.01)
    return value


class Harness:
    """One spool, outbox and transport in this process; sessions run against a fault server."""

    timeout = 0.5  # every SMTP timeout, seconds

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        throttle: Throttle | None = None,
        limiter: RateLimiter | None = None,
        password: str | None = None,
        backend: str | None = None,
        **overrides: dict,
    ) -> None:
        self.backend = backend or BACKEND
        raw = {
            "spool": {"path": "spool"},
            "relay": {"host": "127.0.0.1", "port": port, "helo": "client.test"},
            "retry": {"min_backoff": MIN_BACKOFF, "max_backoff": 4000},
            "timeouts": {
                k: self.timeout
                for k in ("connect", "banner", "command", "data_init", "data_block", "data_end")
            },
            "metrics": {"listen": ""},
        }
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        if "hosts" in raw["relay"]:
            del raw["relay"]["host"], raw["relay"]["port"]
        if password is not None:
            (tmp_path / "password").write_text(password + "\n")
            (tmp_path / "password").chmod(0o600)
            raw["relay"]["password_file"] = "password"
        self.cfg = from_dict(raw, base=tmp_path)
        self.metrics = Metrics()
        self.spool: Spool | MemQueue  # the admin side: enqueue, retry, write_state, read_state
        self.queue: SpoolQueue | MemQueue
        if self.backend == "spool":
            self.spool = Spool(self.cfg.spool.path)
            self.spool.ensure()
            self.queue = SpoolQueue(self.spool, offload)
        else:
            self.spool = self.queue = MEMORY.setdefault(self.cfg.spool.path, MemQueue())
        self.metrics.queue_gauges = self.queue.gauges
        self.outbox = Outbox(self.queue, self.cfg.retry, self.metrics, shield=shielded, offload=offload)
        self.transport = Transport.build(
            self.cfg.relay, self.cfg.timeouts, self.metrics, "client.test", throttle
        )
        self.limiter = limiter
        self.greeted: list[bool] = []

    def enqueue(self, *rcpts: str, sender: str = SENDER, body: bytes = BODY) -> str:
        return self.spool.enqueue(sender, list(rcpts or (RCPT,)), body)

    def session(self) -> gevent.Greenlet:
        self.queue.refresh()
        s = Session(
            self.transport,
            self.outbox,
            on_greeted=lambda ok, why=None: self.greeted.append(ok),
            limiter=self.limiter,
            offload=offload,
        )
        return gevent.spawn(s.run)

    def run(self, timeout: float = 10.0) -> float:
        """One session to its end; returns how long it took. Every claim must be settled."""
        started = time.monotonic()
        g = self.session()
        g.join(timeout)
        assert g.dead, f"session still running after {timeout}s"
        g.get()  # re-raise whatever killed it
        self.assert_settled()
        return time.monotonic() - started

    def assert_settled(self) -> None:
        assert self.names("outgoing_active") == []

    def names(self, sub: str) -> list[str]:
        """The names in spool directory ``sub`` (meta/: ID.json), or what they would be in memory."""
        if isinstance(self.spool, Spool):
            return sorted(n for n in os.listdir(self.spool.dir(sub)) if not n.startswith("."))
        records = self.spool.records.values()
        if sub == "meta":
            return sorted(f"{r.id}.json" for r in records if r.state is not None)
        return sorted(r.name for r in records if PLACES[r.place] == sub)

    def where(self, qid: str) -> tuple[str, Entry] | None:
        """(directory, entry) of a message; None once it is gone (delivered)."""
        if isinstance(self.spool, MemQueue):
            r = self.spool.records.get(qid)
            return None if r is None else (PLACES[r.place], Entry(r.name, r.id, r.attempts, r.next_at))
        for sub in ("outgoing", "outgoing_active", "failed", "corrupt"):
            for name in self.names(sub):
                e = parse_name(name.split("@")[0])
                if e is not None and e.id == qid:
                    return sub, e
        return None

    def others(self, *qids: str) -> list[str]:
        """Queue ids in outgoing/ and failed/ other than ``qids`` (bounces)."""
        return [parse_name(n).id for s in ("outgoing", "failed") for n in self.names(s)
                if parse_name(n).id not in qids]  # fmt: skip

    def envelopes(self, sub: str) -> list[tuple[str, str, str]]:
        """(id, sender line, recipients line) of each message in outgoing/ or failed/."""
        out = []
        for name in self.names(sub):
            qid = parse_name(name).id
            if isinstance(self.spool, MemQueue):
                r = self.spool.records[qid]
                out.append((qid, r.sender, ",".join(r.recipients)))
                continue
            with open(self.spool.dir(sub) / name, "rb") as f:
                out.append((qid, f.readline().strip().decode(), f.readline().strip().decode()))
        return out

    def backdate(self, qid: str, when: float) -> None:
        """Make a waiting message look enqueued at ``when`` (the spool: its file's mtime)."""
        if isinstance(self.spool, MemQueue):
            self.spool.backdate(qid, when)
        else:
            os.utime(self.spool.dir("outgoing") / qid, (when, when))

    def state(self, qid: str) -> State:
        return self.spool.read_state(qid)

    def m(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(f"greenmail_{name}", labels) or 0.0
