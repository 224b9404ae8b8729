"""table.md: one table per workload (medians over the runs, with min-max), the comparison
with a baseline revision when one ran, and the targets' verdicts."""

from __future__ import annotations

import statistics

from bench.baseline import comparison
from bench.query import fmt as _f
from bench.query import median_of as _med
from bench.query import num as _num
from bench.results import Row
from bench.targets import verdicts


def _groups(rows: list[Row], workload: str) -> list[tuple[tuple[str, ...], list[Row]]]:
    out: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:
        if r["workload"] == workload:
            out.setdefault((r["peer"], r["n"], r["conns"], r["delay_s"]), []).append(r)
    return list(out.items())


def _sort_key(item: tuple[tuple[str, ...], list[Row]]) -> tuple[float, float, float]:
    (peer, n, conns, _), _ = item
    order = [
        "greenmail",
        "greenmail_p2",
        "greenmail_pg",
        "greenmail_pg2",
        "greenmail_pg3",
        "postfix",
        "postfix_conns",
        "nullmailer",
        "dma",
        "anchor",
        "anchor_reuse",
        "greenmail_api",
        "greenmail_api4",
    ]
    rank = order.index(peer) if peer in order else 0.5 if peer.startswith("greenmail@") else 99
    return (_num(n) or 0, rank, _num(conns) or 0)


def _delivered(rs: list[Row]) -> str:
    if all(r["status"] == "ok" for r in rs):
        return f"all {rs[0]['delivered']}" if len(rs) > 1 else rs[0]["delivered"]
    return ", ".join(f"{r['delivered']} ({r['status']})" for r in rs)


def _rate_cells(rs: list[Row]) -> tuple[str, str]:
    ok = [r for r in rs if r["status"] == "ok"]
    rates = [x for x in (_num(r["msg_per_s"]) for r in ok) if x is not None]
    if not rates:
        return "-", "-"
    return _f(statistics.median(rates), 0), f"{min(rates):.0f}-{max(rates):.0f}"


def render(rows: list[Row], env: str = "") -> str:
    """table.md of these rows; ``env`` (env.txt) first, in a code block."""
    out = []
    if env:
        out += ["```", env.strip(), "```", ""]
    drains = sorted(_groups(rows, "drain"), key=_sort_key)
    if drains:
        out += [
            "### Drain: N queued messages -> smtp-sink",
            "",
            "| peer | N | conns | runs | msg/s | min-max | drain s | 1st msg s | CPU s | DB CPU s "
            "| peak RSS MB | peak PSS MB | procs | SMTP sessions | enqueue s (how) | delivered |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for (peer, n, conns, _), rs in drains:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            rate, mm = _rate_cells(rs)
            enq = _med(ok, "enqueue_s")
            how = rs[0]["enqueue_how"]
            out.append(
                f"| {peer} | {n} | {conns} | {len(rs)} | {rate} | {mm} | {_f(_med(ok, 'wall_s'), 2)} "
                f"| {_f(_med(ok, 'first_s'), 2)} "
                f"| {_f(_med(ok, 'cpu_s'))} | {_f(_med(ok, 'db_cpu_s'))} | {_f(_med(ok, 'peak_rss_mb'))} "
                f"| {_f(_med(ok, 'peak_pss_mb'))} | {_f(_med(ok, 'procs'), 0)} "
                f"| {_f(_med(ok, 'sessions'), 0)} "
                f"| {_f(enq) + ' (' + how + ')' if enq is not None else '-'} | {_delivered(rs)} |"
            )
        out.append("")
    slows = sorted(_groups(rows, "slow"), key=_sort_key)
    if slows:
        out += [
            "### Slow relay: smtp-sink -w DELAY (each DATA answered after DELAY s)",
            "",
            "| peer | N | conns | sink delay s | runs | msg/s | min-max | conns / delay | ratio | CPU s "
            "| peak RSS MB | SMTP sessions | delivered |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for (peer, n, conns, delay), rs in slows:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            rate, mm = _rate_cells(rs)
            ideal = (_num(conns) or 0) / (_num(delay) or 1)
            ratio = (
                (_med([r for r in rs if r["status"] == "ok"], "msg_per_s") or 0) / ideal if ideal else None
            )
            out.append(
                f"| {peer} | {n} | {conns} | {delay} | {len(rs)} | {rate} | {mm} | {ideal:.0f} "
                f"| {_f(ratio, 2)} | {_f(_med(ok, 'cpu_s'))} | {_f(_med(ok, 'peak_rss_mb'))} "
                f"| {_f(_med(ok, 'sessions'), 0)} | {_delivered(rs)} |"
            )
        out.append("")
    lats = sorted(_groups(rows, "latency"), key=_sort_key)
    if lats:
        out += [
            "### Latency: one message at a time to an idle daemon, enqueue returned -> sink has it",
            "",
            "| peer | messages | p50 ms | p90 ms | p99 ms | max ms | enqueue call p50 ms | delivered |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for (peer, _, _, _), rs in lats:
            out.append(
                f"| {peer} | {sum(int(_num(r['n']) or 0) for r in rs)} | {_f(_med(rs, 'p50_ms'))} "
                f"| {_f(_med(rs, 'p90_ms'))} | {_f(_med(rs, 'p99_ms'))} | {_f(_med(rs, 'max_ms'))} "
                f"| {_f(_med(rs, 'call_p50_ms'))} | {_delivered(rs)} |"
            )
        out.append("")
    enqs = sorted(_groups(rows, "enqueue"), key=_sort_key)
    if enqs:
        out += [
            "### Enqueue: N messages into a stopped queue",
            "",
            "| peer | how | N | parallel | wall s | msg/s | per call p50 ms | p99 ms | in queue s | CPU s "
            "| queued |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for (peer, n, conns, _), rs in enqs:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            out.append(
                f"| {peer} | {rs[0]['enqueue_how']} | {n} | {conns} | {_f(_med(ok, 'wall_s'))} "
                f"| {_f(_med(ok, 'msg_per_s'), 0)} | {_f(_med(ok, 'call_p50_ms'), 1)} "
                f"| {_f(_med(ok, 'call_p99_ms'), 1)} | {_f(_med(ok, 'queued_s'))} | {_f(_med(ok, 'cpu_s'))} "
                f"| {_delivered(rs)} |"
            )
        out.append("")
    bigs = sorted(_groups(rows, "big"), key=_sort_key)
    if bigs:
        out += [
            "### Big message: one message into an idle daemon",
            "",
            "| peer | size | runs | idle RSS MB | peak RSS MB | growth MB | peak PSS MB | procs | s to sink "
            "| delivered |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for (peer, _, conns, _), rs in bigs:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            out.append(
                f"| {peer} | {conns} | {len(rs)} | {_f(_med(ok, 'idle_rss_mb'))} "
                f"| {_f(_med(ok, 'peak_rss_mb'))} | {_f(_med(ok, 'growth_mb'))} "
                f"| {_f(_med(ok, 'peak_pss_mb'))} "
                f"| {_f(_med(ok, 'procs'), 0)} "
                f"| {_f(_med(ok, 'wall_s'), 2)} | {_delivered(rs)} |"
            )
        out.append("")
    out += _listener_tables(rows)
    out += comparison(rows)
    out += verdicts(rows)
    return "\n".join(out) + "\n"


def _listener_tables(rows: list[Row]) -> list[str]:
    out = []
    titles = {
        "listener": "### Listener: smtp-source -> SMTP server, relay not listening (accept rate)",
        "listener_e2e": "### Listener end to end: smtp-source -> SMTP server -> smtp-sink",
    }
    for workload, title in titles.items():
        groups = sorted(_groups(rows, workload), key=_sort_key)
        if not groups:
            continue
        out += [
            title,
            "",
            "| peer | N | sessions | runs | msg/s | min-max | wall s | smtp-source s | peak RSS MB "
            "| peak PSS MB | procs | delivered |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for (peer, n, conns, _), rs in groups:
            ok = [r for r in rs if r["status"] == "ok"] or rs
            rate, mm = _rate_cells(rs)
            out.append(
                f"| {peer} | {n} | {conns} | {len(rs)} | {rate} | {mm} | {_f(_med(ok, 'wall_s'), 2)} "
                f"| {_f(_med(ok, 'enqueue_s'), 2)} | {_f(_med(ok, 'peak_rss_mb'))} "
                f"| {_f(_med(ok, 'peak_pss_mb'))} | {_f(_med(ok, 'procs'), 0)} | {_delivered(rs)} |"
            )
        out.append("")
    return out
