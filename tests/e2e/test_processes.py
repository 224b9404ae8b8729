"""End-to-end: ``[delivery] processes = N`` splits delivery over N processes.

The started ``greenmail run`` is worker 0 and the supervisor; it starts N-1 children
(``greenmail run ... --worker K/N``). Each process sends the messages whose queue id falls
in its share (``zlib.crc32(queue_id) % N``), max_connections is the total, /metrics is
served by the parent with every process's counters summed. These tests run the real
thing against an aiosmtpd relay and read "delivered", "lost" and "twice" off the
Message-IDs the relay stored, as test_crash.py does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promtool_support as pt
import pytest
import support
from aiosmtpd_server import Relay, drop_many, queued, read_queue_file, start_daemon, start_relay

MAX_CONNECTIONS = 4
BULK = 300

# greenmail/smtp[PID]: QUEUEID: to=<...>, relay=..., ... status=sent (...)
SENT = re.compile(r"greenmail/smtp\[(\d+)\]: (\S+): to=<[^>]*>, relay=\S+, .*status=sent \(")


# -- processes, read from /proc ------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then ppid), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet has exited: not alive)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def worker_arg(args: list[str]) -> str | None:
    """The value of ``--worker`` (``K/N``) in a command line, or None."""
    for i, a in enumerate(args):
        if a == "--worker" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--worker="):
            return a.partition("=")[2]
    return None


def workers(parent: int) -> dict[int, str]:
    """The living direct children of ``parent`` started as ``--worker K/N``: pid -> "K/N".

    The daemon has other children too (``rm`` for batches of delivered files), hence the filter.
    """
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fields = stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X") or int(fields[1]) != parent:
            continue
        arg = worker_arg(cmdline(pid))
        if arg is not None:
            found[pid] = arg
    return found


def one_worker(daemon: support.Process, timeout: float = 10) -> tuple[int, str]:
    """The single child worker of a processes = 2 daemon, once it has logged its start."""

    def found() -> tuple[int, str] | None:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}: {daemon.text()}")
        w = workers(daemon.proc.pid)
        assert len(w) <= 1, f"more than one child worker for processes = 2: {w}"
        return next(iter(w.items())) if w else None

    pid, arg = support.wait_until(found, timeout, what="the child worker")
    assert arg == "1/2", f"the child of a processes = 2 daemon runs as --worker {arg}"
    start_line = f"greenmail/master[{pid}]: greenmail started"
    support.wait_until(lambda: start_line in daemon.text(), timeout, what="the child's start line")
    return pid, arg


def stop_all(daemon: support.Process, extra: tuple[int, ...] = ()) -> int | None:
    """Stop the daemon; then SIGKILL any of its workers (or ``extra`` pids) still running."""
    pids = set(extra) | set(workers(daemon.proc.pid) if daemon.proc.poll() is None else ())
    rc = daemon.stop()
    for pid in pids:
        if alive(pid) and worker_arg(cmdline(pid)) is not None:
            os.kill(pid, signal.SIGKILL)
    return rc


# -- the spool and the log ------------------------------------------------------------------


def owner_pid(claim_name: str) -> int:
    """The pid in a claim's owner part: NAME@HOST.PID.RANDOM."""
    owner = claim_name.rpartition("@")[2]
    return int(owner.rsplit(".", 2)[1])


def claims_of(spool: Path, pid: int) -> list[str]:
    return [c for c in support.spool_files(spool, "outgoing_active") if owner_pid(c) == pid]


def spool_empty(spool: Path) -> bool:
    return not support.spool_files(spool, "outgoing") and not support.spool_files(spool, "outgoing_active")


def sent_by_pid(log: str) -> dict[int, list[str]]:
    """The queue ids of the "status=sent" lines, by the pid that wrote them."""
    out: dict[int, list[str]] = defaultdict(list)
    for line in log.splitlines():
        m = SENT.search(line)
        if m:
            out[int(m.group(1))].append(m.group(2))
    return dict(out)


def sent_count(log: str) -> int:
    return sum(len(v) for v in sent_by_pid(log).values())


def config_for(tmp: Path, relay: Relay, processes: int = 2, **sections: dict) -> Path:
    delivery = {"max_connections": MAX_CONNECTIONS, "processes": processes}
    delivery.update(sections.pop("delivery", {}))
    return support.write_config(tmp, relay.port, delivery=delivery, **sections)


def assert_delivered_once(relay: Relay, mids: set[str]) -> None:
    got = Counter(relay.message_ids())
    assert [m for m, n in got.items() if n > 1] == [], "delivered twice"
    assert set(got) == mids, (f"lost: {sorted(mids - set(got))[:10]}", f"foreign: {set(got) - mids}")


# -- (1), (2): 300 messages over two processes, and /metrics ----------------------------------


@dataclass
class Pair:
    tmp: Path
    relay: Relay
    daemon: support.Process
    child: int
    metrics_port: int
    mids: set[str]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("processes")
    relay = start_relay(tmp)
    daemon = None
    try:
        mport = support.free_port()
        config = config_for(tmp, relay, metrics={"listen": f"127.0.0.1:{mport}"})
        mids = drop_many(tmp / "spool", BULK, "split")
        daemon = start_daemon(config, tmp / "daemon.log", metrics_port=mport)
        child, _ = one_worker(daemon)
        support.wait_until(lambda: relay.count() >= BULK, 20, what=f"{BULK} messages at the relay")
        support.wait_until(lambda: spool_empty(tmp / "spool"), 5, what="an empty spool")
        support.wait_until(lambda: sent_count(daemon.text()) >= BULK, 5, what=f"{BULK} delivery lines")
        yield Pair(tmp, relay, daemon, child, mport, mids)
    finally:
        if daemon is not None:
            stop_all(daemon)
        relay.stop()


def test_two_processes_share_the_work_and_send_each_message_once(pair: Pair) -> None:
    assert_delivered_once(pair.relay, pair.mids)
    assert support.spool_files(pair.tmp / "spool", "failed") == []
    assert pair.relay.stats()["max_active"] <= MAX_CONNECTIONS, "max_connections is the total"

    log = pair.daemon.text()
    by_pid = sent_by_pid(log)
    parent = pair.daemon.proc.pid
    assert set(by_pid) == {parent, pair.child}, (by_pid.keys(), parent, pair.child)
    assert all(by_pid.values()), "one process did all the work"
    qids = [q for v in by_pid.values() for q in v]
    assert len(qids) == BULK and len(set(qids)) == BULK, "a queue id was sent by both processes"
    # worker K sends exactly the queue ids with crc32 % N == K
    assert {zlib.crc32(q.encode()) % 2 for q in by_pid[parent]} == {0}
    assert {zlib.crc32(q.encode()) % 2 for q in by_pid[pair.child]} == {1}


def test_metrics_are_summed_over_the_processes(pair: Pair) -> None:
    delivered = ("greenmail_delivery_attempts_total", frozenset({("result", "delivered")}))
    last: list[float | None] = [None]

    def settled() -> pt.Samples | None:
        s = pt.parse(pt.metrics_text(pair.metrics_port))
        last[0] = s.get(delivered)
        return s if last[0] == BULK else None

    try:
        samples = support.wait_until(settled, 5, interval=0.2, what=f"delivered == {BULK} on /metrics")
    except AssertionError:
        raise AssertionError(f'attempts_total{{result="delivered"}} stayed {last[0]}, not {BULK}') from None
    assert samples[("greenmail_recipients_total", frozenset({("result", "delivered")}))] == BULK
    assert samples[("greenmail_delivery_attempts_total", frozenset({("result", "deferred")}))] == 0
    assert samples[("greenmail_delivery_delay_seconds_count", frozenset())] == BULK  # histograms too
    assert samples[("greenmail_connections_max", frozenset())] == MAX_CONNECTIONS


# -- (3) graceful stop ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_parent_stops_every_process(tmp_path: Path, sig: signal.Signals) -> None:
    relay = start_relay(tmp_path, delay_data=0.3)
    spool = tmp_path / "spool"
    daemon = None
    child = None
    try:
        config = config_for(tmp_path, relay)
        mids = drop_many(spool, 40, "stop")
        daemon = start_daemon(config, tmp_path / "daemon.log")
        child, _ = one_worker(daemon)
        parent = daemon.proc.pid
        # both processes are in the middle of transactions
        support.wait_until(lambda: claims_of(spool, child) and claims_of(spool, parent), 10, what="claims")
        daemon.signal(sig)
        rc = daemon.wait(20)
        child_alive_at_parent_exit = alive(child)
        assert rc == 0, daemon.text()
        assert not child_alive_at_parent_exit, "the parent exited before its child"
        # graceful: transactions finished or went back untouched, nothing left claimed, nothing lost
        assert support.spool_files(spool, "outgoing_active") == []
        got = Counter(relay.message_ids())
        assert [m for m, n in got.items() if n > 1] == []
        left = {q.message_id for q in queued(spool).values()}
        assert set(got) | left == mids and not set(got) & left
        assert relay.count() < 40, "everything was delivered before the signal: the test proves nothing"
    finally:
        if daemon is not None:
            stop_all(daemon, (child,) if child else ())
        relay.stop()


# -- (4) a child killed -----------------------------------------------------------------------


def test_a_killed_child_is_replaced_and_nothing_is_lost(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=0.05)
    spool = tmp_path / "spool"
    daemon = None
    pids: tuple[int, ...] = ()
    try:
        mport = support.free_port()
        config = config_for(tmp_path, relay, metrics={"listen": f"127.0.0.1:{mport}"})
        mids = drop_many(spool, 200, "kill")
        daemon = start_daemon(config, tmp_path / "daemon.log")
        parent = daemon.proc.pid
        child, arg = one_worker(daemon)
        pids = (child,)
        support.wait_until(
            lambda: relay.count() >= 40 and claims_of(spool, child), 20, what="the child mid-delivery"
        )
        os.kill(child, signal.SIGKILL)
        support.wait_until(lambda: not alive(child), 5, what="the child to die")
        healthz = f"http://127.0.0.1:{mport}/healthz"
        status, why = support.wait_until(
            lambda: (r := pt.http_get(healthz))[0] == 503 and r, 1, interval=0.02, what="/healthz 503"
        )
        assert b"delivery process 1/2 not running" in why, why
        # the dead child's claims, before its successor returns them: the messages in flight
        claims = claims_of(spool, child)
        assert claims, "nothing was in flight at the kill: recovery is not tested"
        in_flight = set()  # the dead child's claims (the parent's move on meanwhile: not read)
        for name in claims:
            with contextlib.suppress(FileNotFoundError):
                in_flight.add(read_queue_file(spool / "outgoing_active" / name).message_id)
        assert relay.count() < 200, "everything was delivered before the kill: the test proves nothing"

        def successor() -> int | None:
            assert daemon.proc.poll() is None, f"the parent exited: {daemon.text()}"
            w = {p: a for p, a in workers(parent).items() if p != child}
            return next(iter(w)) if w else None

        new = support.wait_until(successor, 3, what="a new child within ~2 s")
        pids = (child, new)
        assert workers(parent) == {new: arg}, "the new child does the dead one's share"
        support.wait_until(lambda: pt.http_get(healthz)[0] == 200, 5, interval=0.05, what="/healthz 200")

        support.wait_until(lambda: set(relay.message_ids()) >= mids, 30, what="all 200 at the relay")
        support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
        got = Counter(relay.message_ids())
        assert set(got) == mids  # none lost, nothing foreign
        twice = {m for m, n in got.items() if n > 1}
        assert all(got[m] == 2 for m in twice), twice
        assert twice <= in_flight, ("only a message in flight at the kill may arrive twice", twice, in_flight)
        assert support.spool_files(spool, "failed") == []

        support.wait_until(lambda: sent_by_pid(daemon.text()).get(new), 5, what="the new child's deliveries")
        log = daemon.text()
        assert re.search(rf"greenmail/master\[{parent}\]: (error|fatal): ", log), "the parent logged no error"
        returned = re.search(rf"greenmail/master\[{new}\]: .* (\d+) claims of dead daemons returned", log)
        assert returned, "the new child did not return the dead child's claims"
        assert int(returned.group(1)) == len(claims), (returned.group(0), claims)
        assert stop_all(daemon, pids) == 0, daemon.text()
        assert not alive(new)
    finally:
        if daemon is not None:
            stop_all(daemon, pids)
        relay.stop()


# -- (5) the parent killed --------------------------------------------------------------------


def test_children_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    daemon = None
    child = None
    try:
        config = config_for(tmp_path, relay)
        daemon = start_daemon(config, tmp_path / "daemon.log")
        child, _ = one_worker(daemon)
        daemon.proc.kill()
        assert daemon.wait(5) == -signal.SIGKILL
        assert alive(child), "the child died with the parent: the test proves nothing"
        support.wait_until(lambda: not alive(child), 10, interval=0.05, what="the orphaned child to exit")
        log = daemon.text()
        assert re.search(rf"greenmail/master\[{child}\]: warning: the supervising process is gone", log), log
        assert re.search(rf"greenmail/master\[{child}\]: greenmail stopped", log), log  # a clean exit
        assert "Traceback" not in log, log
    finally:
        if daemon is not None:
            stop_all(daemon, (child,) if child else ())
        relay.stop()


# -- (6) --once -------------------------------------------------------------------------------


def test_once_with_two_processes_delivers_everything(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    spool = tmp_path / "spool"
    try:
        config = config_for(tmp_path, relay)
        mids = drop_many(spool, 100, "once")
        r = support.greenmail("run", "--once", config=config, timeout=30)
        err = r.stderr.decode(errors="replace")
        assert r.returncode == 0, err
        assert_delivered_once(relay, mids)
        assert spool_empty(spool)
        by_pid = sent_by_pid(err)
        assert len(by_pid) == 2 and all(by_pid.values()), {p: len(q) for p, q in by_pid.items()}
        assert sum(len(q) for q in by_pid.values()) == 100
        assert not [p for p in by_pid if alive(p)], "a process still runs after the parent exited"
    finally:
        relay.stop()


# -- (7) configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processes", "max_connections"),
    [(5, 4), (0, 4), (65, 100), ("2", 4)],
    ids=["more-than-max_connections", "zero", "over-64", "a-string"],
)
def test_a_bad_processes_value_is_a_configuration_error(
    tmp_path: Path, processes: int | str, max_connections: int
) -> None:
    config = support.write_config(
        tmp_path, support.free_port(), delivery={"processes": processes, "max_connections": max_connections}
    )
    r = support.greenmail("run", "--once", config=config, timeout=30)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 78, err
    assert "configuration error" in err and "delivery.processes" in err, err


def test_processes_equal_to_max_connections_is_accepted(tmp_path: Path) -> None:
    """The control for the test above: the key is known and its upper bound is inclusive."""
    relay = start_relay(tmp_path)
    try:
        config = config_for(tmp_path, relay, delivery={"max_connections": 2})
        r = support.greenmail("run", "--once", config=config, timeout=30)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    finally:
        relay.stop()
