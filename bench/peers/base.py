"""What every peer row is: the run's context (port, results and per-measurement directories,
what a resumed run already has) and the ``Peer`` interface the workloads drive."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.base import WORK, BenchError, log
from bench.results import cell


class Ctx:
    """One run's settings and its current per-measurement directory (``rundir``)."""

    def __init__(self, port: int, out: Path, timeout: float, gm_fill: str) -> None:
        self.port, self.out, self.timeout, self.gm_fill = port, out, timeout, gm_fill
        self.rundir = WORK / "runs"
        self.done: set[tuple[str, ...]] = set()  # measurements a resumed run already has

    def already(self, *key: object) -> bool:
        if tuple(cell(k) for k in key) in self.done:
            log(f"   (already measured: {' '.join(map(str, key))})")
            return True
        return False

    def new_rundir(self, name: str) -> Path:
        d = WORK / "runs" / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        self.rundir = d
        return d


class Peer:
    """A row. Drain peers: prepare -> fill (queue held) -> drain; live peers
    (latency, big message) run as an idle daemon and take one message at a time."""

    name = "?"
    per_conns = False  # one row per max_connections value, else its own concurrency
    native = "-"  # the concurrency label when not per_conns
    queueless = False  # drains straight from the message file (smtp-source)
    fill_how = "-"

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def conns_label(self, conns: int) -> str:
        return str(conns) if self.per_conns else self.native

    def prepare(self, n: int, conns: int) -> None: ...

    def fill(self, n: int, par: int = 4) -> dict[str, Any]:
        return {}

    def queued(self) -> int:
        return 0

    def drained(self) -> bool:
        return True

    def before_drain(self) -> None:
        """Called once the queue is full and checked, before the sink starts (Postfix lifts its hold)."""

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        raise NotImplementedError

    def stop(self) -> None: ...

    # live daemon
    def live_start(self, port: int) -> None:
        raise BenchError(f"{self.name} has no live mode")

    def submit(self, data: bytes | Path) -> None:
        raise NotImplementedError
