"""The performance targets, as one table (TARGETS), and what is computed from it: each
target's verdict from a run's rows (the Targets section of table.md) and the README's
table of targets (``run.py targets --markdown``; ``--check`` compares it with the README)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.results import Row


def num(v: str | None) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def median_of(rows: list[Row], key: str) -> float | None:
    vals = [x for x in (num(r.get(key)) for r in rows) if x is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}".replace(",", " ")


class Query:
    """Medians over the successful rows of one run."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def select(self, workload: str, peer: str, n: str | None = None, conns: str | None = None) -> list[Row]:
        return [
            r
            for r in self.rows
            if r["workload"] == workload
            and r["peer"] == peer
            and r["status"] == "ok"
            and (n is None or r["n"] == n)
            and (conns is None or r["conns"] == conns)
        ]

    def med(
        self, workload: str, peer: str, key: str, n: str | None = None, conns: str | None = None
    ) -> float | None:
        return median_of(self.select(workload, peer, n, conns), key)

    def ns(self, workload: str, peer: str) -> list[str]:
        return sorted(
            {r["n"] for r in self.rows if r["workload"] == workload and r["peer"] == peer},
            key=lambda x: num(x) or 0,
        )

    def small_n(self) -> str | None:
        """The N of the drain comparisons: 10,000 when measured, else the smallest."""
        gm_ns = self.ns("drain", "greenmail") or self.ns("drain", "greenmail_p2")
        return "10000" if "10000" in gm_ns else (gm_ns or [None])[0]

    def greenmails(self) -> list[tuple[str, str]]:
        """(peer, qualifier): the default configuration, and processes = 2 when measured."""
        gms = [("greenmail", "")]
        if self.ns("drain", "greenmail_p2"):
            gms.append(("greenmail_p2", " (processes = 2)"))
        return gms


@dataclass(frozen=True)
class Measured:
    value: float | None  # None: not measured
    text: str = ""  # the "measured" column
    qualifier: str = ""  # added to the target's name: what this line is, when not the plain target


@dataclass(frozen=True)
class Target:
    name: str
    need: float
    higher: bool  # met when the value is >= need; else when it is <= need
    unit: str  # "" for a ratio
    how: str  # how it is computed (the README's table)
    measure: Callable[[Query], list[Measured]]

    @property
    def required(self) -> str:
        return f"{'>=' if self.higher else '<='} {self.need:g}" + (f" {self.unit}" if self.unit else "")

    def shown(self, value: float) -> str:
        if not self.unit:
            return f"{value:.2f}"
        return f"{value:.0f} {self.unit}" if self.unit == "msg/s" else f"{value:.1f} {self.unit}"

    def met(self, value: float) -> bool:
        return value >= self.need if self.higher else value <= self.need


def _sfx(n: str | None) -> str:
    return f" (N={n})" if n and n != "10000" else ""


def _vs_postfix(q: Query) -> list[Measured]:
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


def _vs_ceiling(q: Query) -> list[Measured]:
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


def _large_rate(q: Query) -> list[Measured]:
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


def _large_rss(q: Query) -> list[Measured]:
    out = []
    for conns in _drain_conns(q):
        big = _big_n(q)
        rss = q.med("drain", "greenmail", "peak_rss_mb", big, conns) if big else None
        out.append(Measured(rss, f"{fmt(rss)} MB" if rss else "", f" ({conns} conns)"))
    return out


def _slow_rows(q: Query) -> list[Row]:
    return [r for r in q.rows if r["workload"] == "slow" and r["peer"] == "greenmail" and r["status"] == "ok"]


def _slow_rate(q: Query) -> list[Measured]:
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


def _slow_rss(q: Query) -> list[Measured]:
    slow = _slow_rows(q)
    rss = median_of(slow, "peak_rss_mb")
    conns = slow[0]["conns"] if slow else "1000"
    return [
        Measured(
            rss, f"{fmt(rss)} MB" if rss else "", "" if conns == "1000" else f" (measured at {conns} conns)"
        )
    ]


def _latency(key: str) -> Callable[[Query], list[Measured]]:
    def measure(q: Query) -> list[Measured]:
        v = q.med("latency", "greenmail", key)
        m = sum(int(num(r["n"]) or 0) for r in q.select("latency", "greenmail"))
        return [Measured(v, f"{fmt(v)} ms over {m} messages" if v else "")]

    return measure


def _enqueue_cli(q: Query) -> list[Measured]:
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


def _api(q: Query) -> list[Measured]:
    api = q.med("enqueue", "greenmail_api", "msg_per_s")
    out = [Measured(api, f"{fmt(api, 0)} msg/s" if api else "")]
    if q.ns("enqueue", "greenmail_api4"):
        api4 = q.med("enqueue", "greenmail_api4", "msg_per_s")
        out.append(Measured(api4, f"{fmt(api4, 0)} msg/s" if api4 else "", " (4 threads)"))
    return out


def _big_growth(q: Query) -> list[Measured]:
    growth = q.med("big", "greenmail", "growth_mb")
    size = next((r["conns"] for r in q.rows if r["workload"] == "big" and r["peer"] == "greenmail"), "50 MB")
    return [
        Measured(
            growth,
            f"{fmt(growth)} MB" if growth is not None else "",
            "" if size == "50 MB" else f" (measured with {size})",
        )
    ]


TARGETS: tuple[Target, ...] = (
    Target(
        "drain N=10,000, 10 conns: >= 2x Postfix",
        2,
        True,
        "",
        "greenmail msg/s at 10 connections / the best Postfix row at N=10,000 (`postfix` at its defaults, or "
        "`postfix_conns` when measured); a second line for `greenmail_p2` (processes = 2) when measured",
        _vs_postfix,
    ),
    Target(
        "drain N=10,000, 10 conns: >= 40% of the smtp-source -d ceiling",
        0.4,
        True,
        "",
        "greenmail msg/s / `anchor_reuse` msg/s, both at 10 connections (and the `greenmail_p2` line)",
        _vs_ceiling,
    ),
    Target(
        "drain N=100,000: rate >= 85% of the N=10,000 rate",
        0.85,
        True,
        "",
        "greenmail msg/s at N=100,000 / at N=10,000, same connections; one line per connection count",
        _large_rate,
    ),
    Target(
        "drain N=100,000: peak RSS <= 100 MB",
        100,
        False,
        "MB",
        "greenmail's peak RSS during the N=100,000 drain; one line per connection count",
        _large_rss,
    ),
    Target(
        "slow relay, 1,000 conns: >= 0.8 x conns / latency",
        0.8,
        True,
        "",
        "msg/s / (1000 / DELAY). The per-message latency is the sink's DATA delay (2 s by default); protocol "
        "round trips on loopback add well under 1%.",
        _slow_rate,
    ),
    Target(
        "slow relay, 1,000 conns: peak RSS <= 200 MB",
        200,
        False,
        "MB",
        "greenmail's peak RSS during the slow-relay drain",
        _slow_rss,
    ),
    Target(
        "latency to an idle daemon: p50 <= 50 ms",
        50,
        False,
        "ms",
        "the latency workload, greenmail row",
        _latency("p50_ms"),
    ),
    Target(
        "latency to an idle daemon: p99 <= 250 ms",
        250,
        False,
        "ms",
        "the latency workload, greenmail row",
        _latency("p99_ms"),
    ),
    Target(
        "enqueue N=10,000, 4 parallel: `greenmail enqueue` no slower than Postfix sendmail",
        1,
        True,
        "",
        "Postfix wall s / greenmail wall s (time until the last call returned), both 4 in parallel",
        _enqueue_cli,
    ),
    Target(
        "API enqueue with fsync >= 1,000 msg/s",
        1000,
        True,
        "msg/s",
        "`greenmail_api` msg/s, one thread (and a line for `greenmail_api4`, 4 threads, when measured)",
        _api,
    ),
    Target(
        "50 MB message: peak RSS growth <= 20 MB",
        20,
        False,
        "MB",
        "the big-message workload, greenmail row: peak RSS - idle RSS",
        _big_growth,
    ),
)


def verdicts(rows: list[Row]) -> list[str]:
    """The Targets section of table.md: every target's lines, met or not, from these rows."""
    q = Query(rows)
    out = [
        "### Targets",
        "",
        "| target | measured | ratio / value | required | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for t in TARGETS:
        for m in t.measure(q):
            name = t.name + m.qualifier
            if m.value is None:
                out.append(f"| {name} | {m.text or 'not measured'} | - | {t.required} | not measured |")
            else:
                verdict = "**met**" if t.met(m.value) else "**not met**"
                out.append(f"| {name} | {m.text} | {t.shown(m.value)} | {t.required} | {verdict} |")
    out.append("")
    return out


def markdown() -> str:
    """The README's table of targets."""
    lines = ["| target | required | how it is computed |", "|---|---:|---|"]
    lines += [f"| {t.name} | {t.required} | {t.how} |" for t in TARGETS]
    return "\n".join(lines) + "\n"


BEGIN, END = (
    "<!-- targets table: generated by `bench/run.py targets --markdown` -->",
    "<!-- end of targets table -->",
)


def readme_table(readme: str) -> str | None:
    """The generated table as it stands in the README (between the markers), or None."""
    if BEGIN not in readme or END not in readme:
        return None
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
