"""Scans of outgoing/ do not overlap, and a full scan keeps what arrived while it ran.

Two overlapping scans both adopted foreign names, and a full scan ending last dropped
what the other had indexed: the messages then waited ~10 s for the next forced look.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gevent

from greenmail.daemon import offload
from greenmail.layout import OUTGOING
from greenmail.spool import Spool
from greenmail.spoolqueue import SpoolQueue

MESSAGE = b"Subject: s\n\nbody\n"


def foreign(spool: Spool, n: int) -> None:
    """n files dropped into outgoing/ under names of the writer's own (the contract allows it)."""
    spool.enqueue_many([("a@b.example", ["c@d.example"], MESSAGE)] * n)
    for i, name in enumerate(sorted(os.listdir(spool.dir(OUTGOING)))):  # renamed as another program would
        os.rename(spool.dir(OUTGOING) / name, spool.dir(OUTGOING) / f"bulk-{i:04d}")


class Tracking:
    """An offload that counts the scans running at once, each held long enough to overlap."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.running = self.most = 0

    def __call__(self, fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(fn, "__func__", None) is not Spool.scan:
            return offload(fn, args, kwargs)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            gevent.sleep(0.02)  # the other greenlet gets its turn while this scan is "running"
            return offload(fn, args, kwargs)
        finally:
            self.running -= 1


def test_a_full_scan_and_a_wakeup_scan_never_overlap_and_every_adopted_file_is_indexed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", owner="me")
    spool.ensure()
    foreign(spool, 20)
    tracking = Tracking(spool)
    queue = SpoolQueue(spool, tracking)
    gevent.joinall([gevent.spawn(queue.refresh), gevent.spawn(queue.wakeup), gevent.spawn(queue.refresh)])
    assert tracking.most == 1
    names = os.listdir(spool.dir(OUTGOING))
    assert len(names) == 20 and not any(n.startswith("bulk-") for n in names), names
    assert queue.due() == 20
    taken = [c.id for c in iter(queue.take, None)]
    assert len(taken) == len(set(taken)) == 20


def test_a_name_reported_while_a_full_scan_runs_is_not_dropped_by_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", owner="me")
    spool.ensure()
    spool.enqueue_many([("a@b.example", ["c@d.example"], MESSAGE)] * 3)
    queue = SpoolQueue(spool, offload)
    late: list[str] = []

    def scan_then_arrival(fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        result = offload(fn, args, kwargs)
        if getattr(fn, "__func__", None) is Spool.scan and not late:
            before = set(os.listdir(spool.dir(OUTGOING)))
            spool.enqueue("x@b.example", ["y@d.example"], MESSAGE)  # after the listing
            late.extend(set(os.listdir(spool.dir(OUTGOING))) - before)
            queue.arrived(late)  # what the inotify watch does, while the scan is "in flight"
        return result

    queue.offload = scan_then_arrival
    assert queue.refresh() == 4
    assert len(late) == 1
    assert late[0] in {c.entry.name for c in iter(queue.take, None)}
