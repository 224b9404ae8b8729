"""Metric objects and the HTTP app that serves them.

Owns: every greenmail_* family of the contract, defined once on the
project's own registry (plus the process and GC collectors) with each
enumerated label value present at 0 from start-up; SpoolGauges, the spool
gauges as the queue moves messages (no disk is read during a scrape); the
WSGI app for /metrics and /healthz.
Must not touch: delivery logic, the spool, sockets (the daemon serves the app).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from greenmail import __version__
from greenmail.protocol import STAGES

# The classic text format, what generate_latest writes (prometheus_client >= 0.22 calls 1.0.0 "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEUE_REASONS = ("temporary", "timeout", "connection", "protocol", "shutdown")
RESULTS = ("delivered", "deferred", "failed")
CONNECT_RESULTS = ("ok", "refused", "timeout", "error")
SPOOL_STATES = ("queued", "deferred", "active", "failed")
SCAN_TRIGGERS = ("periodic", "wakeup")
# Reply codes pre-created per stage so dashboards see the common ones at 0.
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


class _Value:
    """A sample's value without prometheus_client's lock: only the hub's thread touches metrics.

    (Sessions, the queue and the /metrics handler are greenlets of one
    thread; the threadpool does file I/O only.)
    """

    __slots__ = ("v",)

    def __init__(self, v: float = 0.0) -> None:
        self.v = v

    def inc(self, amount: float = 1.0) -> None:
        self.v += amount

    def dec(self, amount: float = 1.0) -> None:
        self.v -= amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.v = float(value)

    def get(self) -> float:
        return self.v

    def set_exemplar(self, exemplar: Any) -> None:  # exemplars are not used
        pass

    def get_exemplar(self) -> None:
        return None


def _lock_free(sample: Any) -> Any:
    """A Counter or Gauge (child) whose inc/dec/set go straight to a plain value: the delivery
    path counts about a dozen events per message."""
    value = sample._value = _Value(sample._value.get())
    sample.inc, sample.set = value.inc, value.set
    if hasattr(sample, "dec"):
        sample.dec = value.dec
    return sample


def _lock_free_histogram(h: Any) -> None:
    """``h.observe`` as one bisect and two additions."""
    h._sum = _Value(h._sum.get())
    h._buckets = [_Value(b.get()) for b in h._buckets]
    bounds, buckets, total = list(h._upper_bounds), h._buckets, h._sum

    def observe(amount: float, exemplar: Any = None) -> None:
        total.v += amount
        buckets[bisect.bisect_left(bounds, amount)].v += 1  # le: the first bound >= amount

    h.observe = observe


def _cache_labels(metric: Any) -> None:
    """Make ``metric.labels(...)`` a dict lookup after the first call for each label set.

    prometheus_client validates and sorts the labels on every call; the
    delivery path calls it several times per message.
    """
    original = metric.labels
    cache: dict[tuple[Any, ...], Any] = {}

    def labels(*args: str, **kwargs: str) -> Any:
        key = args + tuple(kwargs.items())
        child = cache.get(key)
        if child is None:
            child = cache[key] = _lock_free(original(*args, **kwargs))
        return child

    metric.labels = labels


def _preset(metric: Any, label: str, values: Iterable[str]) -> None:
    for v in values:
        metric.labels(**{label: v})


class Metrics:
    """All of greenmail's metrics on one registry."""

    def __init__(self, max_connections: int = 0) -> None:
        disable_created_metrics()  # no *_created series: half the output, queried by nothing
        r = self.registry = CollectorRegistry()
        self.exposed: Any = r  # what /metrics serves: with several delivery processes, all of them
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        p = "greenmail_"
        self.stage_reached = Counter(p + "smtp_stage_reached", "SMTP stages reached", ["stage"], registry=r)
        self.replies = Counter(
            p + "smtp_replies", "SMTP replies by stage and code", ["stage", "code"], registry=r
        )
        self.requeues = Counter(p + "requeues", "Messages put back in the queue", ["reason"], registry=r)
        self.attempts = Counter(
            p + "delivery_attempts", "Delivery attempts by result", ["result"], registry=r
        )
        self.recipients = Counter(p + "recipients", "Recipients by result", ["result"], registry=r)
        self.bounces = Counter(p + "bounces", "Bounce messages generated", registry=r)
        self.expired = Counter(p + "messages_expired", "Messages given up after max_lifetime", registry=r)
        self.connects = Counter(p + "connection_attempts", "SMTP connection attempts", ["result"], registry=r)
        self.active = Gauge(p + "connections_active", "SMTP sessions open now", registry=r)
        self.max_connections = Gauge(p + "connections_max", "delivery.max_connections", registry=r)
        self.spool = Gauge(p + "spool_messages", "Messages in the spool by state", ["state"], registry=r)
        self.oldest = Gauge(
            p + "spool_oldest_message_timestamp_seconds", "Enqueue time of the oldest message", registry=r
        )
        self.scans = Counter(p + "spool_scans", "Spool scans by trigger", ["trigger"], registry=r)
        self.heartbeat = Gauge(
            p + "spool_scan_last_success_timestamp_seconds", "Heartbeat of the periodic check", registry=r
        )
        self.delay = Histogram(
            p + "delivery_delay_seconds", "Enqueue to final 250", buckets=DELAY_BUCKETS, registry=r
        )
        self.session_duration = Histogram(
            p + "smtp_session_duration_seconds",
            "SMTP session, connect to close",
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        build = Gauge(p + "build_info", "greenmail build", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        self.max_connections.set(max_connections)
        for metric in (self.stage_reached, self.replies, self.requeues, self.attempts, self.recipients,
                       self.connects, self.spool, self.scans):  # fmt: skip
            _cache_labels(metric)
        for metric in (self.bounces, self.expired, self.active, self.max_connections, self.oldest,
                       self.heartbeat):  # fmt: skip
            _lock_free(metric)
        _lock_free_histogram(self.delay)
        _lock_free_histogram(self.session_duration)
        self._reply_children: dict[tuple[str, int | None], Any] = {}
        self._preset()

    def _preset(self) -> None:
        _preset(self.stage_reached, "stage", STAGES)
        for stage, codes in COMMON_CODES.items():
            for code in codes:
                self.replies.labels(stage=stage, code=code)
        _preset(self.requeues, "reason", REQUEUE_REASONS)
        _preset(self.attempts, "result", RESULTS)
        _preset(self.recipients, "result", RESULTS)
        _preset(self.connects, "result", CONNECT_RESULTS)
        _preset(self.spool, "state", SPOOL_STATES)
        _preset(self.scans, "trigger", SCAN_TRIGGERS)

    def reply(self, stage: str, code: int | None) -> None:
        """Count a reply; ``None`` (or anything not 3 digits) is an unparseable one."""
        child = self._reply_children.get((stage, code))
        if child is None:
            label = str(code) if code is not None and 100 <= code <= 999 else "other"
            child = self._reply_children[(stage, code)] = self.replies.labels(stage=stage, code=label)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.exposed)


class SpoolGauges:
    """greenmail_spool_messages and the oldest-message timestamp, kept as messages move.

    The queue calls one method per event (indexed, claimed, dropped, settled),
    which only moves counts; the gauges read them when scraped, so they are
    right the moment a message moves. ``listed`` resyncs the active/failed
    counts from a directory listing at each periodic check (claims of other
    daemons, deletions by ``greenmail queue``). Every call is O(log n) at
    most: the oldest timestamp is a heap with lazy deletion.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._n = dict.fromkeys(SPOOL_STATES, 0)
        self._live: dict[str, float] = {}  # id -> enqueue time, for messages not yet settled
        self._claimed: dict[str, float] = {}  # the subset claimed by our sessions
        self._heap: list[tuple[float, str]] = []
        for state in SPOOL_STATES:
            metrics.spool.labels(state=state).set_function(lambda state=state: max(0, self._n[state]))
        metrics.oldest.set_function(self.oldest)

    def reindex(self) -> None:
        """The queue is about to re-index outgoing/ from scratch."""
        self._n["queued"] = self._n["deferred"] = 0
        self._live = dict(self._claimed)
        self._heap = [(t, q) for q, t in self._live.items()]
        heapq.heapify(self._heap)

    def indexed(self, qid: str, deferred: bool, enqueued: float | None) -> None:
        """A message waiting in outgoing/ entered the index."""
        self._n["deferred" if deferred else "queued"] += 1
        if enqueued and qid not in self._live:
            self._live[qid] = enqueued
            heapq.heappush(self._heap, (enqueued, qid))

    def claimed(self, qid: str, deferred: bool) -> None:
        """A session took an indexed message."""
        self._n["deferred" if deferred else "queued"] -= 1
        self._n["active"] += 1
        if qid in self._live:
            self._claimed[qid] = self._live[qid]

    def dropped(self, qid: str, deferred: bool) -> None:
        """An indexed message vanished (claimed elsewhere, deleted, corrupt)."""
        self._n["deferred" if deferred else "queued"] -= 1
        self._forget(qid)

    def settled(self, qid: str, result: str) -> None:
        """A claim ended: delivered, failed, or back to outgoing/ (deferred, released)."""
        self._n["active"] -= 1
        self._claimed.pop(qid, None)
        if result == "failed":
            self._n["failed"] += 1
        if result in ("delivered", "failed"):
            self._forget(qid)

    def listed(self, active: int, failed: int) -> None:
        """Resync from a listing of outgoing_active/ and failed/."""
        self._n["active"], self._n["failed"] = active, failed

    def oldest(self) -> float:
        """Enqueue time of the oldest message not yet settled; 0 when there is none."""
        self._trim()
        return self._heap[0][0] if self._heap else 0

    def _forget(self, qid: str) -> None:
        self._live.pop(qid, None)
        self._claimed.pop(qid, None)
        self._trim()  # messages mostly leave oldest first: the heap stays small

    def _trim(self) -> None:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)


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
