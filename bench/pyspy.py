"""The profile workload: ``py-spy record`` of ``greenmail run --once`` draining N messages,
and the summary of its raw stacks (profile.md): where the hub thread's time goes."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.base import PYSPY, BenchError, log
from bench.fill import api_fill
from bench.peers import Ctx, Greenmail
from bench.procs import kill_strays
from bench.sinks import SmtpSink


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
            r = subprocess.run(
                [
                    str(PYSPY),
                    "record",
                    "-r",
                    str(rate),
                    "--threads",
                    "--nolineno",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--",
                    *map(str, gm.run_cmd("--once")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wall = time.monotonic() - t0
        time.sleep(0.3)
        got = sink.count()
    finally:
        sink.stop()
        kill_strays()
    if r.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {(ctx.rundir / 'py-spy.log').read_text()[-400:]}")
    text = summarize_profile(
        raw,
        rate,
        wall,
        header=(
            f"`greenmail run --once` draining N={n} queued messages, max_connections={conns}, into "
            f"smtp-sink on 127.0.0.1: delivered {got}/{n} in {wall:.1f} s under py-spy "
            f"({n / wall:.0f} msg/s; sampling at {rate} Hz slows it down)."
        ),
    )
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
        path = frame[frame.rfind("(") + 1 :].rstrip(")")
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
        f"Profile: {header}",
        "",
        f"Hub thread busy in {n_hub} of ~{possible:.0f} possible samples "
        f"({100 * n_hub / possible:.0f}% of the wall time); {threads - 1} threadpool workers busy for "
        f"{n_pool} samples ({100 * n_pool / possible:.0f}% of one thread's wall time). "
        "Percentages below are of the busy samples of the hub thread unless said otherwise.",
        "",
        "Hub thread, by area (module of the innermost frame: where the CPU is):",
        "",
        *table(tally(hub_s, lambda f: [area(f[-1])]), n_hub, "area", 12),
        "",
        "Hub thread, by the innermost greenmail function on the stack "
        "(itself + what it calls outside greenmail):",
        "",
        *table(tally(hub_s, lambda f: [innermost_gm(f)]), n_hub, "greenmail function"),
        "",
        "Hub thread, inclusive (a sample counts for every greenmail function on its stack):",
        "",
        *table(tally(hub_s, lambda f: {x for x in f if "greenmail/" in x}), n_hub, "greenmail function"),
        "",
        "Hub thread, leaf functions "
        "(C calls such as socket send/recv show as the gevent function making them):",
        "",
        *table(tally(hub_s, lambda f: [f[-1]]), n_hub, "function", 10),
        "",
        "Threadpool workers (offloaded file work), by innermost greenmail function, % of their busy samples:",
        "",
        *table(tally(pool, lambda f: [innermost_gm(f)]), n_pool, "greenmail function", 8),
        "",
    ]
    return "\n".join(lines)
