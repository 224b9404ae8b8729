"""Several delivery processes: the split of the queue and the configuration, and /metrics merged.

The processes themselves (start, restart, stop) are tested end to end in
tests/e2e/test_processes.py.
"""

from __future__ import annotations

import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
from gevent import subprocess
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from greenmail import confcheck, config, logfmt, queuefile
from greenmail.errors import ConfigError
from greenmail.metrics import Metrics
from greenmail.workers import Reports, Supervisor, parse_worker, share_config


def test_share_is_crc32_of_the_id_and_spreads_the_queue() -> None:
    ids = [queuefile.new_id() for _ in range(4000)]
    assert all(queuefile.share(q, 1) == 0 for q in ids)
    assert all(queuefile.share(q, 3) == zlib.crc32(q.encode()) % 3 for q in ids)
    counts = Counter(queuefile.share(q, 2) for q in ids)
    assert set(counts) == {0, 1} and min(counts.values()) > 1800  # about half each


@pytest.mark.parametrize(
    ("name", "qid"),
    [("ABC", "ABC"), ("ABC,2,1700000000", "ABC"), ("ABC@host.1.x", "ABC"), ("ABC,1,5@host.1.x", "ABC")],
)
def test_name_id(name: str, qid: str) -> None:
    assert queuefile.name_id(name) == qid


@pytest.mark.parametrize(("text", "worker"), [("0/1", (0, 1)), ("1/2", (1, 2)), ("3/4", (3, 4))])
def test_parse_worker(text: str, worker: tuple[int, int]) -> None:
    assert parse_worker(text) == worker


@pytest.mark.parametrize("text", ["", "1", "2/2", "-1/2", "a/b", "1/0"])
def test_parse_worker_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--worker"):
        parse_worker(text)


def cfg(**delivery: object) -> config.Config:
    raw = {"delivery": delivery, "relay": {"rate_limit": 9}}
    return config.from_dict(raw, base=Path("/tmp"))


@pytest.mark.parametrize(("total", "n"), [(10, 2), (7, 3), (3, 3), (100, 7)])
def test_share_config_splits_connections_and_rate(total: int, n: int) -> None:
    c = cfg(max_connections=total, processes=n)
    shares = [share_config(c, (k, n)) for k in range(n)]
    assert sum(s.delivery.max_connections for s in shares) == total
    assert all(s.delivery.max_connections >= 1 for s in shares)
    assert sum(s.relay.rate_limit for s in shares) == pytest.approx(9)
    assert share_config(c, (0, 1)) is c


def test_processes_defaults_to_one_and_may_not_exceed_max_connections() -> None:
    assert cfg().delivery.processes == 1
    assert cfg(processes=4, max_connections=4).delivery.processes == 4
    with pytest.raises(
        ConfigError, match=r"delivery.processes: must not exceed delivery.max_connections \(3\)"
    ):
        cfg(processes=4, max_connections=3)
    with pytest.raises(
        ConfigError, match=r"delivery.processes: must not exceed delivery.max_connections \(10\)"
    ):
        cfg(processes=11)
    for bad in (0, confcheck.MAX_PROCESSES + 1, "2", 1.5):
        with pytest.raises(ConfigError, match="delivery.processes"):
            cfg(processes=bad, max_connections=100)


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def busy_metrics(delivered: int, oldest: float, active: int) -> Metrics:
    m = Metrics(max_connections=10)
    m.count("attempt", "delivered", delivered)
    for _ in range(delivered):
        m.reply("rcpt", 250)
    m.observe("delay", 0.3)
    m.active = active
    m.queue_gauges = lambda: ({"queued": 1}, oldest)
    return m


def merged(parent: Metrics) -> Reports:
    reports = Reports()
    parent.others = reports.snapshots
    return reports


def test_merged_metrics_sum_counters_histograms_and_gauges_and_keep_the_earliest() -> None:
    parent, child = busy_metrics(5, 2000.0, 1), busy_metrics(7, 1000.0, 2)
    child.reply("rcpt", 499)  # a reply only the child has seen
    child.max_connections = 5  # a child's share: not shown
    merged(parent).children[1] = child.snapshot()
    got = samples(parent.render())
    assert got[("greenmail_delivery_attempts_total", (("result", "delivered"),))] == 12
    assert got[("greenmail_smtp_replies_total", (("code", "250"), ("stage", "rcpt")))] == 12
    assert got[("greenmail_smtp_replies_total", (("code", "499"), ("stage", "rcpt")))] == 1
    assert got[("greenmail_delivery_delay_seconds_count", ())] == 2
    assert got[("greenmail_delivery_delay_seconds_bucket", (("le", "0.5"),))] == 2
    assert got[("greenmail_connections_active", ())] == 3
    assert got[("greenmail_connections_max", ())] == 10
    assert got[("greenmail_spool_messages", (("state", "queued"),))] == 2
    assert got[("greenmail_spool_oldest_message_timestamp_seconds", ())] == 1000.0
    assert got[("greenmail_build_info", (("version", parent_version()),))] == 1


def parent_version() -> str:
    from greenmail import __version__

    return __version__


def test_an_idle_child_does_not_make_the_oldest_message_zero() -> None:
    parent, child = busy_metrics(0, 2000.0, 0), busy_metrics(0, 0.0, 0)
    merged(parent).children[1] = child.snapshot()
    assert samples(parent.render())[("greenmail_spool_oldest_message_timestamp_seconds", ())] == 2000.0


def test_a_dead_childs_counters_stay_and_its_gauges_go() -> None:
    parent = busy_metrics(1, 0.0, 0)
    reports = merged(parent)
    reports.children[1] = busy_metrics(4, 0.0, 3).snapshot()
    reports.retire(1)
    reports.children[1] = busy_metrics(2, 0.0, 1).snapshot()  # the new child starts from 0
    got = samples(parent.render())
    assert got[("greenmail_delivery_attempts_total", (("result", "delivered"),))] == 7
    assert got[("greenmail_connections_active", ())] == 1
    assert got[("greenmail_delivery_delay_seconds_count", ())] == 3


def test_merged_output_is_the_plain_registry_without_children() -> None:
    parent = busy_metrics(3, 5.0, 1)
    before = generate_latest(parent.registry)
    merged(parent)
    assert samples(parent.render()).keys() == samples(before).keys()


def test_a_snapshot_goes_through_json() -> None:
    import json

    child = busy_metrics(2, 10.0, 1)
    child.reply("data", None)
    assert json.loads(json.dumps(child.snapshot())) == child.snapshot()


def test_log_pieces_fit_a_pipe_write_and_keep_every_line() -> None:
    lines = [f"line {i} " + "x" * (i * 37 % 900) for i in range(300)] + ["é" * 3000, "y" * 5000]
    pieces = list(logfmt._pieces(lines, 4096))
    assert "".join(pieces) == "\n".join(lines) + "\n"
    for piece in pieces:
        assert piece.endswith("\n")
        assert len(piece.encode()) <= 4096 or piece.count("\n") == 1  # only a single long line is longer


def test_a_child_that_cannot_start_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sup = Supervisor(2, [], Reports(), once=False, grace=1)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    status = sup._run_child(1)
    assert isinstance(status, str) and status.startswith("not started:")
    assert sup.missing() == [1]


def test_missing_lists_the_children_not_running() -> None:
    sup = Supervisor(3, [], Reports(), once=False, grace=1)
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        assert sup.missing() == [1, 2]
        sup.procs = {1: running, 2: ended}
        assert sup.missing() == [2]
    finally:
        running.kill()
        running.wait()
