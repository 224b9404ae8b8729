"""The in-memory queue backend (tests/memqueue.py) keeps the rules the session and scheduler tests rely on."""

from __future__ import annotations

import threading
from pathlib import Path

import gevent
import session_harness
from faultserver import FaultServer
from memqueue import MemClaim, MemQueue

from greenmail import wire

SMALL = b"Subject: small\r\n\r\nhello\r\n"
BIG = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100  # over the 32 KiB read with the envelope


def test_enqueued_mail_is_due_only_once_indexed() -> None:
    q = MemQueue()
    q.enqueue("s@example.org", ["r@example.net"], SMALL)
    assert q.due() == 0  # as with the spool: refresh() or a wake-up of watch() indexes it
    assert q.refresh() == 1
    claim = q.take()
    assert claim is not None and q.take() is None and q.gauges()[0]["active"] == 1


def test_watch_indexes_new_mail_and_passes_pokes_on() -> None:
    q = MemQueue()
    woken: list[int] = []
    poked: list[int] = []
    g = gevent.spawn(q.watch, lambda: woken.append(q.due()), lambda: poked.append(1))
    try:
        q.enqueue("s@example.org", ["r@example.net"], SMALL)
        gevent.sleep(0.05)
        assert woken == [1]
        q.wake()
        gevent.sleep(0.05)
        assert poked == [1] and woken == [1]
    finally:
        q.stopping = True
        g.join(1)
    assert g.dead


def test_small_bodies_are_read_on_the_hub_and_big_ones_in_the_threadpool(tmp_path: Path) -> None:
    """Both of the session's body paths run: in_memory claims read here, the others offloaded."""
    with FaultServer() as server:
        h = session_harness.Harness(tmp_path, server.port, backend="memory")
        claims: list[MemClaim] = []
        take = h.queue.take

        def recording_take() -> MemClaim | None:
            claim = take()
            if claim is not None:
                claims.append(claim)
            return claim

        h.queue.take = recording_take
        h.enqueue(body=SMALL)
        h.enqueue(body=BIG)
        h.run()
        assert [m["data"] for m in server.messages] == [wire.normalise(SMALL), wire.normalise(BIG)]
    small, big = claims
    assert small.in_memory and not big.in_memory
    assert small.opened == [threading.get_ident()]
    assert len(big.opened) == 1 and big.opened[0] != threading.get_ident()
