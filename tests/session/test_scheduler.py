"""greenmail.scheduler.Scheduler with real sessions against the scripted fault server, on each queue backend.

The relay holds a stage's reply back behind a gate (a threading.Event of the
server's threads) so that the sessions the scheduler opened can be counted
while they wait; the scheduler's own loop, wake-ups and retries run as
greenlets in this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from faultserver import FaultServer
from session_harness import Harness as BaseHarness
from session_harness import gwait
from support import free_port

from greenmail import scheduler as scheduler_module
from greenmail.daemon import offload
from greenmail.scheduler import Scheduler
from greenmail.session import Session

HOLD = 10.0  # seconds a session may wait for a gated reply


class Harness(BaseHarness):
    """One command at a time (no message's MAIL sent ahead behind a dot); long waits for gated replies."""

    def __init__(self, tmp_path: Path, port: int, **overrides: dict) -> None:
        relay = {"pipelining": False, **overrides.pop("relay", {})}
        timeouts = {"banner": HOLD, "data_end": HOLD, **overrides.pop("timeouts", {})}
        super().__init__(tmp_path, port, relay=relay, timeouts=timeouts, **overrides)


class GatedServer(FaultServer):
    """A fault server whose reply at ``stage`` waits until ``gate`` is set."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage
        self.gate = threading.Event()
        self.waiting = 0  # connections waiting at the gate now
        self._count = threading.Lock()

    def action(self, stage: str, occurrence: int, line: str) -> Any:
        if stage == self.stage and not self.gate.is_set():
            with self._count:
                self.waiting += 1
            self.gate.wait(HOLD)
            with self._count:
                self.waiting -= 1
        return super().action(stage, occurrence, line)


class Run:
    """A Scheduler over the harness's queue and outbox, its sessions real Session objects."""

    def __init__(self, h: Harness, reconnect: bool = True) -> None:
        self.h = h
        self.starts: list[float] = []  # when each session started (monotonic)
        self.s = Scheduler(h.cfg, h.queue, h.outbox, h.metrics, self._new_session, reconnect=reconnect)
        self.greenlets: list[gevent.Greenlet] = []

    def _new_session(self, on_greeted: Any) -> Any:
        self.starts.append(time.monotonic())
        return Session(self.h.transport, self.h.outbox, on_greeted, self.h.limiter, offload).run

    def spawn(self, fn: Any) -> None:
        self.greenlets.append(gevent.spawn(fn))

    def end(self) -> None:
        self.s.stop()
        self.s.pool.join(HOLD)
        self.s.pool.kill()
        gevent.killall(self.greenlets, timeout=5)
        self.h.queue.close()


@pytest.fixture
def gated(request: pytest.FixtureRequest) -> Iterator[GatedServer]:
    srv = GatedServer(request.param)
    srv.start()
    try:
        yield srv
    finally:
        srv.gate.set()
        srv.stop()


def delivered(h: Harness) -> float:
    return h.m("delivery_attempts_total", result="delivered")


# -- how many sessions ---------------------------------------------------------------------


@pytest.mark.parametrize("gated", ["message"], indirect=True)
def test_opens_at_most_max_connections(tmp_path: Path, gated: GatedServer) -> None:
    h = Harness(tmp_path, gated.port, delivery={"max_connections": 3})
    ids = [h.enqueue(f"r{i}@example.net") for i in range(8)]
    run = Run(h)
    try:
        run.s.check()
        gwait(lambda: gated.waiting == 3, what="three sessions at the final dot")
        gevent.sleep(0.2)  # time for a fourth, were one opened
        assert run.s.active == 3
        assert gated.connections == 3
        assert len(run.starts) == 3
        gated.gate.set()
        gwait(lambda: delivered(h) == 8 and run.s.active == 0, what="all eight delivered")
    finally:
        run.end()
    assert gated.connections == 3
    assert gated.max_concurrent == 3
    assert all(h.where(q) is None for q in ids)


@pytest.mark.parametrize("gated", ["message"], indirect=True)
def test_opens_min_of_due_and_free_sessions(tmp_path: Path, gated: GatedServer) -> None:
    """Two due messages and five free connections: the probe takes one, one more session the other."""
    h = Harness(tmp_path, gated.port, delivery={"max_connections": 5})
    h.enqueue("a@example.net")
    h.enqueue("b@example.net")
    run = Run(h)
    try:
        run.s.check()
        gwait(lambda: gated.waiting == 2, what="two sessions at the final dot")
        gevent.sleep(0.2)
        assert run.s.active == 2
        assert gated.connections == 2
        gated.gate.set()
        gwait(lambda: delivered(h) == 2 and run.s.active == 0, what="both delivered")
    finally:
        run.end()
    assert gated.connections == 2


@pytest.mark.parametrize("gated", ["banner"], indirect=True)
def test_one_probe_session_until_the_relay_greeted(tmp_path: Path, gated: GatedServer) -> None:
    h = Harness(tmp_path, gated.port, delivery={"max_connections": 4})
    for i in range(6):
        h.enqueue(f"r{i}@example.net")
    run = Run(h)
    try:
        run.s.check()
        gwait(lambda: gated.waiting == 1, what="the probe waiting for the banner")
        gevent.sleep(0.3)  # while the relay has not greeted, nothing more is opened
        assert run.s.active == 1
        assert gated.connections == 1
        run.s.check()  # a check or a wake-up meanwhile opens no second probe
        run.s.fill()
        gevent.sleep(0.1)
        assert gated.connections == 1
        gated.gate.set()
        gwait(lambda: delivered(h) == 6 and run.s.active == 0, what="all six delivered")
    finally:
        run.end()
    assert gated.connections == 4  # the probe, then min(5 due, 3 free) more


# -- an unreachable relay --------------------------------------------------------------------


def bursts(starts: list[float], gap: float = 0.3) -> list[list[float]]:
    """Session start times grouped into bursts (starts closer than ``gap`` to the previous one)."""
    out: list[list[float]] = []
    for t in starts:
        if out and t - out[-1][-1] < gap:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def test_reconnect_backoff_doubles_from_one_second_up_to_the_check_interval(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: every connect is refused
    h = Harness(tmp_path, port, delivery={"check_interval": 1.5, "connect_tries": 3})
    qid = h.enqueue()
    run = Run(h)
    h.queue.open()  # this "daemon" is live on the spool: its outage is listed
    try:
        run.s.check()  # one check only (the periodic loop does not run): the retries are the scheduler's
        refused = lambda: h.m("connection_attempts_total", result="refused")  # noqa: E731
        gwait(lambda: len(run.starts) == 9 and refused() == 9, timeout=5, what="three bursts of connects")
        first, second, third = (b[0] for b in bursts(run.starts))
        assert [len(b) for b in bursts(run.starts)] == [3, 3, 3]  # connect_tries each
        # each wait starts after the burst's last failure: never shorter, a little longer
        assert 0.98 <= second - first <= 1.45, run.starts  # RECONNECT_FIRST
        assert 1.48 <= third - second <= 1.95, run.starts  # doubled to 2 s, capped at check_interval
        assert run.s.outage is not None and "refused" in run.s.outage[1]
        assert h.m("connection_attempts_total", result="refused") == 9
        # told to the queue, so that `queue list` can say why mail waits
        told = [h.queue.outage] if h.backend == "memory" else h.spool.relay_outages()
        assert [o[1] for o in told] == [run.s.outage[1]]
        srv = FaultServer()
        srv.start(port)  # the relay comes back on the same port
        try:
            gwait(lambda: h.where(qid) is None, timeout=4, what="delivery once the relay is back")
            assert run.s.outage is None
            assert run.s._retry_delay == scheduler_module.RECONNECT_FIRST
        finally:
            srv.stop()
    finally:
        run.end()


def test_connect_tries_failures_open_nothing_more_in_the_check(tmp_path: Path) -> None:
    h = Harness(tmp_path, free_port(), delivery={"check_interval": 60, "connect_tries": 2})
    for i in range(3):
        h.enqueue(f"r{i}@example.net")
    run = Run(h, reconnect=False)  # as with --once: no retry after the check's connects failed
    try:
        run.s.check()
        gwait(run.s.idle, timeout=3, what="the check to give up")
        gevent.sleep(0.2)
        assert len(run.starts) == 2
        assert run.s.fill() == 0
        assert run.s._retry is None
    finally:
        run.end()


# -- stopping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", ["message"], indirect=True)
def test_stop_lets_transactions_in_flight_finish(tmp_path: Path, gated: GatedServer) -> None:
    h = Harness(tmp_path, gated.port, delivery={"max_connections": 2})
    ids = [h.enqueue(f"r{i}@example.net") for i in range(5)]
    run = Run(h)
    try:
        run.s.check()
        gwait(lambda: gated.waiting == 2, what="two sessions at the final dot")
        run.s.stop()
        assert h.queue.stopping
        gated.gate.set()
        gwait(lambda: run.s.active == 0, what="the sessions to end")
    finally:
        run.end()
    assert delivered(h) == 2  # the two transactions in flight completed
    assert gated.connections == 2
    assert gated.verbs(0)[-1] == "QUIT" and gated.verbs(1)[-1] == "QUIT"
    left = [q for q in ids if h.where(q) is not None]
    assert len(left) == 3
    assert all(h.where(q)[0] == "outgoing" and h.where(q)[1].attempts == 0 for q in left)
    assert run.s.fill() == 0


# -- wake-ups ----------------------------------------------------------------------------------


def test_new_mail_is_sent_at_once(tmp_path: Path, server: FaultServer) -> None:
    hh = Harness(tmp_path, server.port, delivery={"check_interval": 60})
    run = Run(hh)
    hh.queue.open()
    try:
        run.spawn(run.s.run)
        run.spawn(run.s.watch)
        gwait(lambda: run.s.last_check, what="the first check")
        assert run.starts == []  # nothing to send
        started = time.monotonic()
        qid = hh.enqueue()
        gwait(lambda: hh.where(qid) is None, timeout=3, what="delivery after the wake-up")
        assert time.monotonic() - started < 2  # well before the next periodic check
    finally:
        run.end()
    assert len(run.starts) == 1


def test_poke_forgets_failed_connects_and_delivers_at_once(tmp_path: Path) -> None:
    port = free_port()
    h = Harness(tmp_path, port, delivery={"check_interval": 60, "connect_tries": 2})
    qid = h.enqueue()
    run = Run(h, reconnect=False)  # without the poke nothing would try again for 60 s
    h.queue.open()
    try:
        run.spawn(run.s.run)
        run.spawn(run.s.watch)
        gwait(lambda: run.s.last_check and run.s.idle(), timeout=3, what="the check to give up")
        assert len(run.starts) == 2
        srv = FaultServer()
        srv.start(port)
        try:
            gevent.sleep(0.3)
            assert h.where(qid) is not None  # the relay is back, but nobody tries
            started = time.monotonic()
            h.spool.wake()  # `queue retry` / `sendmail -q`
            gwait(lambda: h.where(qid) is None, timeout=3, what="delivery after the poke")
            assert time.monotonic() - started < 2
        finally:
            srv.stop()
    finally:
        run.end()
    assert len(run.starts) == 3
