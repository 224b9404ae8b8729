"""What a measured process tree costs: CPU seconds (live descendants plus reaped children)
and peak memory (RSS, PSS and the kernel's VmHWM), sampled in a background thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import threading
import time
from collections.abc import Iterable

from bench.procs import proc_table, reap_orphans, tree

CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


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
        with contextlib.suppress(OSError):
            ticks += cpu_ticks(pid)
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
