"""The spool queue settles a delivered message at once and unlinks it in the background, in batches."""

from __future__ import annotations

import os
from pathlib import Path

import gevent

from greenmail.config import RetryConfig
from greenmail.daemon import offload, shielded
from greenmail.layout import ACTIVE, OUTGOING, TMP
from greenmail.metrics import Metrics
from greenmail.outbox import Outbox
from greenmail.spool import Spool
from greenmail.spoolqueue import SpoolQueue

MESSAGE = b"Subject: s\n\nbody\n"


def test_delivered_messages_leave_the_queue_at_once_and_are_unlinked_in_one_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", owner="me")
    spool.ensure()
    spool.enqueue_many([("a@b.example", ["c@d.example"], MESSAGE)] * 20)
    queue = SpoolQueue(spool, offload)
    outbox = Outbox(queue, RetryConfig(), Metrics(), shield=shielded, offload=offload)
    assert queue.refresh() == 20
    purges: list[int] = []
    real_purge = spool.purge

    def counting_purge(paths: list[str]) -> None:
        purges.append(len(paths))
        real_purge(paths)

    spool.purge = counting_purge  # type: ignore[method-assign]
    while (claim := outbox.take()) is not None:
        claim.state.recipients["c@d.example"] = "delivered"
        assert outbox.finish(claim) == "delivered"
        assert os.listdir(spool.dir(ACTIVE)) == []  # retired before finish returns
    assert len(os.listdir(spool.dir(TMP))) == 20  # not unlinked yet: no greenlet switch so far
    queue.flush()
    assert os.listdir(spool.dir(TMP)) == []
    assert os.listdir(spool.dir(OUTGOING)) == []
    assert purges == [20]  # one batch, one directory fsync, for all of them


def test_flush_waits_for_a_batch_in_progress(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", owner="me")
    spool.ensure()
    spool.enqueue_many([("a@b.example", ["c@d.example"], MESSAGE)] * 3)
    queue = SpoolQueue(spool, offload)
    outbox = Outbox(queue, RetryConfig(), Metrics(), shield=shielded, offload=offload)
    queue.refresh()
    for _ in range(2):
        claim = outbox.take()
        assert claim is not None
        claim.state.recipients["c@d.example"] = "delivered"
        outbox.finish(claim)
    gevent.sleep(0.001)  # the background batch is started
    claim = outbox.take()
    assert claim is not None
    claim.state.recipients["c@d.example"] = "delivered"
    outbox.finish(claim)  # retired while the first batch may be in flight
    queue.flush()
    assert os.listdir(spool.dir(TMP)) == []
