"""greenmail's metrics: plain counts, exported through prometheus_client's public collector API.

Owns: every greenmail_* family (its name, help, labels and the label values
present at 0 from start-up), the counts themselves as plain numbers (only the
hub's thread changes them: sessions, the queue and the /metrics handler are
greenlets of one thread, so no lock is taken on the delivery path), the
collector that turns them into families at scrape time, plain snapshots that
delivery processes send to process 0 and the sum of them, and the WSGI app for
/metrics and /healthz. The queue gauges are not kept here: they are asked of
the queue when scraped (``queue_gauges``).
Must not touch: delivery logic, the spool, sockets (the daemon serves the app).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from greenmail import __version__
from greenmail.protocol import STAGES

# The classic text format, what generate_latest writes (prometheus_client >= 0.22 calls 1.0.0 "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEUE_REASONS = ("temporary", "timeout", "connection", "protocol", "shutdown")
RESULTS = ("delivered", "deferred", "failed")
CONNECT_RESULTS = ("ok", "refused", "timeout", "error")
SPOOL_STATES = ("queued", "deferred", "active", "failed", "held")
SCAN_TRIGGERS = ("periodic", "wakeup")
# Reply codes present per stage from start-up, so dashboards see the common ones at 0.
COMMON_CODES: dict[str, tuple[str, ...]] = {
    "banner": ("220", "421", "554"),
    "helo": ("250", "421", "502", "550"),
    "mail": ("250", "421", "451", "452", "550", "553"),
    "rcpt": ("250", "421", "450", "451", "452", "550", "551", "552", "553"),
    "data": ("354", "421", "451", "554"),
    "message": ("250", "421", "451", "452", "552", "554"),
    "starttls": ("220", "454", "501"),
    "auth": ("235", "334", "454", "535"),
}
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

# The counter families: key -> (name without _total, help, label names, label values present at 0).
COUNTERS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "stage": ("smtp_stage_reached", "SMTP stages reached", ("stage",), STAGES),
    "reply": (
        "smtp_replies",
        "SMTP replies by stage and code",
        ("stage", "code"),
        tuple(f"{s} {c}" for s, codes in COMMON_CODES.items() for c in codes),
    ),
    "requeue": ("requeues", "Messages put back in the queue", ("reason",), REQUEUE_REASONS),
    "attempt": ("delivery_attempts", "Delivery attempts by result", ("result",), RESULTS),
    "recipient": ("recipients", "Recipients by result", ("result",), RESULTS),
    "bounce": ("bounces", "Bounce messages generated", (), ("",)),
    "expired": ("messages_expired", "Messages given up after max_lifetime", (), ("",)),
    "connect": ("connection_attempts", "SMTP connection attempts", ("result",), CONNECT_RESULTS),
    "scan": ("spool_scans", "Spool scans by trigger", ("trigger",), SCAN_TRIGGERS),
    "received": ("messages_received", "Messages the daemon saw arrive", ("source",), ("smtp", "local")),
    "listener_connection": (
        "listener_connections",
        "SMTP clients of the listener",
        ("result",),
        ("accepted", "refused"),
    ),
    "listener_message": (
        "listener_messages",
        "Transactions the listener ended",
        ("result",),
        ("queued", "rejected"),
    ),
}
HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "delay": ("delivery_delay_seconds", "Enqueue to final 250", DELAY_BUCKETS),
    "session": ("smtp_session_duration_seconds", "SMTP session, connect to close", SESSION_BUCKETS),
}
Snapshot = dict[str, Any]  # plain, JSON-friendly: see Metrics.snapshot
QueueGauges = Callable[[], tuple[dict[str, int], float]]


def _no_queue() -> tuple[dict[str, int], float]:
    return dict.fromkeys(SPOOL_STATES, 0), 0.0


class Metrics:
    """All of greenmail's counts, and the registry that exports them."""

    def __init__(self, max_connections: int = 0) -> None:
        self.counts: dict[str, dict[str, float]] = {
            key: dict.fromkeys(preset, 0.0) for key, (_, _, _, preset) in COUNTERS.items()
        }
        self.histograms: dict[str, list[float]] = {
            k: [0.0] * (len(b) + 2) for k, (_, _, b) in HISTOGRAMS.items()
        }
        self.active = 0  # SMTP sessions open now
        self.listener_active = 0  # clients of the SMTP listener now
        self.max_connections = max_connections
        self.heartbeat = 0.0  # time of the last periodic check
        self.queue_gauges: QueueGauges = _no_queue  # set by the daemon: the queue's counts and oldest
        self.others: Callable[[], list[Snapshot]] = list  # other delivery processes' snapshots
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_Families(self))
        self._stage, self._reply = self.counts["stage"], self.counts["reply"]
        self._reply_keys: dict[tuple[str, int | None], str] = {}

    # -- counting (called on the delivery path: plain dictionary updates) -----------------

    def count(self, key: str, label: str = "", amount: float = 1.0) -> None:
        """Add to one counter family's label value (see COUNTERS for the keys)."""
        values = self.counts[key]
        values[label] = values.get(label, 0.0) + amount

    def stage(self, stage: str) -> None:
        self._stage[stage] += 1

    def reply(self, stage: str, code: int | None) -> None:
        """Count a reply; ``None`` (or anything not 3 digits) is an unparseable one."""
        key = self._reply_keys.get((stage, code))
        if key is None:
            label = str(code) if code is not None and 100 <= code <= 999 else "other"
            key = self._reply_keys[(stage, code)] = f"{stage} {label}"
        self._reply[key] = self._reply.get(key, 0.0) + 1

    def observe(self, key: str, value: float) -> None:
        """One observation of a histogram ("delay" or "session")."""
        h = self.histograms[key]
        h[bisect.bisect_left(HISTOGRAMS[key][2], value)] += 1  # le: the first bound >= value
        h[-1] += value

    def value(self, key: str, label: str = "") -> float:
        return self.counts[key].get(label, 0.0)

    # -- snapshots: what a delivery process reports, and their sum -------------------------

    def snapshot(self) -> Snapshot:
        """This process's counts and gauges as plain data."""
        queue, oldest = self.queue_gauges()
        return {
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "histograms": {k: list(v) for k, v in self.histograms.items()},
            "active": self.active,
            "queue": dict(queue),
            "oldest": oldest,
        }

    def total(self) -> Snapshot:
        """This process's snapshot with every other process's added in."""
        return combine([self.snapshot(), *self.others()])

    def render(self) -> bytes:
        return generate_latest(self.registry)


def combine(snaps: Iterable[Snapshot]) -> Snapshot:
    """The sum of snapshots: counts, histograms, sessions and queue states added; the earliest oldest."""
    out: Snapshot = {"counts": {}, "histograms": {}, "active": 0, "queue": {}, "oldest": 0.0}
    for snap in snaps:
        for key, values in snap.get("counts", {}).items():
            mine = out["counts"].setdefault(key, {})
            for label, v in values.items():
                mine[label] = mine.get(label, 0.0) + v
        for key, values in snap.get("histograms", {}).items():
            mine = out["histograms"].setdefault(key, [0.0] * len(values))
            out["histograms"][key] = [a + b for a, b in zip(mine, values, strict=True)]
        out["active"] += snap.get("active", 0)
        for state, n in snap.get("queue", {}).items():
            out["queue"][state] = out["queue"].get(state, 0) + n
        oldest = snap.get("oldest", 0.0)
        if oldest and (not out["oldest"] or oldest < out["oldest"]):
            out["oldest"] = oldest
    return out


def retired(snap: Snapshot) -> Snapshot:
    """What stays of an ended process's snapshot in the sums: its counts, not its gauges."""
    return {"counts": snap.get("counts", {}), "histograms": snap.get("histograms", {})}


class _Families(Collector):
    """The greenmail_* families, made from the counts (and the other processes') at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        total = self.m.total()
        yield from _counters(total["counts"])
        yield from _histograms(total["histograms"])
        p = "greenmail_"
        yield GaugeMetricFamily(p + "connections_active", "SMTP sessions open now", value=total["active"])
        yield GaugeMetricFamily(
            p + "connections_max", "delivery.max_connections", value=self.m.max_connections
        )
        yield GaugeMetricFamily(
            p + "listener_sessions_active", "Clients of the SMTP listener now", value=self.m.listener_active
        )
        spool = GaugeMetricFamily(p + "spool_messages", "Messages in the queue by state", labels=["state"])
        for state in SPOOL_STATES:
            spool.add_metric([state], total["queue"].get(state, 0))
        yield spool
        yield GaugeMetricFamily(
            p + "spool_oldest_message_timestamp_seconds",
            "Enqueue time of the oldest message not yet delivered",
            value=total["oldest"],
        )
        yield GaugeMetricFamily(
            p + "spool_scan_last_success_timestamp_seconds",
            "Heartbeat of the periodic check",
            value=self.m.heartbeat,
        )
        build = GaugeMetricFamily(p + "build_info", "greenmail build", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


def _counters(counts: dict[str, dict[str, float]]) -> Iterator[CounterMetricFamily]:
    for key, (name, doc, labels, _) in COUNTERS.items():
        family = CounterMetricFamily("greenmail_" + name, doc, labels=list(labels))
        for label, value in counts.get(key, {}).items():
            family.add_metric(label.split(" ") if labels else [], value)
        yield family


def _histograms(histograms: dict[str, list[float]]) -> Iterator[HistogramMetricFamily]:
    for key, (name, doc, bounds) in HISTOGRAMS.items():
        h = histograms.get(key) or [0.0] * (len(bounds) + 2)
        cumulative, buckets = 0.0, []
        for bound, n in zip((*(str(float(b)) for b in bounds), "+Inf"), h[:-1], strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("greenmail_" + name, doc, buckets=buckets, sum_value=h[-1])


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def wsgi_app(metrics: Metrics, healthy: Callable[[], tuple[bool, str]]) -> Callable[..., Iterable[bytes]]:
    """/metrics in the Prometheus text format, /healthz 200 or 503, 404 otherwise."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = metrics.render()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE)])
            return [body]
        if path == "/healthz":
            ok, why = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app
