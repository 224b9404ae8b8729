"""nullmailer and dma as peers. They conflict with Postfix as packages, so setup.sh unpacks
them (``dpkg -x``) and they run in a private mount namespace (bench/mntns.sh) where their
compiled-in /etc, /usr and /var/spool paths resolve to the benchmark's own trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.base import MNTNS, MSG, PKG, RCPT, RUN_PY, SENDER, WORK, BenchError, count_files
from bench.fill import run_stdin
from bench.peers.base import Ctx, Peer
from bench.procs import child_log, spawn, stop_proc


class NsPeer(Peer):
    """nullmailer and dma conflict with postfix; they run from `dpkg -x` trees in
    a mount namespace (mntns.sh) that overlays /etc (and /usr) and binds /var/spool."""

    def ns(self, cmd: list[Any]) -> list[Any]:
        raise NotImplementedError

    def submit_cmd(self) -> list[Any]:
        raise NotImplementedError

    def fill(self, n: int, par: int = 4) -> dict[str, Any]:
        out = self.ctx.rundir / "submit.json"
        cmd = [sys.executable, RUN_PY, "_submit", "--n", n, "--par", par, "--msg", MSG, "--out", out, "--"]
        r = subprocess.run([str(c) for c in self.ns(cmd + self.submit_cmd())], capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise BenchError(f"{self.name} enqueue failed: {r.stderr[-400:]}")
        return json.loads(out.read_text())

    def submit(self, data: bytes | Path) -> None:
        run_stdin(self.ns(self.submit_cmd()), data)


class Nullmailer(NsPeer):
    name = "nullmailer"
    native = "1 (serial)"
    fill_how = "nullmailer-inject, 4 par"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.dir = WORK / "nullmailer"
        self.usr = PKG / "nullmailer" / "usr"
        self.proc: subprocess.Popen | None = None

    def configure(self, port: int, pausetime: int) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        q = self.dir / "spool" / "nullmailer"
        for d in ("queue", "tmp", "failed"):
            (q / d).mkdir(parents=True)
        os.mkfifo(q / "trigger", 0o622)
        os.chmod(q / "trigger", 0o622)
        for p in [q, *q.iterdir()]:
            shutil.chown(p, "mail", "root")
        etc = self.dir / "etc"
        (etc / "nullmailer").mkdir(parents=True)
        (etc / "mailname").write_text("bench.invalid\n")
        conf = {
            "defaultdomain": "bench.invalid",
            "me": "bench.invalid",
            "remotes": f"127.0.0.1 smtp --port={port}",
            "pausetime": pausetime,
            "sendtimeout": 60,
        }
        for k, v in conf.items():
            (etc / "nullmailer" / k).write_text(f"{v}\n")

    def ns(self, cmd: list[Any]) -> list[Any]:
        return [MNTNS, self.dir / "etc", self.usr, self.dir / "spool", *cmd]

    def submit_cmd(self) -> list[Any]:
        return ["/usr/bin/nullmailer-inject", "-a", "-f", SENDER, RCPT]

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, 0)  # pausetime 0: nullmailer-send exits once the queue is empty

    def qdirs(self) -> list[Path]:
        q = self.dir / "spool" / "nullmailer"
        return [q / "queue", q / "tmp"]

    def queued(self) -> int:
        return count_files(self.qdirs()[:1])

    def drained(self) -> bool:
        return count_files(self.qdirs(), stop_at_first=True) == 0

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        self.proc = spawn(
            self.ns(["/usr/sbin/nullmailer-send"]),
            stdout=subprocess.DEVNULL,
            stderr=child_log(self.ctx.rundir / "nullmailer-send.log"),
        )
        return self.proc

    def live_start(self, port: int) -> None:
        self.configure(port, 3600)  # woken by the trigger FIFO on every new message
        self.proc = spawn(
            self.ns(["/usr/sbin/nullmailer-send"]),
            stdout=subprocess.DEVNULL,
            stderr=child_log(self.ctx.rundir / "nullmailer-send.log"),
        )
        time.sleep(0.5)

    def stop(self) -> None:
        stop_proc(self.proc, 10)
        self.proc = None


class Dma(NsPeer):
    name = "dma"
    native = "1 process/msg"
    fill_how = "dma (DEFER), 4 par"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.dir = WORK / "dma"
        self.bin = PKG / "dma" / "usr" / "sbin" / "dma"

    def configure(self, port: int, defer: bool) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "spool").mkdir(parents=True)
        shutil.chown(self.dir / "spool", "mail", "mail")
        (self.dir / "etc" / "dma").mkdir(parents=True)
        conf = [
            "SMARTHOST 127.0.0.1",
            f"PORT {port}",
            f"SPOOLDIR {self.dir / 'spool'}",
            "MAILNAME bench.invalid",
            "NULLCLIENT",
        ] + (["DEFER"] if defer else [])
        (self.dir / "etc" / "dma" / "dma.conf").write_text("\n".join(conf) + "\n")

    def ns(self, cmd: list[Any]) -> list[Any]:
        return [MNTNS, self.dir / "etc", "-", "-", *cmd]

    def submit_cmd(self) -> list[Any]:
        return [self.bin, "-f", SENDER, RCPT]

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, defer=True)

    def queued(self) -> int:
        return count_files([self.dir / "spool"], r"Q")

    def drained(self) -> bool:  # dma keeps a permanent "flush" file: only Q*/M* are messages
        return count_files([self.dir / "spool"], r"[QM]", stop_at_first=True) == 0

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        # -q forks one delivery process per queued message; the parent may return early
        return spawn(
            self.ns([self.bin, "-D", "-q"]),
            stdout=subprocess.DEVNULL,
            stderr=child_log(self.ctx.rundir / "dma.log"),
        )

    def live_start(self, port: int) -> None:
        self.configure(port, defer=False)  # dma delivers right after queueing, in a forked child
