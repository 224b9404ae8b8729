"""Drains of this tree's greenmail and of a baseline revision's, interleaved (A B A B ...,
the same N and connections, one sink, one machine), and the comparison of the two: the
ratio of the median rates with the spread of the per-round ratios."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.base import log
from bench.code import export_revision
from bench.drain import wl_drain
from bench.peers import Ctx, Greenmail
from bench.peers.greenmail_pg import GreenmailPg
from bench.query import fmt, num
from bench.results import Results, Row

# The peers a baseline can run as: this tree's rows are "<peer>", the baseline's "<peer>@<commit>".
PEERS = {"greenmail": Greenmail, "greenmail_pg": GreenmailPg}


def run_baseline(
    ctx: Ctx,
    res: Results,
    rev: str,
    new_code: Path,
    ns: list[int],
    conns_list: list[int],
    runs: int,
    peer: str = "greenmail",
) -> None:
    """``runs`` rounds per (N, conns), each a drain of this tree then one of ``rev``, as ``peer``."""
    base_code, commit = export_revision(rev)
    base = f"{peer}@{commit}"
    log(f"baseline {rev} = {commit}: greenmail/ exported to {base_code}; this tree from {new_code}")

    def make(ctx: Ctx, name: str) -> Greenmail:
        return PEERS[peer](ctx, code=new_code if name == peer else base_code, name=name)

    for name in (peer, base):
        log(f"   {name} imports greenmail from {make(ctx, name).check_code()}")

    wl_drain(ctx, res, ns, conns_list, runs, [peer, base], 0, make=make)


def _rates(rows: list[Row], key: str = "msg_per_s") -> dict[str, float]:
    """{run: value} of the successful rows."""
    return {r["run"]: v for r in rows if r["status"] == "ok" and (v := num(r[key])) is not None}


def _per_1000(new: list[Row], old: list[Row], n: str, key: str) -> str:
    """The median of ``key`` per 1,000 messages, this tree / the baseline."""
    this = [c / (num(n) or 1) * 1000 for c in _rates(new, key).values()]
    base = [c / (num(n) or 1) * 1000 for c in _rates(old, key).values()]
    return f"{fmt(statistics.median(this), 2)} / {fmt(statistics.median(base), 2)}" if this and base else "-"


def _spread(vals: list[float], nd: int = 0) -> str:
    return f"{fmt(statistics.median(vals), nd)} ({fmt(min(vals), nd)}-{fmt(max(vals), nd)})" if vals else "-"


def comparison(rows: list[Row]) -> list[str]:
    """The section of table.md comparing this tree with each baseline that ran (none: empty)."""
    drains = [r for r in rows if r["workload"] == "drain"]
    bases = sorted({r["peer"] for r in drains if r["peer"].partition("@")[0] in PEERS and "@" in r["peer"]})
    out: list[str] = []
    for base in bases:
        new_peer, _, commit = base.partition("@")
        db = any(num(r["db_cpu_s"]) is not None for r in drains if r["peer"] == base)
        out += [
            f"### This tree against {commit}: drain of {new_peer}, interleaved",
            "",
            "| N | conns | rounds | this tree msg/s (min-max) | baseline msg/s (min-max) | ratio of medians "
            "| per-round ratios (min-max) | CPU s per 1,000 msg, this / baseline |"
            + (" DB CPU s per 1,000 msg, this / baseline |" if db else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if db else ""),
        ]
        keys = sorted(
            {(r["n"], r["conns"]) for r in drains if r["peer"] == base},
            key=lambda k: (num(k[0]) or 0, num(k[1]) or 0),
        )
        for n, conns in keys:

            def sel(peer: str, n: str = n, conns: str = conns) -> list[Row]:
                return [r for r in drains if r["peer"] == peer and r["n"] == n and r["conns"] == conns]

            new, old = _rates(sel(new_peer)), _rates(sel(base))
            rounds = sorted(set(new) & set(old), key=lambda x: num(x) or 0)
            per_round = [new[k] / old[k] for k in rounds]
            ratio = statistics.median(new.values()) / statistics.median(old.values()) if new and old else None
            cpu = _per_1000(sel(new_peer), sel(base), n, "cpu_s")
            if db:
                cpu += f" | {_per_1000(sel(new_peer), sel(base), n, 'db_cpu_s')}"
            spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
            out.append(
                f"| {n} | {conns} | {len(rounds)} | {_spread(list(new.values()))} "
                f"| {_spread(list(old.values()))} | {fmt(ratio, 3)} | {spread} | {cpu} |"
            )
        out.append("")
    return out
