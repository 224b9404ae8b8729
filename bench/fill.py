"""Putting messages into a queue: a submit command run N times, P at a time (``run.py
_submit`` does the same inside a mount namespace), greenmail's Python API from T threads
(``run.py _fill`` does it in a process whose PYTHONPATH selects the greenmail code), and
one message through a command."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.base import MSG, RCPT, SENDER, BenchError, pct


def submit_many(
    cmd: list[Any], n: int, par: int, msg: Path = MSG, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd < msg`` n times, ``par`` at a time (in ``env``, default ours); wall and per-call times."""
    cmd = [str(c) for c in cmd]
    counter = itertools.count()
    times: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        while next(counter) < n and len(errors) < 5:
            t = time.monotonic()
            with open(msg, "rb") as stdin:
                r = subprocess.run(
                    cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
                )
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


def api_fill(spool: Path, n: int, threads: int = 4) -> dict[str, Any]:
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
    return {
        "wall_s": time.monotonic() - t0,
        "calls": len(times),
        "errors": [],
        "call_p50_ms": pct(times, 50) * 1000,
        "call_p99_ms": pct(times, 99) * 1000,
    }


def fill_main(argv: list[str]) -> None:
    """``run.py _fill``: api_fill in this process, with the greenmail its PYTHONPATH selects."""
    ap = argparse.ArgumentParser(prog="run.py _fill")
    ap.add_argument("--spool", type=Path, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.write_text(json.dumps(api_fill(a.spool, a.n, a.threads)))


def run_stdin(cmd: list[Any], data: bytes | Path) -> None:
    cmd = [str(c) for c in cmd]
    if isinstance(data, Path):
        with open(data, "rb") as f:
            r = subprocess.run(cmd, stdin=f, capture_output=True)
    else:
        r = subprocess.run(cmd, input=data, capture_output=True)
    if r.returncode != 0:
        raise BenchError(f"{cmd[0]}: exit {r.returncode}: {r.stderr.decode(errors='replace')[:300]}")
