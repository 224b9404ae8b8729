"""Running a command: the checks before a run, the lock on the work directory, the run with
what it started stopped afterwards, table.md at the end; and our helper subprocesses."""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from bench import targets
from bench.base import BENCH, GREENMAIL, PKG, REPO, WORK, BenchError, log
from bench.baseline import run_baseline
from bench.code import export_revision, snapshot_dir, snapshot_greenmail
from bench.drain import wl_drain
from bench.fill import fill_main, submit_main
from bench.listener import wl_listener
from bench.options import DEFAULT_DRAIN_PEERS, ENQUEUE_PEERS, LIVE_PEERS, SLOW_PEERS, names, parser
from bench.peers import Ctx, Nullmailer, Postfix
from bench.procs import become_subreaper, kill_strays
from bench.pyspy import wl_profile
from bench.report import render
from bench.results import Results, write_env
from bench.sinks import latsink_main
from bench.workloads import wl_big, wl_enqueue, wl_latency

README = BENCH / "README.md"


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


def table_command(args: argparse.Namespace) -> int:
    out = args.out or args.dirs[0]
    rows = Results.load([d / "raw.tsv" for d in args.dirs])
    env = "\n".join((d / "env.txt").read_text() for d in args.dirs if (d / "env.txt").exists())
    if args.out:
        merged = Results(out)
        merged.rows = rows
        merged.save()
    out.mkdir(parents=True, exist_ok=True)
    text = render(rows, env)
    (out / "table.md").write_text(text)
    print(text)
    return 0


def targets_command(args: argparse.Namespace) -> int:
    table = targets.markdown()
    if not args.check:
        print(table, end="")
        return 0
    if targets.readme_table(README.read_text()) == table:
        return 0
    log(
        f"{README}: its targets table differs from `bench/run.py targets --markdown` "
        "(or its markers are missing)"
    )
    return 1


def lock_workdir() -> IO[str]:
    """Hold an flock on WORK/.lock for the rest of the process: one run per work directory."""
    WORK.mkdir(parents=True, exist_ok=True)
    lock = open(WORK / ".lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise BenchError(
            f"another run.py (pid {lock.read().strip() or '?'}) is using {WORK}; wait for it, "
            "or set GREENMAIL_BENCH_WORK and --port for a second one"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def resume(ctx: Ctx, res: Results, out: Path) -> None:
    if not (out / "raw.tsv").exists():
        raise BenchError(f"--resume: no {out / 'raw.tsv'}")
    old = Results.load([out / "raw.tsv"])
    res.rows = [r for r in old if r["status"] == "ok"]
    ctx.done = {(r["workload"], r["peer"], r["n"], r["conns"], r["run"]) for r in res.rows}
    log(f"resuming {out}: {len(res.rows)} measurements kept, {len(old) - len(res.rows)} failed ones redone")


def main(argv: list[str], doc: str) -> int:
    args = parser(doc).parse_args(argv)
    if args.cmd == "table":
        return table_command(args)
    if args.cmd == "targets":
        return targets_command(args)
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    out = args.resume or args.out or BENCH / "results" / f"{stamp}-{args.cmd}"
    ctx = Ctx(args.port, out, args.timeout, args.gm_fill)
    res = Results(out)
    if args.resume:
        resume(ctx, res, out)
    peers = [args.baseline_peer] if getattr(args, "baseline", None) else getattr(args, "peers", None)
    check_setup(set(peers or names(DEFAULT_DRAIN_PEERS + "," + LIVE_PEERS)))
    lock = lock_workdir()  # noqa: F841 - held while the run lasts
    become_subreaper()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    code = "" if args.no_snapshot else snapshot_greenmail(out.name, reuse=bool(args.resume))
    if getattr(args, "baseline", None):
        code += f"{'; ' if code else ''}baseline revision {args.baseline} (greenmail/ exported, see the rows)"
        if args.tree:
            code += f"; the row greenmail is revision {args.tree}, exported likewise"
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
            finish(out, res, time.monotonic() - t_start)
    return 0


def finish(out: Path, res: Results, seconds: float) -> None:
    env = (out / "env.txt").read_text() + f"total time: {seconds / 60:.1f} min\n"
    (out / "env.txt").write_text(env)
    text = render(res.rows, env)
    (out / "table.md").write_text(text)
    print(text)
    log(f"written: {out}/table.md, raw.tsv, env.txt")


def run_command(args: argparse.Namespace, ctx: Ctx, res: Results) -> None:
    c = args.cmd
    if c == "drain" and args.baseline:
        new_code = REPO if args.no_snapshot else snapshot_dir(ctx.out.name)
        if args.tree:  # one revision against another (e.g. a change alone, before later features)
            new_code = export_revision(args.tree)[0]
        ns, conns = args.n or [10000], args.conns or [10]
        run_baseline(ctx, res, args.baseline, new_code, ns, conns, args.runs, args.baseline_peer)
    elif c == "drain":
        ns, conns = args.n or [10000, 100000], args.conns or [10, 100]
        wl_drain(ctx, res, ns, conns, args.runs, args.peers, args.large_n)
    elif c == "slow":
        wl_drain(ctx, res, args.n, args.conns, args.runs, args.peers, 0, "slow", args.delay)
    elif c == "latency":
        wl_latency(ctx, res, args.m, args.runs, args.peers)
    elif c == "enqueue":
        wl_enqueue(ctx, res, args.n, args.par, args.runs, args.peers)
    elif c == "big":
        wl_big(ctx, res, args.mb, args.runs, args.peers)
    elif c == "listener":
        wl_listener(ctx, res, args.n, args.sessions, args.runs, not args.no_e2e)
    elif c == "profile":
        wl_profile(ctx, args.n, args.conns)
    elif c == "smoke":
        smoke(ctx, res)
    elif c == "all":
        run_all(ctx, res, args.runs, set(args.skip))


def smoke(ctx: Ctx, res: Results) -> None:
    wl_drain(ctx, res, [1000], [10], 1, names(DEFAULT_DRAIN_PEERS), 0)
    wl_drain(ctx, res, [2000], [1000], 1, names(SLOW_PEERS), 0, "slow", 2)
    wl_latency(ctx, res, 50, 1, names(LIVE_PEERS))
    wl_enqueue(ctx, res, 1000, 4, 1, names(ENQUEUE_PEERS))
    wl_big(ctx, res, 50, 1, ["greenmail", "postfix"])


def run_all(ctx: Ctx, res: Results, runs: int, skip: set[str]) -> None:
    if "latency" not in skip:
        wl_latency(ctx, res, 200, 1, names(LIVE_PEERS))
    if "big" not in skip:
        wl_big(ctx, res, 50, runs, ["greenmail", "postfix"])
    if "slow" not in skip:
        wl_drain(ctx, res, [10000], [1000], runs, names(SLOW_PEERS), 0, "slow", 2)
    if "drain" not in skip:
        wl_drain(ctx, res, [10000, 100000], [10, 100], runs, names(DEFAULT_DRAIN_PEERS), 10000)
    if "enqueue" not in skip:
        wl_enqueue(ctx, res, 10000, 4, 1, names(ENQUEUE_PEERS))
    if "profile" not in skip:
        wl_profile(ctx, 10000, 10)


def run(argv: list[str], doc: str) -> int:
    """run.py's main: our helper subprocesses by their first word, else a subcommand."""
    helpers = {"_latsink": latsink_cmd, "_submit": submit_main, "_fill": fill_main}
    try:
        if argv[:1] and argv[0] in helpers:
            helpers[argv[0]](argv[1:])
            return 0
        return main(argv, doc)
    except BenchError as err:
        log(f"error: {err}")
        return 1


def latsink_cmd(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="run.py _latsink")
    ap.add_argument("--port", type=int)
    ap.add_argument("--out")
    o = ap.parse_args(argv)
    latsink_main(o.port, o.out)
