"""greenmail as a peer: its configuration for a drain or as an idle daemon, filling its queue
(the API by default, or the CLI), starting ``greenmail run`` and handing it single messages.
With ``code`` it runs the greenmail/ found there (``python -m greenmail`` with that
PYTHONPATH and ``-P``, so that no greenmail/ in the current directory comes first; the
queue is filled by a helper process with the same path): how a baseline
revision and this tree are measured side by side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.base import GREENMAIL, PYTHON, RCPT, RUN_PY, SENDER, WORK, BenchError, count_files
from bench.fill import api_fill, submit_many
from bench.peers.base import Ctx, Peer
from bench.procs import child_log, spawn, stop_proc


class Greenmail(Peer):
    """The daemon; with ``processes`` > 1 ([delivery] processes), its extra delivery
    processes are its children: the sampler and tree_cpu() count the whole tree."""

    name = "greenmail"
    per_conns = True

    def __init__(
        self, ctx: Ctx, processes: int = 1, code: Path | None = None, name: str | None = None
    ) -> None:
        super().__init__(ctx)
        self.processes = processes
        self.code = code
        if processes > 1:  # max_connections stays the total over the processes
            self.name = f"greenmail_p{processes}"
        if name:
            self.name = name
        self.dir = WORK / self.name
        self.cfg = self.dir / "greenmail.toml"
        self.spool = self.dir / "spool"
        self.proc: subprocess.Popen | None = None
        self.fill_how = f"{ctx.gm_fill}, 4 par"

    def configure(self, port: int, conns: int, check_interval: int = 60) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        procs = f"processes = {self.processes}\n" if self.processes > 1 else ""  # default: no such line
        self.cfg.write_text(
            f'[spool]\npath = "{self.spool}"\n\n'
            f'[relay]\nhost = "127.0.0.1"\nport = {port}\nhelo = "bench.invalid"\n\n'
            f"[delivery]\nmax_connections = {conns}\ncheck_interval = {check_interval}\nshutdown_grace = 5\n"
            f"{procs}\n"
            f'[metrics]\nlisten = ""\n'
        )

    def env(self) -> dict[str, str] | None:
        """The environment of greenmail processes: None (ours) unless ``code`` selects other code."""
        return None if self.code is None else {**os.environ, "PYTHONPATH": str(self.code)}

    def command(self, *args: Any) -> list[Any]:
        if self.code is None:
            return [GREENMAIL, *args]
        return [PYTHON, "-P", "-m", "greenmail", *args]  # -P: no current directory first on the path

    def check_code(self) -> Path:
        """Where this peer's processes import greenmail from; a BenchError unless below ``code``."""
        probe = [str(PYTHON), "-P", "-c", "import greenmail; print(greenmail.__file__)"]
        r = subprocess.run(probe, env=self.env(), capture_output=True, text=True)
        where = Path(r.stdout.strip()).parent
        if r.returncode != 0 or (self.code is not None and where.parent != self.code):
            found = where if r.returncode == 0 else r.stderr.strip()
            raise BenchError(f"{self.name}: greenmail imported from {found}, not {self.code}")
        return where

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, conns)

    def enqueue_cmd(self) -> list[Any]:
        return self.command("enqueue", "--config", self.cfg, "--from", SENDER, "--to", RCPT)

    def fill(self, n: int, par: int = 4) -> dict[str, Any]:
        if self.ctx.gm_fill == "cli":
            return submit_many(self.enqueue_cmd(), n, par, env=self.env())
        if self.code is None:
            return api_fill(self.spool, n, par)
        out = self.dir / "fill.json"
        args = [PYTHON, RUN_PY, "_fill", "--spool", self.spool, "--n", n, "--threads", par, "--out", out]
        r = subprocess.run([str(a) for a in args], env=self.env(), capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise BenchError(f"{self.name} fill failed: {r.stderr[-400:]}")
        return json.loads(out.read_text())

    def qdirs(self) -> list[Path]:
        return [self.spool / "outgoing", self.spool / "outgoing_active"]

    def queued(self) -> int:
        return count_files(self.qdirs())

    def drained(self) -> bool:
        return count_files(self.qdirs(), stop_at_first=True) == 0

    def run_cmd(self, *extra: str) -> list[Any]:
        return self.command("run", "--config", self.cfg, *extra)

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        logf = child_log(self.ctx.rundir / "greenmail.log")
        self.proc = spawn(self.run_cmd(), stdout=subprocess.DEVNULL, stderr=logf, env=self.env())
        return self.proc

    def stop(self) -> None:
        stop_proc(self.proc, 40)
        self.proc = None

    def live_start(self, port: int) -> None:
        self.configure(port, 10, check_interval=60)
        logf = self.ctx.rundir / "greenmail.log"
        self.proc = spawn(self.run_cmd(), stdout=subprocess.DEVNULL, stderr=child_log(logf), env=self.env())
        for _ in range(300):
            if b"greenmail started" in logf.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"greenmail did not start: {logf.read_text(errors='replace')[-400:]}")

    def submit(self, data: bytes | Path) -> None:
        import greenmail

        if isinstance(data, Path):
            with open(data, "rb") as f:
                greenmail.enqueue(SENDER, [RCPT], f, spool=str(self.spool))
        else:
            greenmail.enqueue(SENDER, [RCPT], data, spool=str(self.spool))
