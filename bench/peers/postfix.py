"""A private Postfix instance as a peer, relaying everything to [127.0.0.1]:port. Its layout
and the main.cf/master.cf lines every private instance needs come from
tests/postfix_template.py, shared with the interop tests; this module adds the benchmark's
lines (the hold while filling, the concurrency of ``postfix_conns``) and drives the instance."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.base import RCPT, REPO, SENDER, WORK, BenchError, count_files
from bench.fill import run_stdin, submit_many
from bench.peers.base import Ctx, Peer
from bench.procs import alive, child_log, reap_orphans, spawn


def _load_template() -> ModuleType:
    """tests/postfix_template.py, loaded by its path (tests/ is not a package on our path)."""
    path = REPO / "tests" / "postfix_template.py"
    spec = importlib.util.spec_from_file_location("postfix_template", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


template = _load_template()


class Postfix(Peer):
    """A private Postfix instance (own config and queue directories) that relays
    everything to [127.0.0.1]:port. For a drain, cleanup puts every message on
    hold while the queue is filled; the hold is lifted by postsuper -H + postqueue -f."""

    name = "postfix"
    native = "default (<=20)"
    fill_how = "sendmail, 4 par"

    def __init__(self, ctx: Ctx, match_conns: bool = False) -> None:
        super().__init__(ctx)
        self.match_conns = match_conns
        if match_conns:  # concurrency toward the relay = the workload's max_connections
            self.name, self.per_conns = "postfix_conns", True
        self.layout = template.Layout(WORK / "postfix")
        self.etc: Path = self.layout.etc
        self.queue: Path = self.layout.queue

    def configure(self, port: int, hold: bool, conns: int | None = None) -> None:
        self.stop()
        shutil.rmtree(self.layout.base, ignore_errors=True)
        self.layout.create()
        extra = ["mailbox_size_limit = 0"]
        if hold:
            extra.append("header_checks = static:HOLD")
        if conns:
            extra += [
                f"smtp_destination_concurrency_limit = {conns}",
                f"initial_destination_concurrency = {conns}",
                f"default_process_limit = {conns + 100}",
            ]
        template.write(
            self.layout,
            template.master_cf("private benchmark instance: no smtpd, no chroot, no local delivery"),
            template.main_cf(
                self.layout, myhostname="bench.invalid", relay_port=port, size_limit=104857600, extra=extra
            ),
        )

    def pf(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True)

    def master_pid(self) -> int | None:
        pid = self.layout.master_pid()
        return pid if pid is not None and alive(pid) else None

    def start(self) -> None:
        r = self.pf("start")
        if r.returncode != 0 or self.master_pid() is None:
            raise BenchError(f"postfix start failed: {r.stderr.strip()} {self.maillog_tail()}")

    def maillog_tail(self) -> str:
        try:
            return self.layout.maillog.read_text(errors="replace")[-400:]
        except OSError:
            return ""

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        self.pf("stop")
        for _ in range(100):
            reap_orphans()
            if not alive(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        reap_orphans()

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, hold=True, conns=conns if self.match_conns else None)
        self.start()

    def sendmail_cmd(self) -> list[Any]:
        return ["sendmail", "-C", self.etc, "-f", SENDER, "-i", RCPT]

    def fill(self, n: int, par: int = 4) -> dict[str, Any]:
        res = submit_many(self.sendmail_cmd(), n, par)
        t0 = time.monotonic() - res["wall_s"]
        # sendmail returns once postdrop wrote maildrop/; queued = pickup + cleanup are done too
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (
                count_files(self.qdirs()[:3], stop_at_first=True) == 0
                and count_files([self.queue / "hold"]) >= n
            ):
                break
            time.sleep(0.05)
        res["queued_s"] = time.monotonic() - t0
        return res

    def before_drain(self) -> None:
        """Lift the hold for new mail (the held messages are released by drain())."""
        subprocess.run(["postconf", "-c", self.etc, "-X", "header_checks"], check=True)
        self.pf("reload")
        time.sleep(2)  # let the reloaded services come back before t0

    def qdirs(self) -> list[Path]:
        return [self.queue / d for d in ("maildrop", "incoming", "active", "deferred", "hold")]

    def queued(self) -> int:
        return count_files(self.qdirs())

    def drained(self) -> bool:
        return count_files(self.qdirs(), stop_at_first=True) == 0

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        etc = self.etc
        return spawn(
            ["sh", "-c", f"postsuper -c {etc} -H ALL && postqueue -c {etc} -f"],
            stdout=subprocess.DEVNULL,
            stderr=child_log(self.ctx.rundir / "drain.log"),
        )

    def live_start(self, port: int) -> None:
        self.configure(port, hold=False)
        self.start()

    def submit(self, data: bytes | Path) -> None:
        run_stdin(self.sendmail_cmd(), data)
