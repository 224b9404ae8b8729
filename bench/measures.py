"""What each target measures: from a run's rows, the lines of one target (value, what was
measured, and what the line is when it is not the plain target). bench/targets.py names
these in its table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.query import Query, fmt, median_of, num
from bench.results import Row


@dataclass(frozen=True)
class Measured:
    value: float | None  # None: not measured
    text: str = ""  # the "measured" column
    qualifier: str = ""  # added to the target's name: what this line is, when not the plain target


def _sfx(n: str | None) -> str:
    return f" (N={n})" if n and n != "10000" else ""


def vs_postfix(q: Query) -> list[Measured]:
    n = q.small_n()
    pfs = [(p, q.med("drain", p, "msg_per_s", n)) for p in ("postfix", "postfix_conns")] if n else []
    pfs = [(p, v) for p, v in pfs if v]
    pf_name, pf = max(pfs, key=lambda x: x[1]) if pfs else ("postfix", None)
    out = []
    for gm, what in q.greenmails():
        gm10 = q.med("drain", gm, "msg_per_s", n, "10") if n else None
        ok = bool(gm10 and pf)
        out.append(
            Measured(
                gm10 / pf if ok else None,
                f"{gm} {fmt(gm10, 0)} / {pf_name} {fmt(pf, 0)} msg/s" if ok else "",
                _sfx(n) + what,
            )
        )
    return out


def vs_ceiling(q: Query) -> list[Measured]:
    n = q.small_n()
    anc = q.med("drain", "anchor_reuse", "msg_per_s", n, "10") if n else None
    out = []
    for gm, what in q.greenmails():
        gm10 = q.med("drain", gm, "msg_per_s", n, "10") if n else None
        ok = bool(gm10 and anc)
        out.append(
            Measured(
                gm10 / anc if ok else None,
                f"{gm} {fmt(gm10, 0)} / smtp-source -d {fmt(anc, 0)} msg/s" if ok else "",
                _sfx(n) + what,
            )
        )
    return out


def _drain_conns(q: Query) -> list[str]:
    conns = {r["conns"] for r in q.rows if r["workload"] == "drain" and r["peer"] == "greenmail"}
    return sorted(conns, key=lambda c: num(c) or 0) or ["10"]


def _big_n(q: Query) -> str | None:
    big = [x for x in q.ns("drain", "greenmail") if (num(x) or 0) >= 100000]
    return big[0] if big else None


def large_rate(q: Query) -> list[Measured]:
    out = []
    for conns in _drain_conns(q):
        r10 = q.med("drain", "greenmail", "msg_per_s", "10000", conns)
        big = _big_n(q)
        r100 = q.med("drain", "greenmail", "msg_per_s", big, conns) if big else None
        ok = bool(r10 and r100)
        out.append(
            Measured(
                r100 / r10 if ok else None,
                f"{fmt(r100, 0)} / {fmt(r10, 0)} msg/s" if ok else "",
                f" ({conns} conns)",
            )
        )
    return out


def large_rss(q: Query) -> list[Measured]:
    out = []
    for conns in _drain_conns(q):
        big = _big_n(q)
        rss = q.med("drain", "greenmail", "peak_rss_mb", big, conns) if big else None
        out.append(Measured(rss, f"{fmt(rss)} MB" if rss else "", f" ({conns} conns)"))
    return out


def _slow_rows(q: Query) -> list[Row]:
    return [r for r in q.rows if r["workload"] == "slow" and r["peer"] == "greenmail" and r["status"] == "ok"]


def slow_rate(q: Query) -> list[Measured]:
    slow = _slow_rows(q)
    if not slow:
        return [Measured(None)]
    conns, delay = slow[0]["conns"], slow[0]["delay_s"]
    rate = median_of(slow, "msg_per_s") or 0
    ideal = (num(conns) or 0) / (num(delay) or 1)
    return [
        Measured(
            rate / ideal if ideal else None,
            f"{fmt(rate, 0)} msg/s vs {conns} / {delay} s = {ideal:.0f} msg/s (N={slow[0]['n']})",
            "" if conns == "1000" else f" (measured at {conns} conns)",
        )
    ]


def slow_rss(q: Query) -> list[Measured]:
    slow = _slow_rows(q)
    rss = median_of(slow, "peak_rss_mb")
    conns = slow[0]["conns"] if slow else "1000"
    return [
        Measured(
            rss, f"{fmt(rss)} MB" if rss else "", "" if conns == "1000" else f" (measured at {conns} conns)"
        )
    ]


def latency(key: str) -> Callable[[Query], list[Measured]]:
    def measure(q: Query) -> list[Measured]:
        v = q.med("latency", "greenmail", key)
        m = sum(int(num(r["n"]) or 0) for r in q.select("latency", "greenmail"))
        return [Measured(v, f"{fmt(v)} ms over {m} messages" if v else "")]

    return measure


def enqueue_cli(q: Query) -> list[Measured]:
    gmq = q.med("enqueue", "greenmail", "wall_s")
    pfq = q.med("enqueue", "postfix", "wall_s")
    en = (q.ns("enqueue", "greenmail") or ["10000"])[0]
    ok = bool(gmq and pfq)
    return [
        Measured(
            pfq / gmq if ok else None,
            f"greenmail {fmt(gmq)} s, postfix {fmt(pfq)} s" if ok else "",
            "" if en == "10000" else f" (N={en})",
        )
    ]


def api(q: Query) -> list[Measured]:
    api = q.med("enqueue", "greenmail_api", "msg_per_s")
    out = [Measured(api, f"{fmt(api, 0)} msg/s" if api else "")]
    if q.ns("enqueue", "greenmail_api4"):
        api4 = q.med("enqueue", "greenmail_api4", "msg_per_s")
        out.append(Measured(api4, f"{fmt(api4, 0)} msg/s" if api4 else "", " (4 threads)"))
    return out


def big_growth(q: Query) -> list[Measured]:
    growth = q.med("big", "greenmail", "growth_mb")
    size = next((r["conns"] for r in q.rows if r["workload"] == "big" and r["peer"] == "greenmail"), "50 MB")
    return [
        Measured(
            growth,
            f"{fmt(growth)} MB" if growth is not None else "",
            "" if size == "50 MB" else f" (measured with {size})",
        )
    ]


def _listener_n(q: Query, workload: str) -> str | None:
    ns = q.ns(workload, "greenmail")
    return "10000" if "10000" in ns else (ns or [None])[0]


def listener_vs_postfix(workload: str, sessions: str) -> Callable[[Query], list[Measured]]:
    """greenmail's listener msg/s / Postfix smtpd's, same N and smtp-source sessions."""

    def measure(q: Query) -> list[Measured]:
        n = _listener_n(q, workload)
        gm = q.med(workload, "greenmail", "msg_per_s", n, sessions) if n else None
        pf = q.med(workload, "postfix", "msg_per_s", n, sessions) if n else None
        ok = bool(gm and pf)
        return [
            Measured(
                gm / pf if ok else None,
                f"greenmail {fmt(gm, 0)} / postfix {fmt(pf, 0)} msg/s" if ok else "",
                _sfx(n),
            )
        ]

    return measure


def listener_rss(q: Query) -> list[Measured]:
    n = _listener_n(q, "listener")
    v = q.med("listener", "greenmail", "peak_rss_mb", n, "100") if n else None
    return [Measured(v, f"{fmt(v)} MB" if v is not None else "", _sfx(n))]
