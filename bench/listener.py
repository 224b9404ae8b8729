"""The listener workload: Postfix's smtp-source submits N messages over SMTP, C sessions at a
time, into greenmail's [listener] and into a private Postfix smtpd. Two rows per server:

- ``listener``: the relay is a port where nothing listens, so every message stays queued;
  the rate is N / smtp-source's wall time (accepted and durably queued, 250 answered), with
  the peak RSS/PSS of the server's process tree (smtp-source itself not counted);
- ``listener_e2e``: the relay is smtp-sink; the time from smtp-source's start until the sink
  has all N."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.base import RCPT, SENDER, BenchError, log, port_listening
from bench.peers import Ctx, Greenmail, Postfix
from bench.peers.postfix import template
from bench.procs import TRACKED, child_log, kill_strays, reap_orphans, spawn, stop_proc
from bench.results import Results
from bench.sampling import Sampler
from bench.sinks import SmtpSink

SMTP_SOURCE = "/usr/sbin/smtp-source"
MSG_LEN = 2048
SERVERS = ("greenmail", "postfix")


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (bound once by the kernel's choice, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GreenmailListener(Greenmail):
    """``greenmail run`` with [listener] on ``listen`` and the relay on ``relay``."""

    def start_listener(self, listen: int, relay: int, rundir: Path) -> None:
        self.configure(relay, 10)
        self.cfg.write_text(
            self.cfg.read_text()
            + f'\n[listener]\nlisten = ["127.0.0.1:{listen}"]\nallow = ["127.0.0.0/8"]\nmax_clients = 1000\n'
        )
        logf = rundir / "greenmail.log"
        self.proc = spawn(self.run_cmd(), stdout=subprocess.DEVNULL, stderr=child_log(logf), env=self.env())
        wait_listening(listen, lambda: self.proc is not None and self.proc.poll() is None, logf)


class PostfixListener(Postfix):
    """The private Postfix instance with an smtpd on ``listen`` (127.0.0.1 is in mynetworks,
    so it relays), enough processes for 100 sessions, relaying to ``relay``."""

    def start_listener(self, listen: int, relay: int, rundir: Path) -> None:
        self.stop()
        shutil.rmtree(self.layout.base, ignore_errors=True)
        self.layout.create()
        template.write(
            self.layout,
            template.master_cf(
                "private benchmark instance: an smtpd on 127.0.0.1, no chroot, no local delivery",
                [f"127.0.0.1:{listen} inet n - n - - smtpd"],
            ),
            template.main_cf(
                self.layout,
                myhostname="bench.invalid",
                relay_port=relay,
                size_limit=104857600,
                extra=["mailbox_size_limit = 0", "default_process_limit = 300", "smtpd_peername_lookup = no"],
            ),
        )
        self.start()
        wait_listening(listen, lambda: self.master_pid() is not None, self.layout.maillog)


def wait_listening(port: int, running: Callable[[], bool], logf: Path) -> None:
    for _ in range(400):
        if port_listening(port):
            return
        if not running():
            break
        time.sleep(0.05)
    raise BenchError(f"no listener on {port}: {logf.read_text(errors='replace')[-400:]}")


def source_cmd(port: int, n: int, sessions: int) -> list[object]:
    return [SMTP_SOURCE, "-s", sessions, "-m", n, "-l", MSG_LEN, "-f", SENDER, "-t", RCPT,
            "-M", "bench.invalid", f"127.0.0.1:{port}"]  # fmt: skip


def make_server(ctx: Ctx, name: str) -> GreenmailListener | PostfixListener:
    return GreenmailListener(ctx) if name == "greenmail" else PostfixListener(ctx)


def measure(ctx: Ctx, res: Results, name: str, n: int, sessions: int, run: int, e2e: bool) -> None:
    workload = "listener_e2e" if e2e else "listener"
    if ctx.already(workload, name, n, str(sessions), run):
        return
    ctx.new_rundir(f"{workload}-{name}-n{n}-c{sessions}-r{run}")
    log(f"== {workload} {name} N={n} sessions={sessions} run {run}")
    kill_strays()
    server = make_server(ctx, name)
    row: dict[str, object] = dict(workload=workload, peer=name, n=n, conns=str(sessions), run=run)
    row["enqueue_how"] = f"smtp-source -s {sessions} -l {MSG_LEN}"
    sink = sampler = None
    try:
        listen, relay = free_port(), free_port()
        if e2e:
            sink = SmtpSink(relay, ctx.rundir / "sink.log", maxconn=1000).start()
        elif port_listening(relay):
            raise BenchError(f"relay port {relay} is in use")
        server.start_listener(listen, relay, ctx.rundir)
        sampler = Sampler([sink.pid] if sink else [], interval=0.05)
        t0 = time.monotonic()
        src = spawn(source_cmd(listen, n, sessions), stdout=subprocess.DEVNULL,
                    stderr=child_log(ctx.rundir / "smtp-source.log"))  # fmt: skip
        sampler.exclude.add(src.pid)
        sampler.start()
        status, t_src, t_all = "timeout", None, None
        while time.monotonic() - t0 < ctx.timeout:
            if t_src is None and src.poll() is not None:
                t_src = time.monotonic() - t0
                TRACKED.discard(src.pid)
            if sink is not None:
                sink.check_alive()
                if sink.count() >= n:
                    t_all = time.monotonic() - t0
            if t_src is not None and (sink is None or t_all is not None):
                status = "ok"
                break
            reap_orphans()
            time.sleep(0.01)
        sampler.finish()
        if t_src is not None and src.returncode != 0:
            status = f"smtp-source exit {src.returncode}"
        errors = (ctx.rundir / "smtp-source.log").read_text(errors="replace").strip()
        got = sink.count() if sink else server.queued()
        if status == "ok" and got != n:
            status = f"lost({got}/{n})"
        wall = t_all if e2e else t_src
        row.update(
            status=status,
            delivered=f"{got}/{n}" + ("" if e2e else " queued"),
            wall_s=wall,
            msg_per_s=n / wall if status == "ok" and wall else None,
            enqueue_s=t_src,
            peak_rss_mb=sampler.peak_rss_kb / 1024,
            peak_pss_mb=sampler.peak_pss / 1024,
            procs=sampler.max_procs,
            note=errors.splitlines()[0][:200] if errors else None,
        )
        if src.poll() is None:
            stop_proc(src, 5)
    except BenchError as e:
        log(f"   FAILED: {e}")
        row.update(status="failed", note=str(e)[:200])
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.finish()
        server.stop()
        if sink:
            sink.stop()
        kill_strays()
    res.add(**row)


def wl_listener(ctx: Ctx, res: Results, n: int, sessions: list[int], runs: int, e2e: bool = True) -> None:
    """Accept rate at every session count, then (``e2e``) end to end at the first; interleaved."""
    for run in range(1, runs + 1):
        for c in sessions:
            for name in SERVERS:
                measure(ctx, res, name, n, c, run, e2e=False)
        if e2e:
            for name in SERVERS:
                measure(ctx, res, name, n, sessions[0], run, e2e=True)
