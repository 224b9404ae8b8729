"""Several delivery processes on one spool (``delivery.processes``): both halves of the link.

One gevent hub uses one CPU. With ``processes = N`` the daemon started by
the operator is delivery process 0 and the supervisor of N-1 children
(``greenmail run --worker K/N``), each with its own hub, owner lock and
sessions. The queue is split by queue id (queuefile.share), so no two
processes race for the same file; ``max_connections`` and ``rate_limit``
are split between them.

Owns: each process's share of the configuration; starting, watching and
restarting the children, passing on a stop, waiting for them; the link's
two pipes: a child's stdin (EOF: the supervisor is gone, stop) and its
stdout (a snapshot of its metrics, one JSON line a second and one at
exit), which the supervisor's /metrics adds to its own (metrics.combine).
Must not touch: delivery, the spool's files, SMTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from typing import Any

import gevent
from gevent import subprocess
from gevent.os import make_nonblocking, nb_read, nb_write

from greenmail.config import Config
from greenmail.metrics import Metrics, Snapshot, combine, retired

log = logging.getLogger("greenmail.workers")
REPORT_INTERVAL = 1.0  # seconds between a child's metric snapshots
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after a child dies: the wait before each new start
STOP_MARGIN = 15.0  # seconds a child gets beyond shutdown_grace before it is killed


def parse_worker(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N."""
    k, _, n = text.partition("/")
    try:
        worker = int(k), int(n)
    except ValueError:
        raise ValueError(f"--worker: expected K/N, got {text!r}") from None
    if not 0 <= worker[0] < worker[1]:
        raise ValueError(f"--worker: expected 0 <= K < N, got {text!r}")
    return worker


def share_config(cfg: Config, worker: tuple[int, int]) -> Config:
    """The configuration as process K of N runs it: its part of the connections and the rate."""
    k, n = worker
    if n == 1:
        return cfg
    total = cfg.delivery.max_connections
    conns = total // n + (k < total % n)
    shared = cfg.queue.backend == "postgresql"  # the shared queue's limiter counts for the cluster
    rate = cfg.relay.rate_limit if shared else cfg.relay.rate_limit / n
    return dataclasses.replace(
        cfg,
        delivery=dataclasses.replace(cfg.delivery, max_connections=conns),
        relay=dataclasses.replace(cfg.relay, rate_limit=rate),
    )


class Reports:
    """The other delivery processes' last snapshots, as process 0's /metrics adds them in.

    When a child ends, its counts are kept (``retire``), so the sums never go
    back; its gauges go with it.
    """

    def __init__(self) -> None:
        self.children: dict[int, Snapshot] = {}
        self._retired: Snapshot = {}

    def retire(self, k: int) -> None:
        snap = self.children.pop(k, None)
        if snap is not None:
            self._retired = combine([self._retired, retired(snap)])

    def snapshots(self) -> list[Snapshot]:
        return [*self.children.values(), self._retired]


# -- the child's half ------------------------------------------------------------------


class Link:
    """A child's end: report metrics on stdout, stop when stdin closes (the supervisor is gone)."""

    def __init__(self, metrics: Metrics, stop: Any) -> None:
        self.metrics = metrics
        self.stop = stop  # called once the supervisor is gone
        make_nonblocking(0)
        make_nonblocking(1)

    def watch_parent(self) -> None:
        while nb_read(0, 4096):
            pass
        log.warning("the supervising process is gone: stopping")
        self.stop()

    def report_forever(self) -> None:
        while True:
            self.report()
            gevent.sleep(REPORT_INTERVAL)

    def last_report(self) -> None:
        """The final counts, at exit (nobody may be listening any more)."""
        try:
            self.report()
        except OSError as e:
            log.info("last metrics report not sent: %s", e)

    def report(self) -> None:
        data = memoryview(json.dumps(self.metrics.snapshot()).encode() + b"\n")
        while data:
            data = data[nb_write(1, data) :]


# -- the supervisor's half -------------------------------------------------------------


class Supervisor:
    """Starts children 1..N-1, restarts one that dies (unless stopping or --once), stops them all."""

    def __init__(self, n: int, args: list[str], metrics: Reports, once: bool, grace: float) -> None:
        self.n = n
        self.args = args  # greenmail run's options, passed on to every child
        self.metrics = metrics
        self.once = once
        self.grace = grace
        self.stopping = False
        self.failed = False  # a child ended with a non-zero status in --once mode
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._watchers: list[gevent.Greenlet] = []

    def start(self) -> None:
        for k in range(1, self.n):
            self._watchers.append(gevent.spawn(self._keep, k))

    def _spawn(self, k: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "greenmail", "run", *self.args, "--worker", f"{k}/{self.n}"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        log.info("delivery process %d/%d started: pid %d", k, self.n, proc.pid)
        return proc

    def _keep(self, k: int) -> None:
        """Run child k; when it dies while the daemon runs, start a new one after a pause."""
        restarts = 0
        while not self.stopping:
            code = self._run_child(k)
            if self.once and not self.stopping:
                self.failed |= code != 0
                return
            if self.stopping:
                return
            delay = RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)]
            log.error("delivery process %d/%d ended (status %s); a new one in %gs", k, self.n, code, delay)
            restarts += 1
            gevent.sleep(delay)

    def _run_child(self, k: int) -> int | str:
        """Start child k and follow it to its end: its exit status, or why it did not start."""
        try:
            proc = self.procs[k] = self._spawn(k)
        except OSError as e:
            return f"not started: {e}"
        if self.stopping:  # stop() came while it was starting
            _signal(proc, signal.SIGTERM)
        try:
            self._read_reports(k, proc)
            return proc.wait()
        finally:
            self.metrics.retire(k)

    def missing(self) -> list[int]:
        """The children not running now (between a death and the restart)."""
        return [k for k in range(1, self.n) if k not in self.procs or self.procs[k].poll() is not None]

    def _read_reports(self, k: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                self.metrics.children[k] = json.loads(line)
            except ValueError:
                log.warning("delivery process %d: unreadable metrics report ignored", k)

    def wait(self, interrupt: Any) -> None:
        """--once: wait until every child's pass has ended, or ``interrupt`` (an Event) is set."""
        while not interrupt.is_set():
            alive = [g for g in self._watchers if not g.dead]
            if not alive:
                return
            gevent.wait([interrupt, *alive], count=1)

    def stop(self) -> None:
        """Ask every child to stop (SIGTERM); ``join`` waits for them."""
        self.stopping = True
        for proc in self.procs.values():
            _signal(proc, signal.SIGTERM)

    def join(self) -> None:
        """Wait for the children to end: SIGKILL after shutdown_grace + STOP_MARGIN."""
        self.stopping = True
        deadline = time.monotonic() + self.grace + STOP_MARGIN
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("delivery process pid %d did not stop in time: killing it", proc.pid)
                _signal(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        gevent.joinall(self._watchers, timeout=10)
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal a child unless it is known to be gone (gevent may have reaped it a moment ago)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
