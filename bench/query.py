"""Reading a run's rows: numbers from raw.tsv cells, medians over successful rows, and the
number format of the tables."""

from __future__ import annotations

import statistics

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
