"""greenmail on the shared queue in PostgreSQL: one node, or several nodes (separate ``greenmail
run`` processes on one queue, ``max_connections`` split between them), against a private,
durable PostgreSQL server (tests/pgserver.py, loaded by its path; fsync on) that lives for the
whole run. The server is a service (bench.procs.SERVICES): not the peer's CPU, which ``db_cpu``
reads on its own. The queue is filled by one SQL statement (``greenmail_enqueue()`` N times),
or with ``--gm-fill cli`` by ``greenmail enqueue`` as a process per message."""

from __future__ import annotations

import atexit
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.base import MSG, RCPT, REPO, SENDER, WORK, BenchError
from bench.peers.base import Ctx
from bench.peers.greenmail import Greenmail
from bench.procs import SERVICES, child_log, descendants, spawn, stop_proc
from bench.sampling import CLK, cpu_ticks

DATABASE = "bench"


def _load_pgserver() -> ModuleType:
    """tests/pgserver.py (it imports tests/support.py), loaded by its path."""
    tests = REPO / "tests"
    if str(tests) not in sys.path:
        sys.path.append(str(tests))
    spec = importlib.util.spec_from_file_location("pgserver", tests / "pgserver.py")
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {tests / 'pgserver.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_SERVER: list[Any] = []


def server() -> Any:
    """The run's PostgreSQL server, started on first use, stopped at exit."""
    if not _SERVER:
        pgserver = _load_pgserver()
        directory = WORK / "postgresql"
        subprocess.run(["rm", "-rf", str(directory)], check=True, timeout=120)
        directory.mkdir(parents=True)
        directory.chmod(0o711)
        s = pgserver.PgServer.start(directory, durable=True)
        SERVICES.add(s.pid)
        atexit.register(s.stop)
        _SERVER.append(s)
    return _SERVER[0]


def db_cpu() -> float:
    """CPU seconds of the PostgreSQL server's processes so far (those that exited: by its cutime)."""
    s = server()
    pids = [s.pid, *descendants(s.pid)]
    ticks = 0
    for pid in pids:
        try:
            ticks += cpu_ticks(pid)
        except OSError:
            continue
    return ticks / CLK


class GreenmailPg(Greenmail):
    """greenmail nodes on one PostgreSQL queue."""

    def __init__(self, ctx: Ctx, nodes: int = 1, code: Path | None = None, name: str | None = None) -> None:
        name = name or ("greenmail_pg" if nodes == 1 else f"greenmail_pg{nodes}")
        super().__init__(ctx, code=code, name=name)
        self.nodes = nodes
        self.procs: list[subprocess.Popen] = []
        self._conn: Any = None
        self.fill_how = "SQL, 1 statement" if ctx.gm_fill == "api" else "cli, 4 par"

    def configure(self, port: int, conns: int, check_interval: int = 60) -> None:
        self.stop()
        self._close()
        self.cfg = self.dir / "greenmail.toml"
        s = server()
        s.drop_database(DATABASE)
        self.dsn = s.create_database(DATABASE)
        super().configure(port, max(1, conns // self.nodes), check_interval)
        base = self.cfg.read_text()
        self.cfgs = []
        for k in range(self.nodes):
            cfg = self.dir / f"node{k}.toml"
            queue = f'\n[queue]\nbackend = "postgresql"\ndsn = "{self.dsn}"\nnode = "bench{k}"\n'
            cfg.write_text(base + queue)
            self.cfgs.append(cfg)
        self.cfg = self.cfgs[0]
        r = subprocess.run([str(c) for c in self.command("queue", "init", "--config", self.cfg)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        if r.returncode != 0:
            raise BenchError(f"queue init failed: {r.stderr[-400:]}")

    def sql(self, statement: str, *params: Any) -> Any:
        """One row of ``statement`` on the bench's own connection (kept: drained() is polled)."""
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        return self._conn.execute(statement, params or None).fetchone()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def fill(self, n: int, par: int = 4) -> dict[str, Any]:
        if self.ctx.gm_fill == "cli":
            return super().fill(n, par)
        t0 = time.monotonic()
        self.sql(
            "SELECT count(greenmail_enqueue(%s, ARRAY[%s], %s)) FROM generate_series(1, %s)",
            SENDER, RCPT, MSG.read_bytes(), n,
        )  # fmt: skip
        wall = time.monotonic() - t0
        return {"wall_s": wall, "queued_s": wall, "errors": [], "msg_per_s": n / wall}

    def queued(self) -> int:
        return int(self.sql("SELECT count(*) FROM greenmail_messages")[0])

    def drained(self) -> bool:
        return self.sql("SELECT NOT EXISTS (SELECT 1 FROM greenmail_messages)")[0]

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        self.procs = []
        for k, cfg in enumerate(self.cfgs):
            logf = child_log(self.ctx.rundir / f"greenmail-node{k}.log")
            cmd = self.command("run", "--config", cfg)
            self.procs.append(spawn(cmd, stdout=subprocess.DEVNULL, stderr=logf, env=self.env()))
        self.proc = self.procs[0]
        return self.proc

    def stop(self) -> None:
        for p in self.procs:
            stop_proc(p, 40)
        self.procs = []
        self.proc = None

    def db_cpu(self) -> float:
        return db_cpu()
