#!/usr/bin/env python3
"""greenmail benchmark: greenmail and its peers on the same workloads, in one run.

    sudo bench/setup.sh             # once: postfix, nullmailer + dma (unpacked), venv, py-spy
    sudo bench/run.py smoke         # every workload at small sizes, 1 run (~5 min)
    sudo bench/run.py all           # the full run (about 60 minutes on 2 cores)

    bench/run.py drain   [--n 10000,100000] [--conns 10,100] [--runs 3] [--peers greenmail,greenmail_p2,...]
    bench/run.py slow    [--n 10000] [--conns 1000] [--delay 2]
    bench/run.py latency [--m 200]
    bench/run.py enqueue [--n 10000] [--par 4]
    bench/run.py big     [--mb 50]
    bench/run.py profile [--n 10000] [--conns 10]
    bench/run.py table RESULTS_DIR [RESULTS_DIR ...]   # re-render table.md from raw.tsv files
    bench/run.py all --resume RESULTS_DIR              # finish an interrupted run

Every command writes bench/results/<UTC date-time>-<command>/ (table.md, raw.tsv,
env.txt); spools and per-run logs stay in $GREENMAIL_BENCH_WORK (/tmp/greenmail-bench).
Method, peers and targets: bench/README.md. Python stdlib only (runs in the project venv).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = REPO / ".venv"
WORK = Path(os.environ.get("GREENMAIL_BENCH_WORK", "/tmp/greenmail-bench"))
PKG = WORK / "pkg"  # dpkg -x trees made by setup.sh
GREENMAIL = VENV / "bin" / "greenmail"
PYSPY = VENV / "bin" / "py-spy"
MNTNS = BENCH / "mntns.sh"
MSG = BENCH / "message.eml"
SENDER, RCPT = "bench-from@greenmail.test", "bench-to@sink.test"
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
ALWAYS_AT_LARGE_N = ("greenmail", "greenmail_p2", "anchor", "anchor_reuse")
STALL = 120  # seconds without a new message at the sink: the drain is given up


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# processes: /proc readings, the subreaper, our own children
# ---------------------------------------------------------------------------

TRACKED: set[int] = set()  # PIDs owned by a Popen object: the orphan reaper leaves them alone


def become_subreaper() -> None:
    """Orphans of anything we start (daemonizing postfix master, dma's children)
    are re-parented to us, so they stay in the measured process tree."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        log("warning: PR_SET_CHILD_SUBREAPER failed: daemons escape the measurement")


def spawn(args: list, **kw) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], **kw)
    TRACKED.add(p.pid)
    for k in ("stdout", "stderr"):  # log files opened for the child: the child has them now
        if hasattr(kw.get(k), "close"):
            kw[k].close()
    return p


def stop_proc(p: subprocess.Popen | None, timeout: float = 15, sig: int = signal.SIGTERM) -> None:
    if p is None:
        return
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    TRACKED.discard(p.pid)


def proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (ppid, state)} of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(name)] = (int(rest[1]), rest[0].decode())
    return out


def tree(exclude: Iterable[int] = (), table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """Our descendants {pid: state}, without the subtrees rooted at ``exclude`` (the sink)."""
    table = proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    skip = set(exclude)
    out: dict[int, str] = {}
    stack = [os.getpid()]
    while stack:
        for c in kids.get(stack.pop(), ()):
            if c not in skip and c not in out:
                out[c] = table[c][1]
                stack.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def reap_orphans() -> None:
    """waitpid() zombies re-parented to us that no Popen owns (call from the main thread only)."""
    me = os.getpid()
    for pid, (ppid, state) in proc_table().items():
        if ppid == me and state == "Z" and pid not in TRACKED:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_strays(exclude: Iterable[int] = ()) -> None:
    """TERM (then KILL) descendants left over from an earlier step: they are ours."""
    reap_orphans()
    left = [p for p, s in tree(exclude).items() if s != "Z"]
    if not left:
        return
    log(f"warning: terminating leftover processes {left}")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        for _ in range(50):
            reap_orphans()
            if not any(alive(p) for p in left):
                return
            time.sleep(0.1)


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime (reaped children) of one process."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return sum(int(x) for x in rest[11:15])


def tree_cpu(exclude: Iterable[int]) -> float:
    """CPU seconds of our process tree so far: live (and zombie) descendants, plus
    every child we have reaped ourselves. A difference of two readings is the CPU
    a step cost, whatever forked and exited meanwhile."""
    reap_orphans()
    ticks = 0
    for pid in tree(exclude):
        try:
            ticks += cpu_ticks(pid)
        except OSError:
            pass
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ticks / CLK + ru.ru_utime + ru.ru_stime


_LIBC = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
KCMP_VM = 1


def shares_memory(pid: int, other: int) -> bool:
    """Whether two processes have one address space: a child between vfork() and exec()
    (how Python's subprocess starts a program). Its RSS and PSS are its parent's; counted
    again they would double the tree's memory for a sample."""
    if SYS_KCMP is None:
        return False
    return _LIBC.syscall(SYS_KCMP, pid, other, KCMP_VM, 0, 0) == 0


def mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB; (0, 0) when the process is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE_KB
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def hwm_kb(pid: int) -> int:
    """The kernel's peak RSS of one process (VmHWM), exact, unlike sampling."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS
    except OSError:
        pass


class Sampler(threading.Thread):
    """Peak memory of our process tree (minus ``exclude``), sampled in the background.

    RSS and PSS are summed over the tree's processes at each sample; the peak
    of each sum is kept. When the tree is one process the kernel's VmHWM (the
    exact peak) is used as well, so short spikes between samples are not missed.
    """

    def __init__(self, exclude: Iterable[int], interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.exclude = set(exclude)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.max_procs = self.hwm = 0
        self.single = True
        self._halt = threading.Event()

    def sample(self) -> tuple[int, int, list[int]]:
        table = proc_table()
        pids = [p for p, s in tree(self.exclude, table).items() if s != "Z"]
        rss = pss = 0
        for p in pids:
            parent = table[p][0]
            if parent in pids and shares_memory(parent, p):
                continue  # vfork()ed, not yet exec()ed: the parent's memory, already counted
            r, s = mem_kb(p)
            rss += r
            pss += s
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.max_procs = max(self.max_procs, len(pids))
        if len(pids) > 1:
            self.single = False
        elif pids:
            self.hwm = max(self.hwm, hwm_kb(pids[0]))
        return rss, pss, pids

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            self.sample()
            # thousands of processes (dma): keep the sampler's own cost bounded
            self._halt.wait(max(self.interval, 5 * (time.monotonic() - t)))

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    @property
    def peak_rss_kb(self) -> int:
        return max(self.peak_rss, self.hwm if self.single else 0)


def count_files(dirs: Iterable[Path], pattern: str | None = None, stop_at_first: bool = False) -> int:
    """Regular files below ``dirs`` (recursively); with ``pattern``, only names matching the regex."""
    rx = re.compile(pattern) if pattern else None
    n = 0
    stack = [str(d) for d in dirs]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif rx is None or rx.match(e.name):
                        n += 1
                        if stop_at_first:
                            return n
        except (FileNotFoundError, NotADirectoryError):
            continue
    return n


def port_listening(port: int) -> bool:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation (q in 0..100)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---------------------------------------------------------------------------
# sinks
# ---------------------------------------------------------------------------


def sink_binary() -> Path:
    """smtp-sink under a name of our own: a `pkill smtp-sink` by some other job on
    the machine (this happened once) must not end a measurement."""
    copy = WORK / "bin" / "gmbench-smtp-sink"
    orig = Path(shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    if not copy.exists() or copy.stat().st_size != orig.stat().st_size:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(orig, copy)
    return copy


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1: discards mail; -c writes running
    "sess= quit= mesg=" counters to stdout, which count() reads back."""

    COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")

    def __init__(self, port: int, logfile: Path, delay: int = 0, maxconn: int = 1000) -> None:
        self.port, self.logfile, self.delay, self.maxconn = port, logfile, delay, maxconn
        self.proc: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        if port_listening(self.port):
            raise BenchError(f"port {self.port} is in use: choose another with --port")
        args = [sink_binary(), "-c", "-u", "nobody", "-m", self.maxconn]
        if self.delay:
            args += ["-w", self.delay]
        args += [f"127.0.0.1:{self.port}", 4096]
        self.proc = spawn(args, stdout=open(self.logfile, "wb"), stderr=subprocess.STDOUT)
        for _ in range(200):
            if port_listening(self.port):
                return self
            time.sleep(0.02)
        raise BenchError(f"smtp-sink did not start: {self.logfile.read_text(errors='replace')[-300:]}")

    def counters(self) -> tuple[int, int, int]:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                found = self.COUNTERS.findall(f.read())
        except FileNotFoundError:
            return 0, 0, 0
        return tuple(int(x) for x in found[-1]) if found else (0, 0, 0)

    def count(self) -> int:
        return self.counters()[2]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the sink exited during the measurement (status {self.proc.returncode})")

    def sessions(self) -> int:
        return self.counters()[0]

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def stop(self) -> None:
        stop_proc(self.proc, 5)


class LatencySink:
    """A small SMTP receiver of our own (``run.py _latsink``) that writes
    "<X-Bench-Id> <CLOCK_MONOTONIC seconds>" when a message's final dot arrives.
    smtp-sink cannot say when a given message arrived; this can."""

    def __init__(self, port: int, out: Path) -> None:
        self.port, self.out = port, out
        self.proc: subprocess.Popen | None = None
        self._f = None
        self.seen: dict[str, float] = {}

    def start(self) -> LatencySink:
        if port_listening(self.port):
            raise BenchError(f"port {self.port} is in use")
        self.out.write_bytes(b"")
        self.proc = spawn([sys.executable, __file__, "_latsink", "--port", self.port, "--out", self.out])
        for _ in range(250):
            if port_listening(self.port):
                self._f = open(self.out, "rb")
                return self
            time.sleep(0.02)
        raise BenchError("latency sink did not start")

    def wait_for(self, bench_id: str, timeout: float) -> float | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the latency sink exited (status {self.proc.returncode})")
        deadline = time.monotonic() + timeout
        while bench_id not in self.seen:
            for line in self._f.readlines():
                if line.endswith(b"\n"):
                    k, t = line.split()
                    self.seen[k.decode()] = float(t)
                else:  # half-written line: read it again next time
                    self._f.seek(-len(line), os.SEEK_CUR)
            if bench_id in self.seen or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        return self.seen.get(bench_id)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def stop(self) -> None:
        stop_proc(self.proc, 5)
        if self._f:
            self._f.close()


def latsink_main(port: int, out: str) -> None:
    import asyncio

    rx = re.compile(rb"^X-Bench-Id: *(\S+)", re.M | re.I)
    sink_log = open(out, "ab", buffering=0)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 latsink ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-latsink\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with .\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    t = time.monotonic()
                    m = rx.search(data)
                    sink_log.write(b"%s %.6f\n" % (m.group(1) if m else b"-", t))
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:  # HELO MAIL RCPT RSET NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port, limit=1 << 20)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())


# ---------------------------------------------------------------------------
# enqueueing: N submit commands, P in parallel
# ---------------------------------------------------------------------------


def submit_many(cmd: list, n: int, par: int, msg: Path = MSG) -> dict:
    """Run ``cmd < msg`` n times, ``par`` at a time; wall time and per-call times."""
    cmd = [str(c) for c in cmd]
    counter = itertools.count()
    times: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        while next(counter) < n and len(errors) < 5:
            t = time.monotonic()
            with open(msg, "rb") as stdin:
                r = subprocess.run(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            times.append(time.monotonic() - t)
            if r.returncode != 0:
                errors.append(f"exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[:200]}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(par)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "wall_s": time.monotonic() - t0,
        "calls": len(times),
        "errors": errors,
        "call_p50_ms": pct(times, 50) * 1000,
        "call_p99_ms": pct(times, 99) * 1000,
    }


def submit_main(argv: list[str]) -> None:
    """``run.py _submit``: submit_many inside a mount namespace (nullmailer, dma)."""
    ap = argparse.ArgumentParser(prog="run.py _submit")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--par", type=int, required=True)
    ap.add_argument("--msg", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    Path(a.out).write_text(json.dumps(submit_many(cmd, a.n, a.par, Path(a.msg))))


def api_fill(spool: Path, n: int, threads: int = 4) -> dict:
    """n messages through greenmail's Python API (durable: fsync'd), ``threads`` at a time;
    wall time and per-call times."""
    import greenmail

    data = MSG.read_bytes()
    counter = itertools.count()
    times: list[float] = []

    def worker() -> None:
        while next(counter) < n:
            t = time.monotonic()
            greenmail.enqueue(SENDER, [RCPT], data, spool=str(spool))
            times.append(time.monotonic() - t)

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"wall_s": time.monotonic() - t0, "calls": len(times), "errors": [],
            "call_p50_ms": pct(times, 50) * 1000, "call_p99_ms": pct(times, 99) * 1000}


# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------


class Ctx:
    def __init__(self, port: int, out: Path, timeout: float, gm_fill: str) -> None:
        self.port, self.out, self.timeout, self.gm_fill = port, out, timeout, gm_fill
        self.rundir = WORK / "runs"
        self.done: set[tuple[str, ...]] = set()  # measurements a resumed run already has

    def already(self, *key: object) -> bool:
        if tuple(_cell(k) for k in key) in self.done:
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

    def fill(self, n: int, par: int = 4) -> dict:
        return {}

    def queued(self) -> int:
        return 0

    def drained(self) -> bool:
        return True

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        raise NotImplementedError

    def stop(self) -> None: ...

    # live daemon
    def live_start(self, port: int) -> None:
        raise BenchError(f"{self.name} has no live mode")

    def submit(self, data: bytes | Path) -> None:
        raise NotImplementedError


class Greenmail(Peer):
    """The daemon; with ``processes`` > 1 ([delivery] processes), its extra delivery
    processes are its children: the sampler and tree_cpu() count the whole tree."""

    name = "greenmail"
    per_conns = True

    def __init__(self, ctx: Ctx, processes: int = 1) -> None:
        super().__init__(ctx)
        self.processes = processes
        if processes > 1:  # max_connections stays the total over the processes
            self.name = f"greenmail_p{processes}"
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

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, conns)

    def enqueue_cmd(self) -> list:
        return [GREENMAIL, "enqueue", "--config", self.cfg, "--from", SENDER, "--to", RCPT]

    def fill(self, n: int, par: int = 4) -> dict:
        if self.ctx.gm_fill == "cli":
            return submit_many(self.enqueue_cmd(), n, par)
        return api_fill(self.spool, n, par)

    def qdirs(self) -> list[Path]:
        return [self.spool / "outgoing", self.spool / "outgoing_active"]

    def queued(self) -> int:
        return count_files(self.qdirs())

    def drained(self) -> bool:
        return count_files(self.qdirs(), stop_at_first=True) == 0

    def run_cmd(self, *extra: str) -> list:
        return [GREENMAIL, "run", "--config", self.cfg, *extra]

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        logf = open(self.ctx.rundir / "greenmail.log", "wb")  # noqa: SIM115 - spawn() closes it
        self.proc = spawn(self.run_cmd(), stdout=subprocess.DEVNULL, stderr=logf)
        return self.proc

    def stop(self) -> None:
        stop_proc(self.proc, 40)
        self.proc = None

    def live_start(self, port: int) -> None:
        self.configure(port, 10, check_interval=60)
        logf = self.ctx.rundir / "greenmail.log"
        self.proc = spawn(self.run_cmd(), stdout=subprocess.DEVNULL, stderr=open(logf, "wb"))
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


POSTFIX_MASTER_CF = """\
# private benchmark instance: no smtpd, no chroot, no local delivery
pickup     unix  n  -  n  60    1  pickup
cleanup    unix  n  -  n  -     0  cleanup
qmgr       unix  n  -  n  300   1  qmgr
rewrite    unix  -  -  n  -     -  trivial-rewrite
bounce     unix  -  -  n  -     0  bounce
defer      unix  -  -  n  -     0  bounce
trace      unix  -  -  n  -     0  bounce
verify     unix  -  -  n  -     1  verify
flush      unix  n  -  n  1000? 0  flush
proxymap   unix  -  -  n  -     -  proxymap
smtp       unix  -  -  n  -     -  smtp
relay      unix  -  -  n  -     -  smtp
showq      unix  n  -  n  -     -  showq
error      unix  -  -  n  -     -  error
retry      unix  -  -  n  -     -  error
discard    unix  -  -  n  -     -  discard
anvil      unix  -  -  n  -     1  anvil
scache     unix  -  -  n  -     1  scache
postlog    unix-dgram n - n -   1  postlogd
"""


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
        self.dir = WORK / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"

    def configure(self, port: int, hold: bool, conns: int | None = None) -> None:
        self.stop()
        for d in ("queue", "data", "etc"):
            shutil.rmtree(self.dir / d, ignore_errors=True)
        for d in ("queue", "data", "etc"):
            (self.dir / d).mkdir(parents=True)
        shutil.chown(self.dir / "data", "postfix", "postfix")
        (self.dir / "maillog").write_bytes(b"")
        shutil.chown(self.dir / "maillog", "postfix")
        (self.etc / "master.cf").write_text(POSTFIX_MASTER_CF)
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.dir / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = bench.invalid",
            "mydestination =",
            f"relayhost = [127.0.0.1]:{port}",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "local_transport = error:local delivery is disabled",
            "alias_maps =",
            "alias_database =",
            "smtp_tls_security_level = none",
            "message_size_limit = 104857600",
            "mailbox_size_limit = 0",
            f"maillog_file = {self.dir / 'maillog'}",
            f"maillog_file_prefixes = {self.dir}",
        ]
        if hold:
            main.append("header_checks = static:HOLD")
        if conns:
            main += [
                f"smtp_destination_concurrency_limit = {conns}",
                f"initial_destination_concurrency = {conns}",
                f"default_process_limit = {conns + 100}",
            ]
        (self.etc / "main.cf").write_text("\n".join(main) + "\n")

    def pf(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.etc), *args], capture_output=True, text=True)

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def start(self) -> None:
        r = self.pf("start")
        if r.returncode != 0 or self.master_pid() is None:
            raise BenchError(f"postfix start failed: {r.stderr.strip()} {self.maillog_tail()}")

    def maillog_tail(self) -> str:
        try:
            return (self.dir / "maillog").read_text(errors="replace")[-400:]
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

    def sendmail_cmd(self) -> list:
        return ["sendmail", "-C", self.etc, "-f", SENDER, "-i", RCPT]

    def fill(self, n: int, par: int = 4) -> dict:
        res = submit_many(self.sendmail_cmd(), n, par)
        t0 = time.monotonic() - res["wall_s"]
        # sendmail returns once postdrop wrote maildrop/; queued = pickup + cleanup are done too
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if count_files(self.qdirs()[:3], stop_at_first=True) == 0 and count_files([self.queue / "hold"]) >= n:
                break
            time.sleep(0.05)
        res["queued_s"] = time.monotonic() - t0
        return res

    def release_hold_config(self) -> None:
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
        return spawn(["sh", "-c", f"postsuper -c {etc} -H ALL && postqueue -c {etc} -f"],
                     stdout=subprocess.DEVNULL, stderr=open(self.ctx.rundir / "drain.log", "wb"))

    def live_start(self, port: int) -> None:
        self.configure(port, hold=False)
        self.start()

    def submit(self, data: bytes | Path) -> None:
        run_stdin(self.sendmail_cmd(), data)


def run_stdin(cmd: list, data: bytes | Path) -> None:
    cmd = [str(c) for c in cmd]
    if isinstance(data, Path):
        with open(data, "rb") as f:
            r = subprocess.run(cmd, stdin=f, capture_output=True)
    else:
        r = subprocess.run(cmd, input=data, capture_output=True)
    if r.returncode != 0:
        raise BenchError(f"{cmd[0]}: exit {r.returncode}: {r.stderr.decode(errors='replace')[:300]}")


class NsPeer(Peer):
    """nullmailer and dma conflict with postfix; they run from `dpkg -x` trees in
    a mount namespace (mntns.sh) that overlays /etc (and /usr) and binds /var/spool."""

    def ns(self, cmd: list) -> list:
        raise NotImplementedError

    def submit_cmd(self) -> list:
        raise NotImplementedError

    def fill(self, n: int, par: int = 4) -> dict:
        out = self.ctx.rundir / "submit.json"
        cmd = [sys.executable, __file__, "_submit", "--n", n, "--par", par, "--msg", MSG, "--out", out, "--"]
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
        conf = {"defaultdomain": "bench.invalid", "me": "bench.invalid",
                "remotes": f"127.0.0.1 smtp --port={port}", "pausetime": pausetime, "sendtimeout": 60}
        for k, v in conf.items():
            (etc / "nullmailer" / k).write_text(f"{v}\n")

    def ns(self, cmd: list) -> list:
        return [MNTNS, self.dir / "etc", self.usr, self.dir / "spool", *cmd]

    def submit_cmd(self) -> list:
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
        self.proc = spawn(self.ns(["/usr/sbin/nullmailer-send"]), stdout=subprocess.DEVNULL,
                          stderr=open(self.ctx.rundir / "nullmailer-send.log", "wb"))
        return self.proc

    def live_start(self, port: int) -> None:
        self.configure(port, 3600)  # woken by the trigger FIFO on every new message
        self.proc = spawn(self.ns(["/usr/sbin/nullmailer-send"]), stdout=subprocess.DEVNULL,
                          stderr=open(self.ctx.rundir / "nullmailer-send.log", "wb"))
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
        conf = ["SMARTHOST 127.0.0.1", f"PORT {port}", f"SPOOLDIR {self.dir / 'spool'}",
                "MAILNAME bench.invalid", "NULLCLIENT"] + (["DEFER"] if defer else [])
        (self.dir / "etc" / "dma" / "dma.conf").write_text("\n".join(conf) + "\n")

    def ns(self, cmd: list) -> list:
        return [MNTNS, self.dir / "etc", "-", "-", *cmd]

    def submit_cmd(self) -> list:
        return [self.bin, "-f", SENDER, RCPT]

    def prepare(self, n: int, conns: int) -> None:
        self.configure(self.ctx.port, defer=True)

    def queued(self) -> int:
        return count_files([self.dir / "spool"], r"Q")

    def drained(self) -> bool:  # dma keeps a permanent "flush" file: only Q*/M* are messages
        return count_files([self.dir / "spool"], r"[QM]", stop_at_first=True) == 0

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        # -q forks one delivery process per queued message; the parent may return early
        return spawn(self.ns([self.bin, "-D", "-q"]), stdout=subprocess.DEVNULL,
                     stderr=open(self.ctx.rundir / "dma.log", "wb"))

    def live_start(self, port: int) -> None:
        self.configure(port, defer=False)  # dma delivers right after queueing, in a forked child


class Anchor(Peer):
    """The ceiling: Postfix's smtp-source blasting the message file straight into
    the sink, ``conns`` sessions in parallel; a new connection per message, or
    with -d one connection per session for all its messages (reuse)."""

    queueless = True

    def __init__(self, ctx: Ctx, reuse: bool) -> None:
        super().__init__(ctx)
        self.reuse = reuse
        self.name = "anchor_reuse" if reuse else "anchor"
        self.per_conns = True

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        args = ["smtp-source", *(["-d"] if self.reuse else []), "-s", conns, "-m", n,
                "-f", SENDER, "-t", RCPT, "-F", MSG, f"127.0.0.1:{self.ctx.port}"]
        return spawn(args, stdout=subprocess.DEVNULL, stderr=open(self.ctx.rundir / "smtp-source.log", "wb"))


def make_peer(ctx: Ctx, name: str) -> Peer:
    table: dict[str, Callable[[], Peer]] = {
        "greenmail": lambda: Greenmail(ctx),
        "greenmail_p2": lambda: Greenmail(ctx, processes=2),
        "postfix": lambda: Postfix(ctx),
        "postfix_conns": lambda: Postfix(ctx, match_conns=True),
        "nullmailer": lambda: Nullmailer(ctx),
        "dma": lambda: Dma(ctx),
        "anchor": lambda: Anchor(ctx, reuse=False),
        "anchor_reuse": lambda: Anchor(ctx, reuse=True),
    }
    if name not in table:
        raise BenchError(f"unknown peer {name!r} (known: {', '.join(table)})")
    return table[name]()


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

FIELDS = [
    "workload", "peer", "n", "conns", "delay_s", "run", "status", "delivered", "wall_s", "msg_per_s", "first_s",
    "cpu_s", "peak_rss_mb", "peak_pss_mb", "procs", "sessions", "enqueue_s", "enqueue_how", "queued_s",
    "call_p50_ms", "call_p99_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "idle_rss_mb", "growth_mb",
    "note", "time",
]  # fmt: skip


class Results:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict] = []

    def add(self, **row: object) -> None:
        row["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        clean = {k: _cell(row.get(k)) for k in FIELDS}
        self.rows.append(clean)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "raw.tsv", "w") as f:
            f.write("\t".join(FIELDS) + "\n")
            for r in self.rows:
                f.write("\t".join(r[k] for k in FIELDS) + "\n")
        shown = {k: v for k, v in clean.items() if v != "-" and k not in ("workload", "peer", "time")}
        log(f"   -> {row['workload']} {row['peer']}: " + " ".join(f"{k}={v}" for k, v in shown.items()))

    @staticmethod
    def load(paths: Iterable[Path]) -> list[dict]:
        rows = []
        for p in paths:
            lines = p.read_text().splitlines()
            head = lines[0].split("\t")
            rows += [{k: v for k, v in zip(head, line.split("\t"), strict=False)} for line in lines[1:] if line.strip()]
        return rows


def _cell(v: object) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("\t", " ").replace("\n", " ")


def snapshot_greenmail(name: str, reuse: bool) -> str:
    """Run the greenmail code as it is now for the whole run: a copy of greenmail/
    (byte-compiled) first on PYTHONPATH, for the daemon, the CLI and the API calls
    made here. Edits to the working tree during a long run then change nothing.
    A resumed run uses the same copy again."""
    import compileall
    import hashlib

    root = WORK / "snapshot" / name
    if not (reuse and (root / "greenmail").is_dir()):
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(REPO / "greenmail", root / "greenmail", ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(root, quiet=1)
    digest = hashlib.sha256()
    for f in sorted((root / "greenmail").glob("*.py")):
        digest.update(f.name.encode() + f.read_bytes())
    os.environ["PYTHONPATH"] = str(root)
    sys.path.insert(0, str(root))
    return f"snapshot of greenmail/ in {root}, sha256 {digest.hexdigest()[:12]}"


def write_env(out: Path, argv: list[str], code: str = "", resumed: bool = False) -> None:
    def sh(cmd: str) -> str:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        return r.stdout.strip() or "-"

    import gevent

    import greenmail

    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    pf_version = sh("dpkg-query -W -f='${Version}' postfix")
    unpacked = sh(f"cat {PKG}/*/.unpacked | paste -sd' '")
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"command: bench/run.py {' '.join(argv)}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), {mem} RAM",
        f"kernel: {platform.release()}; os: {sh('. /etc/os-release; echo $PRETTY_NAME')}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"work dir: {WORK} ({sh(f'df -T {WORK} | tail -1 | cut -c1-60')})",
        f"greenmail {greenmail.__version__} at {sh(f'git -C {REPO} rev-parse --short HEAD')}"
        f" ({'with uncommitted changes' if sh(f'git -C {REPO} status --porcelain -- greenmail') != '-' else 'clean'})"
        f"{'; ' + code if code else ''}; loaded from {Path(greenmail.__file__).parent}",
        f"python {platform.python_version()}, gevent {gevent.__version__}",
        f"postfix {pf_version} (smtp-sink, smtp-source from the same package)",
        f"unpacked: {unpacked}",
        f"message: {MSG.stat().st_size} bytes ({MSG.name}), 1 recipient",
    ]
    out.mkdir(parents=True, exist_ok=True)
    if resumed and (out / "env.txt").exists():  # keep the original header, say what the resumption ran on
        lines = [(out / "env.txt").read_text().rstrip("\n"),
                 f"resumed: {lines[0].removeprefix('date: ')} by `{lines[1].removeprefix('command: ')}`, "
                 f"{lines[4]}; {lines[6]}"]
    (out / "env.txt").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------


def measure_drain(ctx: Ctx, res: Results, peer: Peer, n: int, conns: int, run: int,
                  workload: str = "drain", delay: int = 0) -> None:
    if ctx.already(workload, peer.name, n, peer.conns_label(conns), run):
        return
    tag = f"{workload}-{peer.name}-n{n}-c{conns}-r{run}"
    ctx.new_rundir(tag)
    log(f"== {workload} {peer.name} N={n} conns={peer.conns_label(conns)} run {run}"
        + (f" (sink delay {delay}s)" if delay else ""))
    row = dict(workload=workload, peer=peer.name, n=n, conns=peer.conns_label(conns), delay_s=delay or None,
               run=run, enqueue_how=peer.fill_how)
    kill_strays()
    sink = sampler = None
    try:
        peer.prepare(n, conns)
        if not peer.queueless:
            f = peer.fill(n)
            row.update(enqueue_s=f.get("queued_s", f["wall_s"]), call_p50_ms=f.get("call_p50_ms"))
            if f["errors"]:
                raise BenchError(f"enqueue errors: {f['errors'][:2]}")
            q = peer.queued()
            if q != n:
                raise BenchError(f"queued {q} != {n}")
            if isinstance(peer, Postfix):
                peer.release_hold_config()
        sink = SmtpSink(ctx.port, ctx.rundir / "sink.log", delay, maxconn=max(1000, 2 * conns + 100)).start()
        sampler = Sampler([sink.pid])
        cpu0 = tree_cpu([sink.pid])
        t0 = time.monotonic()
        proc = peer.drain(n, conns)
        sampler.start()
        status, next_reap, t_first = "timeout", 0.0, None
        last, t_last = 0, t0
        while time.monotonic() - t0 < ctx.timeout:
            got = sink.count()
            now = time.monotonic()
            if got and t_first is None:
                t_first = now - t0
            if got >= n and peer.drained():
                status = "ok"
                break
            if got != last:
                last, t_last = got, now
            elif now - t_last > STALL:
                status = f"stalled({got}/{n} for {STALL}s)"
                break
            if now >= next_reap:
                sink.check_alive()
                reap_orphans()
                next_reap = now + 0.2
            time.sleep(0.01)
        t1 = time.monotonic()
        cpu = tree_cpu([sink.pid]) - cpu0
        sampler.finish()
        time.sleep(0.5)  # late duplicates would show now
        delivered = sink.count()
        if status == "ok" and delivered != n:
            status = f"extra({delivered - n})"
        wall = t1 - t0
        row.update(status=status, delivered=f"{delivered}/{n}", wall_s=wall,
                   msg_per_s=n / wall if status == "ok" else None,
                   cpu_s=cpu, peak_rss_mb=sampler.peak_rss_kb / 1024, peak_pss_mb=sampler.peak_pss / 1024,
                   procs=sampler.max_procs, first_s=t_first)
        if proc.poll() is None:
            stop_proc(proc, 40)
        TRACKED.discard(proc.pid)
        peer.stop()  # closes cached connections: the sink counts a session when it ends
        time.sleep(0.3)
        row["sessions"] = sink.sessions() or None
    except BenchError as e:
        log(f"   FAILED: {e}")
        row.update(status="failed", note=str(e)[:200])
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.finish()
        peer.stop()
        if sink:
            sink.stop()
        kill_strays()
    res.add(**row)


def wl_drain(ctx: Ctx, res: Results, ns: list[int], conns_list: list[int], runs: int, peers: list[str],
             large_n: int, workload: str = "drain", delay: int = 0) -> None:
    skipped = set()
    for n in ns:
        for run in range(1, runs + 1):
            for ci, conns in enumerate(conns_list):
                for name in peers:
                    peer = make_peer(ctx, name)
                    if not peer.per_conns and ci > 0:
                        continue  # its concurrency is its own: one row per (N, run)
                    if large_n and n > large_n and name not in ALWAYS_AT_LARGE_N:
                        if (name, n) not in skipped:
                            log(f"   skipping {name} at N={n} (above --large-n {large_n})")
                            skipped.add((name, n))
                        continue
                    measure_drain(ctx, res, peer, n, conns, run, workload, delay)


def wl_latency(ctx: Ctx, res: Results, m: int, runs: int, peers: list[str]) -> None:
    base = MSG.read_bytes()
    lport = ctx.port + 1
    for run in range(1, runs + 1):
        for name in peers:
            peer = make_peer(ctx, name)
            if ctx.already("latency", name, m, "idle daemon", run):
                continue
            ctx.new_rundir(f"latency-{name}-r{run}")
            log(f"== latency {name} M={m} run {run}")
            kill_strays()
            sink = LatencySink(lport, ctx.rundir / "arrivals.txt")
            lats: list[float] = []
            calls: list[float] = []
            row = dict(workload="latency", peer=name, n=m, run=run, conns="idle daemon")
            try:
                sink.start()
                peer.live_start(lport)
                time.sleep(2)  # idle
                for i in range(m):
                    bid = f"{name}.{run}.{i}.{random.getrandbits(32):08x}"
                    data = b"X-Bench-Id: " + bid.encode() + b"\n" + base
                    t = time.monotonic()
                    peer.submit(data)
                    t_ret = time.monotonic()
                    calls.append(t_ret - t)
                    t_arr = sink.wait_for(bid, 15)
                    if t_arr is not None:
                        lats.append(t_arr - t_ret)
                    elif i + 1 - len(lats) >= 3:
                        raise BenchError(f"{i + 1 - len(lats)} messages did not arrive within 15 s")
                    reap_orphans()
                    time.sleep(random.uniform(0.05, 0.3))  # idle again; random phase vs. any poll timer
                row.update(status="ok" if len(lats) == m else "lost", delivered=f"{len(lats)}/{m}",
                           p50_ms=pct(lats, 50) * 1000, p90_ms=pct(lats, 90) * 1000,
                           p99_ms=pct(lats, 99) * 1000, max_ms=max(lats, default=float("nan")) * 1000,
                           call_p50_ms=pct(calls, 50) * 1000, call_p99_ms=pct(calls, 99) * 1000)
                (ctx.rundir / "latencies_ms.txt").write_text("".join(f"{x * 1000:.2f}\n" for x in lats))
            except BenchError as e:
                log(f"   FAILED: {e}")
                row.update(status="failed", note=str(e)[:200])
            finally:
                peer.stop()
                sink.stop()
                kill_strays()
            res.add(**row)


API_THREADS = {"greenmail_api": 1, "greenmail_api4": 4}  # greenmail.enqueue() in this process


def wl_enqueue(ctx: Ctx, res: Results, n: int, par: int, runs: int, peers: list[str]) -> None:
    def label(k: int) -> str:
        return f"{k} thread{'s' if k > 1 else ''}"

    for run in range(1, runs + 1):
        for name in peers:
            conns = label(API_THREADS[name]) if name in API_THREADS else f"{par} par"
            if ctx.already("enqueue", name, n, conns, run):
                continue
            ctx.new_rundir(f"enqueue-{name}-r{run}")
            log(f"== enqueue {name} N={n} run {run}")
            kill_strays()
            row = dict(workload="enqueue", peer=name, n=n, run=run)
            peer = None
            try:
                if name in API_THREADS:  # in this process, 1 or 4 threads: the API's own rate
                    gm = Greenmail(ctx)
                    gm.configure(ctx.port, 10)
                    ru0 = resource.getrusage(resource.RUSAGE_SELF)
                    f = api_fill(gm.spool, n, API_THREADS[name])
                    ru1 = resource.getrusage(resource.RUSAGE_SELF)
                    wall, q = f["wall_s"], gm.queued()
                    row.update(conns=conns, enqueue_how="greenmail.enqueue() (fsync)",
                               wall_s=wall, msg_per_s=n / wall, call_p50_ms=f["call_p50_ms"],
                               call_p99_ms=f["call_p99_ms"], queued_s=wall,
                               cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                               delivered=f"{q}/{n} queued", status="ok" if q == n else "lost")
                else:
                    peer = make_peer(ctx, name)
                    if peer.queueless or name == "postfix_conns":
                        raise BenchError(f"{name} has no enqueue")
                    peer.prepare(n, 10)
                    if isinstance(peer, Greenmail):
                        cpu0 = tree_cpu([])
                        f = submit_many(peer.enqueue_cmd(), n, par)
                        how = "greenmail enqueue (CLI)"
                    else:
                        cpu0 = tree_cpu([])
                        f = peer.fill(n, par)
                        how = peer.fill_how.split(",")[0]
                    cpu = tree_cpu([]) - cpu0
                    q = peer.queued()
                    row.update(conns=f"{par} par", enqueue_how=how, wall_s=f["wall_s"], msg_per_s=n / f["wall_s"],
                               call_p50_ms=f["call_p50_ms"], call_p99_ms=f["call_p99_ms"],
                               queued_s=f.get("queued_s", f["wall_s"]), cpu_s=cpu,
                               delivered=f"{q}/{n} queued", status="ok" if q == n and not f["errors"] else "lost",
                               note="; ".join(f["errors"][:2]) or None)
            except BenchError as e:
                log(f"   FAILED: {e}")
                row.update(status="failed", note=str(e)[:200])
            finally:
                if peer:
                    peer.stop()
                kill_strays()
            res.add(**row)


def big_message(mb: int) -> Path:
    path = WORK / f"big-{mb}mb.eml"
    if path.exists() and path.stat().st_size >= mb << 20:
        return path
    line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:76] + b"\n"
    head = (b"From: <%s>\nTo: <%s>\nSubject: big message %d MB\nX-Bench-Id: big\n\n"
            % (SENDER.encode(), RCPT.encode(), mb))
    block = line * 13797  # ~1 MiB
    with open(path, "wb") as f:
        f.write(head)
        written = 0
        while written < mb << 20:
            f.write(block)
            written += len(block)
    return path


def wl_big(ctx: Ctx, res: Results, mb: int, runs: int, peers: list[str]) -> None:
    path = big_message(mb)
    for run in range(1, runs + 1):
        for name in peers:
            peer = make_peer(ctx, name)
            if ctx.already("big", name, 1, f"{mb} MB", run):
                continue
            ctx.new_rundir(f"big-{name}-r{run}")
            log(f"== big message {name} {mb} MB run {run}")
            kill_strays()
            row = dict(workload="big", peer=name, n=1, conns=f"{mb} MB", run=run)
            sink = SmtpSink(ctx.port, ctx.rundir / "sink.log")
            samplers: list[Sampler] = []
            try:
                sink.start()
                peer.live_start(ctx.port)
                time.sleep(2)
                idle = Sampler([sink.pid])
                idle_samples = []
                for _ in range(5):
                    idle_samples.append(idle.sample()[0])
                    time.sleep(0.1)
                idle_rss = statistics.median(idle_samples)
                for pid in tree([sink.pid]):
                    reset_hwm(pid)
                sampler = Sampler([sink.pid], interval=0.05)
                samplers.append(sampler)
                sampler.start()
                t0 = time.monotonic()
                peer.submit(path)
                status = "timeout"
                while time.monotonic() - t0 < 600:
                    if sink.count() >= 1 and peer.drained():
                        status = "ok"
                        break
                    sink.check_alive()
                    reap_orphans()
                    time.sleep(0.02)
                wall = time.monotonic() - t0
                sampler.finish()
                peak = sampler.peak_rss_kb
                row.update(status=status, delivered=f"{sink.count()}/1", wall_s=wall, idle_rss_mb=idle_rss / 1024,
                           peak_rss_mb=peak / 1024, growth_mb=(peak - idle_rss) / 1024,
                           peak_pss_mb=sampler.peak_pss / 1024, procs=sampler.max_procs)
            except BenchError as e:
                log(f"   FAILED: {e}")
                row.update(status="failed", note=str(e)[:200])
            finally:
                for sm in samplers:
                    if sm.is_alive():
                        sm.finish()
                peer.stop()
                sink.stop()
                kill_strays()
            res.add(**row)


def wl_profile(ctx: Ctx, n: int, conns: int, rate: int = 250) -> str:
    """py-spy record of `greenmail run --once` draining n messages into smtp-sink."""
    if ctx.done and (ctx.out / "profile.md").exists():
        log("   (profile already done)")
        return (ctx.out / "profile.md").read_text()
    gm = Greenmail(ctx)
    ctx.new_rundir(f"profile-n{n}")
    log(f"== profile: greenmail run --once, N={n}, max_connections={conns}, py-spy {rate} Hz")
    kill_strays()
    gm.configure(ctx.port, conns)
    api_fill(gm.spool, n)
    raw = ctx.out / "profile-raw.txt"
    ctx.out.mkdir(parents=True, exist_ok=True)
    sink = SmtpSink(ctx.port, ctx.rundir / "sink.log").start()
    try:
        t0 = time.monotonic()
        with open(ctx.rundir / "py-spy.log", "wb") as err:
            r = subprocess.run([str(PYSPY), "record", "-r", str(rate), "--threads", "--nolineno", "-f", "raw",
                                "-o", str(raw), "--", *map(str, gm.run_cmd("--once"))],
                               stdout=subprocess.DEVNULL, stderr=err)
        wall = time.monotonic() - t0
        time.sleep(0.3)
        got = sink.count()
    finally:
        sink.stop()
        kill_strays()
    if r.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {(ctx.rundir / 'py-spy.log').read_text()[-400:]}")
    text = summarize_profile(raw, rate, wall, header=(
        f"`greenmail run --once` draining N={n} queued messages, max_connections={conns}, into smtp-sink on "
        f"127.0.0.1: delivered {got}/{n} in {wall:.1f} s under py-spy ({n / wall:.0f} msg/s; sampling at "
        f"{rate} Hz slows it down)."))
    (ctx.out / "profile.md").write_text(text)
    print(text)
    return text


IDLE_LEAVES = ("acquire_with_timeout (gevent/_threading.py)",)  # threadpool workers waiting for work


def summarize_profile(raw: Path, rate: int, wall: float, header: str = "", top: int = 15) -> str:
    """Where the time goes, from py-spy's raw stacks (recorded with --threads).

    The hub thread (the lowest thread id: the process's main thread) runs every
    greenlet, so its busy share bounds the throughput; the threadpool workers do
    the offloaded file work (fsync, renames) beside it. Idle samples (hub waiting
    in epoll, workers waiting for a task) are not in the breakdowns."""
    stacks: list[tuple[int, list[str], int]] = []
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        parts = [f for f in frames.split(";") if f]
        if not count.isdigit() or not parts or not parts[0].startswith("thread ("):
            continue
        tid = int(re.sub(r"\D", "", parts[0]) or 0)
        stacks.append((tid, parts[1:], int(count)))
    if not stacks:
        return f"Profile: {header}\n\n(no samples)\n"
    hub = min(t for t, _, _ in stacks)
    possible = rate * wall

    def area(frame: str) -> str:
        path = frame[frame.rfind("(") + 1:].rstrip(")")
        if "greenmail/" in path:
            return "greenmail." + path.rsplit("/", 1)[1].removesuffix(".py")
        for lib in ("gevent", "prometheus_client", "click", "greenlet"):
            if path.startswith(lib + "/") or f"/{lib}/" in path:
                return lib
        if path.startswith("logging"):
            return "logging (stdlib)"
        return path.removesuffix(".py").split("/")[0].strip("<>").removeprefix("frozen ") + " (stdlib)"

    def innermost_gm(frames: list[str]) -> str:
        gm = [f for f in frames if "greenmail/" in f]
        return gm[-1] if gm else "(no greenmail frame: hub loop, start-up)"

    def tally(sel: list[tuple[list[str], int]], key: Callable[[list[str]], Iterable[str]]) -> dict[str, int]:
        d: dict[str, int] = {}
        for frames, c in sel:
            for k in key(frames):
                d[k] = d.get(k, 0) + c
        return d

    def table(d: dict[str, int], total: int, title: str, k: int = top) -> list[str]:
        out = [f"| {title} | % |", "|---|---:|"]
        for name, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]:
            out.append(f"| `{name}` | {100 * v / total:.1f} |")
        return out

    hub_s = [(f, c) for t, f, c in stacks if t == hub and f]
    pool = [(f, c) for t, f, c in stacks if t != hub and f and f[-1] not in IDLE_LEAVES]
    n_hub = sum(c for _, c in hub_s) or 1
    n_pool = sum(c for _, c in pool) or 1
    threads = len({t for t, _, _ in stacks})
    lines = [
        f"Profile: {header}", "",
        f"Hub thread busy in {n_hub} of ~{possible:.0f} possible samples ({100 * n_hub / possible:.0f}% of the wall "
        f"time); {threads - 1} threadpool workers busy for {n_pool} samples ({100 * n_pool / possible:.0f}% of one "
        "thread's wall time). Percentages below are of the busy samples of the hub thread unless said otherwise.",
        "",
        "Hub thread, by area (module of the innermost frame: where the CPU is):", "",
        *table(tally(hub_s, lambda f: [area(f[-1])]), n_hub, "area", 12), "",
        "Hub thread, by the innermost greenmail function on the stack (itself + what it calls outside greenmail):",
        "", *table(tally(hub_s, lambda f: [innermost_gm(f)]), n_hub, "greenmail function"), "",
        "Hub thread, inclusive (a sample counts for every greenmail function on its stack):", "",
        *table(tally(hub_s, lambda f: {x for x in f if "greenmail/" in x}), n_hub, "greenmail function"), "",
        "Hub thread, leaf functions (C calls such as socket send/recv show as the gevent function making them):",
        "", *table(tally(hub_s, lambda f: [f[-1]]), n_hub, "function", 10), "",
        "Threadpool workers (offloaded file work), by innermost greenmail function, % of their busy samples:", "",
        *table(tally(pool, lambda f: [innermost_gm(f)]), n_pool, "greenmail function", 8), "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the table and the targets
# ---------------------------------------------------------------------------


def _num(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _med(rows: list[dict], key: str) -> float | None:
    vals = [x for x in (_num(r.get(key)) for r in rows) if x is not None]
    return statistics.median(vals) if vals else None


def _f(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}".replace(",", " ")


def _groups(rows: list[dict], workload: str) -> list[tuple[tuple, list[dict]]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["workload"] == workload:
            out.setdefault((r["peer"], r["n"], r["conns"], r["delay_s"]), []).append(r)
    return list(out.items())


def _sort_key(item: tuple) -> tuple:
    (peer, n, conns, _), _ = item
    order = ["greenmail", "greenmail_p2", "postfix", "postfix_conns", "nullmailer", "dma", "anchor",
             "anchor_reuse", "greenmail_api", "greenmail_api4"]
    return (_num(n) or 0, order.index(peer) if peer in order else 99, _num(conns) or 0)


def _delivered(rs: list[dict]) -> str:
    if all(r["status"] == "ok" for r in rs):
        return f"all {rs[0]['delivered']}" if len(rs) > 1 else rs[0]["delivered"]
    return ", ".join(f"{r['delivered']} ({r['status']})" for r in rs)


def _rate_cells(rs: list[dict]) -> tuple[str, str]:
    ok = [r for r in rs if r["status"] == "ok"]
    rates = [x for x in (_num(r["msg_per_s"]) for r in ok) if x is not None]
    if not rates:
        return "-", "-"
    return _f(statistics.median(rates), 0), f"{min(rates):.0f}-{max(rates):.0f}"


def render(rows: list[dict], env: str = "") -> str:
    out = []
    if env:
        out += ["```", env.strip(), "```", ""]
    drains = sorted(_groups(rows, "drain"), key=_sort_key)
    if drains:
        out += ["### Drain: N queued messages -> smtp-sink", "",
                "| peer | N | conns | runs | msg/s | min-max | drain s | 1st msg s | CPU s | peak RSS MB "
                "| peak PSS MB | procs | SMTP sessions | enqueue s (how) | delivered |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for (peer, n, conns, _), rs in drains:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            rate, mm = _rate_cells(rs)
            enq = _med(ok, "enqueue_s")
            how = rs[0]["enqueue_how"]
            out.append(f"| {peer} | {n} | {conns} | {len(rs)} | {rate} | {mm} | {_f(_med(ok, 'wall_s'), 2)} "
                       f"| {_f(_med(ok, 'first_s'), 2)} "
                       f"| {_f(_med(ok, 'cpu_s'))} | {_f(_med(ok, 'peak_rss_mb'))} | {_f(_med(ok, 'peak_pss_mb'))} "
                       f"| {_f(_med(ok, 'procs'), 0)} | {_f(_med(ok, 'sessions'), 0)} "
                       f"| {_f(enq) + ' (' + how + ')' if enq is not None else '-'} | {_delivered(rs)} |")
        out.append("")
    slows = sorted(_groups(rows, "slow"), key=_sort_key)
    if slows:
        out += ["### Slow relay: smtp-sink -w DELAY (each DATA answered after DELAY s)", "",
                "| peer | N | conns | sink delay s | runs | msg/s | min-max | conns / delay | ratio | CPU s "
                "| peak RSS MB | SMTP sessions | delivered |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for (peer, n, conns, delay), rs in slows:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            rate, mm = _rate_cells(rs)
            ideal = (_num(conns) or 0) / (_num(delay) or 1)
            ratio = (_med([r for r in rs if r["status"] == "ok"], "msg_per_s") or 0) / ideal if ideal else None
            out.append(f"| {peer} | {n} | {conns} | {delay} | {len(rs)} | {rate} | {mm} | {ideal:.0f} "
                       f"| {_f(ratio, 2)} | {_f(_med(ok, 'cpu_s'))} | {_f(_med(ok, 'peak_rss_mb'))} "
                       f"| {_f(_med(ok, 'sessions'), 0)} | {_delivered(rs)} |")
        out.append("")
    lats = sorted(_groups(rows, "latency"), key=_sort_key)
    if lats:
        out += ["### Latency: one message at a time to an idle daemon, enqueue returned -> sink has it", "",
                "| peer | messages | p50 ms | p90 ms | p99 ms | max ms | enqueue call p50 ms | delivered |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for (peer, _, _, _), rs in lats:
            out.append(f"| {peer} | {sum(int(_num(r['n']) or 0) for r in rs)} | {_f(_med(rs, 'p50_ms'))} "
                       f"| {_f(_med(rs, 'p90_ms'))} | {_f(_med(rs, 'p99_ms'))} | {_f(_med(rs, 'max_ms'))} "
                       f"| {_f(_med(rs, 'call_p50_ms'))} | {_delivered(rs)} |")
        out.append("")
    enqs = sorted(_groups(rows, "enqueue"), key=_sort_key)
    if enqs:
        out += ["### Enqueue: N messages into a stopped queue", "",
                "| peer | how | N | parallel | wall s | msg/s | per call p50 ms | p99 ms | in queue s | CPU s "
                "| queued |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for (peer, n, conns, _), rs in enqs:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            out.append(f"| {peer} | {rs[0]['enqueue_how']} | {n} | {conns} | {_f(_med(ok, 'wall_s'))} "
                       f"| {_f(_med(ok, 'msg_per_s'), 0)} | {_f(_med(ok, 'call_p50_ms'), 1)} "
                       f"| {_f(_med(ok, 'call_p99_ms'), 1)} | {_f(_med(ok, 'queued_s'))} | {_f(_med(ok, 'cpu_s'))} "
                       f"| {_delivered(rs)} |")
        out.append("")
    bigs = sorted(_groups(rows, "big"), key=_sort_key)
    if bigs:
        out += ["### Big message: one message into an idle daemon", "",
                "| peer | size | runs | idle RSS MB | peak RSS MB | growth MB | peak PSS MB | procs | s to sink "
                "| delivered |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for (peer, _, conns, _), rs in bigs:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            out.append(f"| {peer} | {conns} | {len(rs)} | {_f(_med(ok, 'idle_rss_mb'))} "
                       f"| {_f(_med(ok, 'peak_rss_mb'))} | {_f(_med(ok, 'growth_mb'))} | {_f(_med(ok, 'peak_pss_mb'))} "
                       f"| {_f(_med(ok, 'procs'), 0)} "
                       f"| {_f(_med(ok, 'wall_s'), 2)} | {_delivered(rs)} |")
        out.append("")
    out += targets(rows)
    return "\n".join(out) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """Every target of the issue, computed from these rows (medians over runs)."""

    def med(workload: str, peer: str, key: str, n: str | None = None, conns: str | None = None) -> float | None:
        rs = [r for r in rows if r["workload"] == workload and r["peer"] == peer and r["status"] == "ok"
              and (n is None or r["n"] == n) and (conns is None or r["conns"] == conns)]
        return _med(rs, key)

    def ns(workload: str, peer: str) -> list[str]:
        return sorted({r["n"] for r in rows if r["workload"] == workload and r["peer"] == peer},
                      key=lambda x: _num(x) or 0)

    out = ["### Targets", "", "| target | measured | ratio / value | required | verdict |", "|---|---|---:|---:|---|"]

    def add(name: str, measured: str, value: float | None, need: float, higher: bool, fmt: str = "{:.2f}") -> None:
        if value is None:
            rel = ">=" if higher else "<="
            out.append(f"| {name} | {measured or 'not measured'} | - | {rel} {need:g} | not measured |")
            return
        ok = value >= need if higher else value <= need
        out.append(f"| {name} | {measured} | {fmt.format(value)} | {'>=' if higher else '<='} {need:g} "
                   f"| {'**met**' if ok else '**not met**'} |")

    gm_ns = ns("drain", "greenmail") or ns("drain", "greenmail_p2")
    n_small = "10000" if "10000" in gm_ns else (gm_ns or [None])[0]
    pfs = [(p, med("drain", p, "msg_per_s", n_small)) for p in ("postfix", "postfix_conns")] if n_small else []
    pfs = [(p, v) for p, v in pfs if v]
    pf_name, pf = max(pfs, key=lambda x: x[1]) if pfs else ("postfix", None)
    anc = med("drain", "anchor_reuse", "msg_per_s", n_small, "10") if n_small else None
    sfx = f" (N={n_small})" if n_small and n_small != "10000" else ""
    # the default config (1 process), then with [delivery] processes = 2 when that was measured
    gms = [("greenmail", "")]
    if ns("drain", "greenmail_p2"):
        gms.append(("greenmail_p2", " (processes = 2)"))
    for gm, what in gms:
        gm10 = med("drain", gm, "msg_per_s", n_small, "10") if n_small else None
        add(f"drain N=10,000, 10 conns: >= 2x Postfix{sfx}{what}",
            f"{gm} {_f(gm10, 0)} / {pf_name} {_f(pf, 0)} msg/s" if gm10 and pf else "",
            gm10 / pf if gm10 and pf else None, 2, True)
    for gm, what in gms:
        gm10 = med("drain", gm, "msg_per_s", n_small, "10") if n_small else None
        add(f"drain N=10,000, 10 conns: >= 40% of smtp-source -d ceiling{sfx}{what}",
            f"{gm} {_f(gm10, 0)} / smtp-source -d {_f(anc, 0)} msg/s" if gm10 and anc else "",
            gm10 / anc if gm10 and anc else None, 0.4, True)
    big_ns = [x for x in ns("drain", "greenmail") if (_num(x) or 0) >= 100000]
    for conns in sorted({r["conns"] for r in rows if r["workload"] == "drain" and r["peer"] == "greenmail"},
                        key=lambda c: _num(c) or 0) or ["10"]:
        r10 = med("drain", "greenmail", "msg_per_s", "10000", conns)
        r100 = med("drain", "greenmail", "msg_per_s", big_ns[0], conns) if big_ns else None
        add(f"drain N=100,000, {conns} conns: rate >= 85% of the N=10,000 rate",
            f"{_f(r100, 0)} / {_f(r10, 0)} msg/s" if r10 and r100 else "",
            r100 / r10 if r10 and r100 else None, 0.85, True)
        rss = med("drain", "greenmail", "peak_rss_mb", big_ns[0], conns) if big_ns else None
        add(f"drain N=100,000, {conns} conns: peak RSS <= 100 MB", f"{_f(rss)} MB" if rss else "", rss, 100,
            False, "{:.1f} MB")
    slow = [r for r in rows if r["workload"] == "slow" and r["peer"] == "greenmail" and r["status"] == "ok"]
    if slow:
        conns, delay = slow[0]["conns"], slow[0]["delay_s"]
        rate = _med(slow, "msg_per_s")
        ideal = (_num(conns) or 0) / (_num(delay) or 1)
        add(f"slow relay, {conns} conns: >= 0.8 x conns / latency",
            f"{_f(rate, 0)} msg/s vs {conns} / {delay} s = {ideal:.0f} msg/s (N={slow[0]['n']})",
            rate / ideal, 0.8, True)
        rss = _med(slow, "peak_rss_mb")
        add(f"slow relay, {conns} conns: peak RSS <= 200 MB", f"{_f(rss)} MB", rss, 200, False, "{:.1f} MB")
    else:
        add("slow relay, 1,000 conns: >= 0.8 x conns / latency", "", None, 0.8, True)
        add("slow relay, 1,000 conns: peak RSS <= 200 MB", "", None, 200, False)
    p50 = med("latency", "greenmail", "p50_ms")
    p99 = med("latency", "greenmail", "p99_ms")
    m = sum(int(_num(r["n"]) or 0) for r in rows if r["workload"] == "latency" and r["peer"] == "greenmail")
    add("latency to an idle daemon: p50 <= 50 ms", f"{_f(p50)} ms over {m} messages" if p50 else "", p50, 50, False,
        "{:.1f} ms")
    add("latency to an idle daemon: p99 <= 250 ms", f"{_f(p99)} ms" if p99 else "", p99, 250, False, "{:.1f} ms")
    gmq = med("enqueue", "greenmail", "wall_s")
    pfq = med("enqueue", "postfix", "wall_s")
    en = (ns("enqueue", "greenmail") or ["?"])[0]
    add(f"enqueue N={en}, 4 parallel: `greenmail enqueue` no slower than Postfix sendmail "
        "(ratio = postfix s / greenmail s)",
        f"greenmail {_f(gmq)} s, postfix {_f(pfq)} s" if gmq and pfq else "", pfq / gmq if gmq and pfq else None,
        1, True)
    api = med("enqueue", "greenmail_api", "msg_per_s")
    add("API enqueue with fsync >= 1,000 msg/s", f"{_f(api, 0)} msg/s" if api else "", api, 1000, True, "{:.0f} msg/s")
    if ns("enqueue", "greenmail_api4"):  # the same target, 4 threads calling greenmail.enqueue() at once
        api4 = med("enqueue", "greenmail_api4", "msg_per_s")
        add("API enqueue with fsync >= 1,000 msg/s (4 threads)", f"{_f(api4, 0)} msg/s" if api4 else "", api4,
            1000, True, "{:.0f} msg/s")
    growth = med("big", "greenmail", "growth_mb")
    size = next((r["conns"] for r in rows if r["workload"] == "big" and r["peer"] == "greenmail"), "50 MB")
    add(f"{size} message: peak RSS growth < 20 MB", f"{_f(growth)} MB" if growth is not None else "", growth, 20,
        False, "{:.1f} MB")
    out.append("")
    return out


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

DEFAULT_DRAIN_PEERS = "greenmail,greenmail_p2,postfix,nullmailer,dma,anchor,anchor_reuse"
SLOW_PEERS = "greenmail,greenmail_p2,anchor_reuse"
LIVE_PEERS = "greenmail,postfix,nullmailer,dma"
ENQUEUE_PEERS = "greenmail,postfix,nullmailer,dma,greenmail_api,greenmail_api4"


def ints(s: str) -> list[int]:
    return [int(x.replace("_", "")) for x in s.split(",") if x]


def names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser, runs: int) -> None:
        p.add_argument("--runs", type=int, default=runs, help="repetitions (interleaved; median shown)")
        p.add_argument("--port", type=int, default=2625, help="sink port on 127.0.0.1 (latency sink: port+1)")
        p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<command>)")
        p.add_argument("--timeout", type=float, default=1800, help="seconds per drain")
        p.add_argument("--resume", type=Path, metavar="RESULTS_DIR",
                       help="continue an interrupted run: keep its successful measurements, do the rest")
        p.add_argument("--no-snapshot", action="store_true",
                       help="run greenmail from the working tree instead of a copy taken at start")
        p.add_argument("--gm-fill", choices=("api", "cli"), default="api",
                       help="how greenmail's queue is filled before a drain (default api; the enqueue "
                            "workload measures the CLI)")

    p = sub.add_parser("drain", help="N queued messages -> smtp-sink")
    common(p, 3)
    p.add_argument("--n", type=ints, default=[10000, 100000])
    p.add_argument("--conns", type=ints, default=[10, 100])
    p.add_argument("--peers", type=names, default=names(DEFAULT_DRAIN_PEERS))
    p.add_argument("--large-n", type=int, default=10000,
                   help="above this N only greenmail and the smtp-source ceilings run (0 = no limit)")
    p = sub.add_parser("slow", help="slow relay: smtp-sink -w DELAY, many connections")
    common(p, 3)
    p.add_argument("--n", type=ints, default=[10000])
    p.add_argument("--conns", type=ints, default=[1000])
    p.add_argument("--delay", type=int, default=2)
    p.add_argument("--peers", type=names, default=names(SLOW_PEERS))
    p = sub.add_parser("latency", help="enqueue -> sink latency, one message at a time")
    common(p, 1)
    p.add_argument("--m", type=int, default=200)
    p.add_argument("--peers", type=names, default=names(LIVE_PEERS))
    p = sub.add_parser("enqueue", help="enqueue N messages, P in parallel; API rate")
    common(p, 1)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--par", type=int, default=4)
    p.add_argument("--peers", type=names, default=names(ENQUEUE_PEERS))
    p = sub.add_parser("big", help="one big message: RSS growth of the idle daemon")
    common(p, 3)
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--peers", type=names, default=names("greenmail,postfix"))
    p = sub.add_parser("profile", help="py-spy profile of greenmail run --once draining N")
    common(p, 1)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--conns", type=int, default=10)
    p = sub.add_parser("all", help="every workload at full size")
    common(p, 3)
    p.add_argument("--skip", type=names, default=[], help="workloads to leave out, e.g. enqueue,profile")
    p = sub.add_parser("smoke", help="every workload, small sizes, 1 run")
    common(p, 1)
    p = sub.add_parser("table", help="re-render table.md from raw.tsv of results directories")
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="write table.md + raw.tsv here (default: the first dir)")
    return ap


def check_setup(peers: Iterable[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (private postfix, mount namespaces, /proc of other users)")
    need = {"smtp-sink", "smtp-source"}
    missing = [t for t in need if not shutil.which(t)]
    if missing or not GREENMAIL.exists():
        raise BenchError(f"missing {missing or GREENMAIL}: run bench/setup.sh first")
    for p in peers:
        if p in ("nullmailer", "dma") and not (PKG / p / ".unpacked").exists():
            raise BenchError(f"{p} is not unpacked in {PKG}: run bench/setup.sh first")


def main(argv: list[str]) -> int:
    if argv[:1] == ["_latsink"]:
        ns = argparse.ArgumentParser(prog="run.py _latsink")
        ns.add_argument("--port", type=int)
        ns.add_argument("--out")
        o = ns.parse_args(argv[1:])
        latsink_main(o.port, o.out)
        return 0
    if argv[:1] == ["_submit"]:
        submit_main(argv[1:])
        return 0
    args = parser().parse_args(argv)
    if args.cmd == "table":
        files = [d / "raw.tsv" for d in args.dirs]
        out = args.out or args.dirs[0]
        rows = Results.load(files)
        env = "\n".join((d / "env.txt").read_text() for d in args.dirs if (d / "env.txt").exists())
        out.mkdir(parents=True, exist_ok=True)
        if args.out:
            with open(out / "raw.tsv", "w") as f:
                f.write("\t".join(FIELDS) + "\n")
                for r in rows:
                    f.write("\t".join(r.get(k, "-") for k in FIELDS) + "\n")
        (out / "table.md").write_text(render(rows, env))
        print(render(rows, env))
        return 0

    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    out = args.resume or args.out or BENCH / "results" / f"{stamp}-{args.cmd}"
    ctx = Ctx(args.port, out, args.timeout, args.gm_fill)
    res = Results(out)
    if args.resume:
        if not (out / "raw.tsv").exists():
            raise BenchError(f"--resume: no {out / 'raw.tsv'}")
        old = Results.load([out / "raw.tsv"])
        res.rows = [r for r in old if r["status"] == "ok"]
        ctx.done = {(r["workload"], r["peer"], r["n"], r["conns"], r["run"]) for r in res.rows}
        log(f"resuming {out}: {len(res.rows)} measurements kept, {len(old) - len(res.rows)} failed ones redone")
    all_peers = set(getattr(args, "peers", None) or names(DEFAULT_DRAIN_PEERS + "," + LIVE_PEERS))
    check_setup(all_peers)
    WORK.mkdir(parents=True, exist_ok=True)
    import fcntl

    lock = open(WORK / ".lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise BenchError(f"another run.py (pid {lock.read().strip() or '?'}) is using {WORK}; wait for it, "
                         "or set GREENMAIL_BENCH_WORK and --port for a second one") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    become_subreaper()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    code = "" if args.no_snapshot else snapshot_greenmail(out.name, reuse=bool(args.resume))
    write_env(out, argv, code, resumed=bool(args.resume))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    log(f"results in {out}")
    t_start = time.monotonic()
    try:
        run_command(args, ctx, res)
    except KeyboardInterrupt:
        log("interrupted: stopping what we started")
        return 130
    except BenchError as e:
        log(f"error: {e}")
        return 1
    finally:
        for p in (Postfix(ctx), Nullmailer(ctx)):
            p.stop()
        kill_strays()
        if res.rows:
            env = (out / "env.txt").read_text() + f"total time: {(time.monotonic() - t_start) / 60:.1f} min\n"
            (out / "env.txt").write_text(env)
            text = render(res.rows, env)
            (out / "table.md").write_text(text)
            print(text)
            log(f"written: {out}/table.md, raw.tsv, env.txt")
    return 0


def run_command(args: argparse.Namespace, ctx: Ctx, res: Results) -> None:
    c = args.cmd
    if c == "drain":
        wl_drain(ctx, res, args.n, args.conns, args.runs, args.peers, args.large_n)
    elif c == "slow":
        wl_drain(ctx, res, args.n, args.conns, args.runs, args.peers, 0, "slow", args.delay)
    elif c == "latency":
        wl_latency(ctx, res, args.m, args.runs, args.peers)
    elif c == "enqueue":
        wl_enqueue(ctx, res, args.n, args.par, args.runs, args.peers)
    elif c == "big":
        wl_big(ctx, res, args.mb, args.runs, args.peers)
    elif c == "profile":
        wl_profile(ctx, args.n, args.conns)
    elif c == "smoke":
        wl_drain(ctx, res, [1000], [10], 1, names(DEFAULT_DRAIN_PEERS), 0)
        wl_drain(ctx, res, [2000], [1000], 1, names(SLOW_PEERS), 0, "slow", 2)
        wl_latency(ctx, res, 50, 1, names(LIVE_PEERS))
        wl_enqueue(ctx, res, 1000, 4, 1, names(ENQUEUE_PEERS))
        wl_big(ctx, res, 50, 1, ["greenmail", "postfix"])
    elif c == "all":
        skip = set(args.skip)
        if "latency" not in skip:
            wl_latency(ctx, res, 200, 1, names(LIVE_PEERS))
        if "big" not in skip:
            wl_big(ctx, res, 50, args.runs, ["greenmail", "postfix"])
        if "slow" not in skip:
            wl_drain(ctx, res, [10000], [1000], args.runs, names(SLOW_PEERS), 0, "slow", 2)
        if "drain" not in skip:
            wl_drain(ctx, res, [10000, 100000], [10, 100], args.runs, names(DEFAULT_DRAIN_PEERS), 10000)
        if "enqueue" not in skip:
            wl_enqueue(ctx, res, 10000, 4, 1, names(ENQUEUE_PEERS))
        if "profile" not in skip:
            wl_profile(ctx, 10000, 10)


if __name__ == "__main__":
    if sys.argv[1:2] not in (["_latsink"], ["_submit"]):
        py = VENV / "bin" / "python"
        if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as err:
        log(f"error: {err}")
        sys.exit(1)
