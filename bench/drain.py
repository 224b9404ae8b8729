"""The drain workload (also the slow relay): N messages queued with nothing delivering, then
timed from starting delivery until the sink has all N and the queue is empty, with CPU and
peak memory of the peer's process tree; every (N, run, conns, peer), interleaved."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.base import STALL, BenchError, log
from bench.peers import Ctx, Peer, make_peer
from bench.procs import TRACKED, kill_strays, reap_orphans, stop_proc
from bench.results import Results
from bench.sampling import Sampler, tree_cpu
from bench.sinks import SmtpSink

ALWAYS_AT_LARGE_N = ("greenmail", "greenmail_p2", "anchor", "anchor_reuse")


def measure_drain(
    ctx: Ctx, res: Results, peer: Peer, n: int, conns: int, run: int, workload: str = "drain", delay: int = 0
) -> None:
    if ctx.already(workload, peer.name, n, peer.conns_label(conns), run):
        return
    tag = f"{workload}-{peer.name}-n{n}-c{conns}-r{run}"
    ctx.new_rundir(tag)
    log(
        f"== {workload} {peer.name} N={n} conns={peer.conns_label(conns)} run {run}"
        + (f" (sink delay {delay}s)" if delay else "")
    )
    row = dict(
        workload=workload,
        peer=peer.name,
        n=n,
        conns=peer.conns_label(conns),
        delay_s=delay or None,
        run=run,
        enqueue_how=peer.fill_how,
    )
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
            peer.before_drain()
        sink = SmtpSink(ctx.port, ctx.rundir / "sink.log", delay, maxconn=max(1000, 2 * conns + 100)).start()
        sampler = Sampler([sink.pid])
        cpu0 = tree_cpu([sink.pid])
        db_cpu = getattr(peer, "db_cpu", None)  # a peer with a database server of its own
        db0 = db_cpu() if db_cpu else 0.0
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
        db = db_cpu() - db0 if db_cpu else None
        sampler.finish()
        time.sleep(0.5)  # late duplicates would show now
        delivered = sink.count()
        if status == "ok" and delivered != n:
            status = f"extra({delivered - n})"
        wall = t1 - t0
        row.update(
            status=status,
            delivered=f"{delivered}/{n}",
            wall_s=wall,
            msg_per_s=n / wall if status == "ok" else None,
            cpu_s=cpu,
            db_cpu_s=db,
            peak_rss_mb=sampler.peak_rss_kb / 1024,
            peak_pss_mb=sampler.peak_pss / 1024,
            procs=sampler.max_procs,
            first_s=t_first,
        )
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


def wl_drain(
    ctx: Ctx,
    res: Results,
    ns: list[int],
    conns_list: list[int],
    runs: int,
    peers: list[str],
    large_n: int,
    workload: str = "drain",
    delay: int = 0,
    make: Callable[[Ctx, str], Peer] = make_peer,
) -> None:
    """Every (N, run, conns, peer), interleaved: in each run every peer goes once."""
    skipped = set()
    for n in ns:
        for run in range(1, runs + 1):
            for ci, conns in enumerate(conns_list):
                for name in peers:
                    peer = make(ctx, name)
                    if not peer.per_conns and ci > 0:
                        continue  # its concurrency is its own: one row per (N, run)
                    if large_n and n > large_n and name not in ALWAYS_AT_LARGE_N:
                        if (name, n) not in skipped:
                            log(f"   skipping {name} at N={n} (above --large-n {large_n})")
                            skipped.add((name, n))
                        continue
                    measure_drain(ctx, res, peer, n, conns, run, workload, delay)
