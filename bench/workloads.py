"""The workloads with an idle daemon or none: latency (one message at a time to an idle
daemon), enqueue (N messages into a stopped queue, and the API's rate) and one big message
(RSS growth). The drain workload is in bench/drain.py."""

from __future__ import annotations

import random
import resource
import statistics
import time
from pathlib import Path

from bench.base import MSG, RCPT, SENDER, WORK, BenchError, log, pct
from bench.fill import api_fill, submit_many
from bench.peers import Ctx, Greenmail, make_peer
from bench.procs import kill_strays, reap_orphans, tree
from bench.results import Results
from bench.sampling import Sampler, reset_hwm, tree_cpu
from bench.sinks import LatencySink, SmtpSink


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
                row.update(
                    status="ok" if len(lats) == m else "lost",
                    delivered=f"{len(lats)}/{m}",
                    p50_ms=pct(lats, 50) * 1000,
                    p90_ms=pct(lats, 90) * 1000,
                    p99_ms=pct(lats, 99) * 1000,
                    max_ms=max(lats, default=float("nan")) * 1000,
                    call_p50_ms=pct(calls, 50) * 1000,
                    call_p99_ms=pct(calls, 99) * 1000,
                )
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
                    row.update(
                        conns=conns,
                        enqueue_how="greenmail.enqueue() (fsync)",
                        wall_s=wall,
                        msg_per_s=n / wall,
                        call_p50_ms=f["call_p50_ms"],
                        call_p99_ms=f["call_p99_ms"],
                        queued_s=wall,
                        cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                        delivered=f"{q}/{n} queued",
                        status="ok" if q == n else "lost",
                    )
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
                    row.update(
                        conns=f"{par} par",
                        enqueue_how=how,
                        wall_s=f["wall_s"],
                        msg_per_s=n / f["wall_s"],
                        call_p50_ms=f["call_p50_ms"],
                        call_p99_ms=f["call_p99_ms"],
                        queued_s=f.get("queued_s", f["wall_s"]),
                        cpu_s=cpu,
                        delivered=f"{q}/{n} queued",
                        status="ok" if q == n and not f["errors"] else "lost",
                        note="; ".join(f["errors"][:2]) or None,
                    )
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
    head = b"From: <%s>\nTo: <%s>\nSubject: big message %d MB\nX-Bench-Id: big\n\n" % (
        SENDER.encode(),
        RCPT.encode(),
        mb,
    )
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
                row.update(
                    status=status,
                    delivered=f"{sink.count()}/1",
                    wall_s=wall,
                    idle_rss_mb=idle_rss / 1024,
                    peak_rss_mb=peak / 1024,
                    growth_mb=(peak - idle_rss) / 1024,
                    peak_pss_mb=sampler.peak_pss / 1024,
                    procs=sampler.max_procs,
                )
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
