"""Observability end to end: the running daemon's /metrics, /healthz, logs, and a real Prometheus.

One daemon (``--log-format json``) sends to a scripted fault server (tests/faultserver.py)
in this process; a real ``prometheus`` (Debian package, loopback, own storage in tmp,
1 s scrape) scrapes it all along and loads conf/greenmail-rules.yml. Each fault scenario
checks the exact counter deltas read from the live /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import promtool_support as pt
import pytest
import support
from faultserver import FaultServer

import greenmail

pytestmark = pytest.mark.timeout(120)
BODY_MARKER = "BODY-MUST-NOT-BE-LOGGED-7f3a"
MESSAGE = f"Subject: observability\n\n{BODY_MARKER}\n".encode()
SCRAPE_TIMEOUT = 15


@dataclass
class Stack:
    tmp: Path
    relay: FaultServer
    relay_port: int
    metrics_port: int
    daemon: support.Process
    prometheus: pt.Prometheus | None = None
    queue_ids: dict[str, str] = field(default_factory=dict)

    def scrape(self) -> pt.Samples:
        return pt.parse(pt.metrics_text(self.metrics_port))

    def restart_relay(self) -> None:
        self.relay.stop()
        self.relay = FaultServer()
        self.relay.start(self.relay_port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    relay = FaultServer()
    relay_port = relay.start()
    mport = support.free_port()
    config = support.write_config(
        tmp,
        relay_port,
        metrics={"listen": f"127.0.0.1:{mport}"},
        delivery={"check_interval": 60, "connect_tries": 1, "max_connections": 4},
        retry={"bounce": False},
        timeouts={"connect": 2, "banner": 2, "command": 1, "data_init": 2, "data_block": 2, "data_end": 2},
    )
    d = support.daemon(config, tmp / "daemon.log", "--log-format", "json")
    s = Stack(tmp, relay, relay_port, mport, d)
    try:
        if shutil.which("prometheus"):  # scraping from the start, through every scenario
            s.prometheus = pt.Prometheus(tmp / "prometheus", f"127.0.0.1:{mport}")
        support.wait_until(lambda: healthz(mport)[0] == 200, timeout=15, what="/healthz 200")
        yield s
    finally:
        s.daemon.stop()
        s.relay.stop()
        if s.prometheus is not None:
            s.prometheus.stop()


@pytest.fixture
def prometheus(stack: Stack) -> pt.Prometheus:
    pt.need("prometheus")
    assert stack.prometheus is not None
    return stack.prometheus


def healthz(port: int) -> tuple[int, bytes]:
    try:
        return pt.http_get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except OSError:
        return 0, b""


# -- scenarios ----------------------------------------------------------------------------

K = pt.key
CONNECTED = {
    K("greenmail_connection_attempts_total", result="ok"): 1,
    K("greenmail_smtp_stage_reached_total", stage="banner"): 1,
    K("greenmail_smtp_replies_total", stage="banner", code="220"): 1,
    K("greenmail_smtp_stage_reached_total", stage="helo"): 1,
    K("greenmail_smtp_replies_total", stage="helo", code="250"): 1,
    K("greenmail_smtp_stage_reached_total", stage="mail"): 1,
    K("greenmail_smtp_replies_total", stage="mail", code="250"): 1,
    K("greenmail_smtp_stage_reached_total", stage="rcpt"): 1,
    K("greenmail_smtp_session_duration_seconds_count"): 1,
}
TO_DATA = {
    **CONNECTED,
    K("greenmail_smtp_replies_total", stage="rcpt", code="250"): 1,
    K("greenmail_smtp_stage_reached_total", stage="data"): 1,
    K("greenmail_smtp_replies_total", stage="data", code="354"): 1,
    K("greenmail_smtp_stage_reached_total", stage="message"): 1,
}
DEFERRED = {
    K("greenmail_delivery_attempts_total", result="deferred"): 1,
    K("greenmail_recipients_total", result="deferred"): 1,
}
# The fault server offers PIPELINING: MAIL, RCPT and DATA go out in one write, so DATA is
# reached (sent) even when the recipient is then refused; the server answers it 503.
PIPELINED_DATA = {K("greenmail_smtp_stage_reached_total", stage="data"): 1}
REFUSED_DATA = {**PIPELINED_DATA, K("greenmail_smtp_replies_total", stage="data", code="503"): 1}
SCENARIOS: dict[str, tuple[dict, dict]] = {
    "delivered": (
        {},
        {
            **TO_DATA,
            K("greenmail_smtp_replies_total", stage="message", code="250"): 1,
            K("greenmail_delivery_attempts_total", result="delivered"): 1,
            K("greenmail_recipients_total", result="delivered"): 1,
            K("greenmail_delivery_delay_seconds_count"): 1,
        },
    ),
    "451-on-rcpt": (
        {"rcpt": "451 4.7.1 greylisted, try again later"},
        {
            **CONNECTED,
            **DEFERRED,
            **REFUSED_DATA,
            K("greenmail_smtp_replies_total", stage="rcpt", code="451"): 1,
            K("greenmail_requeues_total", reason="temporary"): 1,
        },
    ),
    "550-on-rcpt": (
        {"rcpt": "550 5.1.1 no such user"},
        {
            **CONNECTED,
            **REFUSED_DATA,
            K("greenmail_smtp_replies_total", stage="rcpt", code="550"): 1,
            K("greenmail_delivery_attempts_total", result="failed"): 1,
            K("greenmail_recipients_total", result="failed"): 1,
        },
    ),
    "drop-mid-data": (
        {"message": "drop"},
        {**TO_DATA, **DEFERRED, K("greenmail_requeues_total", reason="connection"): 1},
    ),
    "stall": (
        {"rcpt": "stall"},
        {**CONNECTED, **DEFERRED, **PIPELINED_DATA, K("greenmail_requeues_total", reason="timeout"): 1},
    ),
    "refused-connect": (
        {},
        {
            K("greenmail_connection_attempts_total", result="refused"): 1,
            K("greenmail_smtp_session_duration_seconds_count"): 1,
        },
    ),
}
# Counters whose delta is compared exactly (everything of greenmail's but the scan counters,
# which also tick for the daemon's own requeues).
IGNORED = ("greenmail_spool_scans_total",)


def counter_deltas(before: pt.Samples, after: pt.Samples) -> dict:
    out = {}
    for k, v in after.items():
        name = k[0]
        if not name.startswith("greenmail_") or name in IGNORED:
            continue
        if name.endswith(("_total", "_count")) and v != before.get(k, 0):
            out[k] = v - before.get(k, 0)
    return out


def pretty(d: dict) -> dict[str, float]:
    return {f"{n}{dict(sorted(labels))}": v for (n, labels), v in sorted(d.items(), key=str)}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_counter_deltas(stack: Stack, scenario: str) -> None:
    script, expected = SCENARIOS[scenario]
    expected = {K("greenmail_messages_received_total", source="local"): 1, **expected}  # each enqueues one
    stack.relay.script = script
    if scenario == "refused-connect":
        stack.relay.stop()  # nothing listens on the relay port: ECONNREFUSED
    sessions = K("greenmail_smtp_session_duration_seconds_count")
    before = stack.scrape()
    qid = greenmail.enqueue(
        "sender@example.org", [f"{scenario}@example.net"], MESSAGE, spool=stack.tmp / "spool"
    )
    stack.queue_ids[scenario] = qid

    def settled() -> pt.Samples | None:
        now = stack.scrape()
        done = now[sessions] > before[sessions] and now[K("greenmail_connections_active")] == 0
        return now if done else None

    after = support.wait_until(settled, timeout=SCRAPE_TIMEOUT, interval=0.05, what=f"{scenario} session")
    assert pretty(counter_deltas(before, after)) == pretty(expected)
    wakeups = K("greenmail_spool_scans_total", trigger="wakeup")
    assert after[wakeups] > before[wakeups]  # picked up by a wake-up, not the periodic check
    if scenario == "refused-connect":
        stack.restart_relay()


def test_spool_gauges_follow_the_scenarios(stack: Stack) -> None:
    if len(stack.queue_ids) < len(SCENARIOS):
        pytest.skip("needs every scenario of test_counter_deltas first")
    states = ("queued", "deferred", "active", "failed")

    def spool() -> dict[str, float]:
        now = stack.scrape()
        return {s: now[K("greenmail_spool_messages", state=s)] for s in states}

    # 451, drop and stall wait for their retry; 550 failed; the refused one goes out within seconds
    # of the relay's return (the reconnect backoff), long before the next periodic check.
    settled = {"queued": 0, "deferred": 3, "active": 0, "failed": 1}
    support.wait_until(lambda: spool() == settled, 10, what="the refused message sent once the relay is back")
    now = stack.scrape()
    oldest = now[K("greenmail_spool_oldest_message_timestamp_seconds")]
    assert oldest == pytest.approx(int(stack.queue_ids["451-on-rcpt"][:13], 16) / 1e6)


# -- the live endpoint ----------------------------------------------------------------------


def test_promtool_check_metrics_on_the_live_output(stack: Stack) -> None:
    promtool = pt.need("promtool")
    text = pt.metrics_text(stack.metrics_port)
    assert "greenmail_delivery_delay_seconds_bucket" in text
    r = pt.run_tool(promtool, "check", "metrics", stdin=text.encode())
    assert r.returncode == 0, r.stdout + r.stderr


def test_http_routes(stack: Stack) -> None:
    status, body = healthz(stack.metrics_port)
    assert status == 200 and body.startswith(b"ok"), body
    for path in ("/", "/metric", "/metrics/x", "/healthz/"):
        assert pt.http_get(f"http://127.0.0.1:{stack.metrics_port}{path}")[0] == 404, path
    status, _ = pt.http_get(f"http://127.0.0.1:{stack.metrics_port}/metrics")
    assert status == 200


# -- a real Prometheus ----------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["all", "one"])
def test_every_dashboard_query_returns_data(stack: Stack, prometheus: pt.Prometheus, selection: str) -> None:
    """Every query, with the job and instance variables at "All" (.+) and at this daemon."""
    instance = f"127.0.0.1:{stack.metrics_port}"
    chosen = (
        {"job": pt.ALL, "instance": pt.ALL}
        if selection == "all"
        else {"job": "greenmail", "instance": instance}
    )
    support.wait_until(lambda: prometheus.query('up{job="greenmail"} == 1'), SCRAPE_TIMEOUT, what="a scrape")
    for title, expr in pt.dashboard_queries():
        if title.startswith("variable "):
            found = prometheus.series(pt.substitute(expr, **chosen))
            assert found and {s["instance"] for s in found} == {instance}, title
            continue
        query = pt.substitute(expr, **chosen)

        def answered(q: str = query) -> list:
            return prometheus.query(q)

        support.wait_until(answered, timeout=SCRAPE_TIMEOUT, interval=0.25, what=f"{title}: {query}")
    delivered = prometheus.query(
        f'greenmail_delivery_attempts_total{{instance="{instance}",result="delivered"}}'
    )
    failed = prometheus.query(f'greenmail_delivery_attempts_total{{instance="{instance}",result="failed"}}')
    assert float(delivered[0]["value"][1]) >= 1 and float(failed[0]["value"][1]) >= 1


def test_every_alert_rule_evaluates_without_error(prometheus: pt.Prometheus) -> None:
    def evaluated() -> list[dict] | None:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = support.wait_until(evaluated, timeout=SCRAPE_TIMEOUT, interval=0.25, what="rules evaluated")
    assert len(rules) == 10
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
        assert r["duration"] > 0 and r["labels"]["severity"] in ("warning", "critical"), r["name"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["name"]
        assert r["annotations"]["runbook_url"] == f"docs/runbook.md#{r['name'].lower()}", r["name"]
        prometheus.query(r["query"])  # and as an instant query


# -- logs and shutdown (last: they stop the daemon) ------------------------------------------

FIELDS = {"time", "level", "logger", "pid", "event", "message"}
DELIVERY_FIELDS = {"queue_id", "to", "relay", "delay", "delays", "attempts", "dsn", "status", "reply"}


def test_shutdown_is_clean_and_json_logs_carry_the_fields(stack: Stack) -> None:
    stack.daemon.signal(signal.SIGTERM)
    assert stack.daemon.wait(20) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.metrics_port), timeout=1).close()
    text = stack.daemon.text()
    assert BODY_MARKER not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert set(line) >= FIELDS, line
    events = [x["event"] for x in lines]
    assert events[0] == "config" and events.count("start") == 1 and events[-1] == "stop"
    assert lines[0]["config"]["relay.port"] == stack.relay_port
    deliveries = {x["to"]: x for x in lines if x["event"] == "delivery"}
    for x in deliveries.values():
        assert set(x) >= DELIVERY_FIELDS, x
        assert re.fullmatch(r"[0-9A-F]+", x["queue_id"]) and isinstance(x["attempts"], int)
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", x["dsn"]), x
        assert x["relay"] == f"127.0.0.1[127.0.0.1]:{stack.relay_port}"
        assert x["message"].startswith(f"{x['queue_id']}: to=<{x['to']}>, relay={x['relay']}, delay=")
        assert len(x["delays"]) == 4 and min(x["delays"]) >= 0, x
        assert abs(sum(x["delays"]) - x["delay"]) <= 0.03, x  # a + b + c + d = delay, each rounded
    if len(stack.queue_ids) == len(SCENARIOS):
        status = {to.split("@")[0]: (x["status"], x["dsn"]) for to, x in deliveries.items()}
        assert status == {
            "delivered": ("sent", "2.0.0"),
            "451-on-rcpt": ("deferred", "4.7.1"),
            "550-on-rcpt": ("bounced", "5.1.1"),
            "drop-mid-data": ("deferred", "4.4.2"),
            "stall": ("deferred", "4.4.2"),
            "refused-connect": ("sent", "2.0.0"),  # once the relay was back, without waiting for a check
        }


def test_text_log_line_is_postfix_style(tmp_path: Path) -> None:
    with FaultServer() as relay:
        config = support.write_config(tmp_path, relay.port)
        qid = support.enqueue(config, MESSAGE, "me@example.org", "you@example.net")
        r = support.greenmail("run", "--once", config=config)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert BODY_MARKER not in err
    line = re.compile(
        rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}[+-]\d\d:\d\d \S+ greenmail/smtp\[\d+\]: {qid}: "
        rf"to=<you@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port}, delay=\d+\.\d\d, "
        r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 queued\)"
    )
    assert any(line.fullmatch(x) for x in err.splitlines()), err
    assert re.search(rf"greenmail/qmgr\[\d+\]: {qid}: removed$", err, re.M), err
    assert re.search(r"greenmail/master\[\d+\]: configuration: spool\.path=", err), err
    assert re.search(r"greenmail/master\[\d+\]: greenmail started: ", err), err
