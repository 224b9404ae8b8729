"""The performance targets, as one table (TARGETS), and what is made from it: each target's
verdict from a run's rows (the Targets section of table.md) and the README's table of
targets (``run.py targets --markdown``; ``--check`` compares it with the README)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import measures
from bench.measures import Measured
from bench.query import Query
from bench.results import Row


@dataclass(frozen=True)
class Target:
    """One performance target: its verdict comes from ``measure``, its README row from the rest."""

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


# The targets: name (as in table.md and the README), the required value, met when the value is
# >= it (higher) or <= it, its unit ("" for a ratio), how it is computed, and its measure.
# fmt: off
TARGETS: tuple[Target, ...] = (
    Target("drain N=10,000, 10 conns: >= 2x Postfix", 2, True, "",
           "greenmail msg/s at 10 connections / the best Postfix row at N=10,000 (`postfix` at its "
           "defaults, or `postfix_conns` when measured); a second line for `greenmail_p2` "
           "(processes = 2) when measured",
           measures.vs_postfix),
    Target("drain N=10,000, 10 conns: >= 40% of the smtp-source -d ceiling", 0.4, True, "",
           "greenmail msg/s / `anchor_reuse` msg/s, both at 10 connections (and the `greenmail_p2` line)",
           measures.vs_ceiling),
    Target("drain N=100,000: rate >= 85% of the N=10,000 rate", 0.85, True, "",
           "greenmail msg/s at N=100,000 / at N=10,000, same connections; one line per connection count",
           measures.large_rate),
    Target("drain N=100,000: peak RSS <= 100 MB", 100, False, "MB",
           "greenmail's peak RSS during the N=100,000 drain; one line per connection count",
           measures.large_rss),
    Target("slow relay, 1,000 conns: >= 0.8 x conns / latency", 0.8, True, "",
           "msg/s / (1000 / DELAY). The per-message latency is the sink's DATA delay (2 s by default); "
           "protocol round trips on loopback add well under 1%.",
           measures.slow_rate),
    Target("slow relay, 1,000 conns: peak RSS <= 200 MB", 200, False, "MB",
           "greenmail's peak RSS during the slow-relay drain",
           measures.slow_rss),
    Target("latency to an idle daemon: p50 <= 50 ms", 50, False, "ms",
           "the latency workload, greenmail row",
           measures.latency("p50_ms")),
    Target("latency to an idle daemon: p99 <= 250 ms", 250, False, "ms",
           "the latency workload, greenmail row",
           measures.latency("p99_ms")),
    Target("enqueue N=10,000, 4 parallel: `greenmail enqueue` no slower than Postfix sendmail", 1, True, "",
           "Postfix wall s / greenmail wall s (time until the last call returned), both 4 in parallel",
           measures.enqueue_cli),
    Target("API enqueue with fsync >= 1,000 msg/s", 1000, True, "msg/s",
           "`greenmail_api` msg/s, one thread (and a line for `greenmail_api4`, 4 threads, when measured)",
           measures.api),
    Target("50 MB message: peak RSS growth <= 20 MB", 20, False, "MB",
           "the big-message workload, greenmail row: peak RSS - idle RSS",
           measures.big_growth),
    Target("listener, 10 sessions: accept rate >= 1.5x Postfix smtpd", 1.5, True, "",
           "`smtp-source -s 10 -l 2048` into greenmail's listener / into a Postfix smtpd, relay not "
           "listening (all N stay queued): N / smtp-source's wall time, greenmail / postfix",
           measures.listener_vs_postfix("listener", "10")),
    Target("listener, 100 sessions: accept rate >= 1.5x Postfix smtpd", 1.5, True, "",
           "as above with `-s 100`",
           measures.listener_vs_postfix("listener", "100")),
    Target("listener end to end, 10 sessions: >= 1.5x Postfix", 1.5, True, "",
           "smtp-source -> server -> smtp-sink: N / the time until the sink has all N, greenmail / postfix",
           measures.listener_vs_postfix("listener_e2e", "10")),
    Target("listener, 100 sessions: peak RSS <= 100 MB", 100, False, "MB",
           "greenmail's peak RSS while accepting from 100 smtp-source sessions (smtp-source not counted)",
           measures.listener_rss),
)
# fmt: on


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
