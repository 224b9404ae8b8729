"""Paths and constants of the harness, its log line and error, and small stdlib helpers
(counting queue files, whether a port listens, percentiles)."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = REPO / ".venv"
PYTHON = VENV / "bin" / "python"
RUN_PY = BENCH / "run.py"  # the entry point, also for our helper subprocesses (_latsink, _submit, _fill)
WORK = Path(os.environ.get("GREENMAIL_BENCH_WORK", "/tmp/greenmail-bench"))
PKG = WORK / "pkg"  # dpkg -x trees made by setup.sh
GREENMAIL = VENV / "bin" / "greenmail"
PYSPY = VENV / "bin" / "py-spy"
MNTNS = BENCH / "mntns.sh"
MSG = BENCH / "message.eml"
SENDER, RCPT = "bench-from@greenmail.test", "bench-to@sink.test"
STALL = 120  # seconds without a new message at the sink: the drain is given up


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


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
