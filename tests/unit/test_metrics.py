"""Unit tests of greenmail.metrics, greenmail.logfmt, the shipped dashboard and the alert rules.

No sockets: the WSGI app is called directly, the spool gauges are driven through a real
Outbox on a spool in tmp_path, the dashboard is checked as data (and through promtool's
PromQL parser when promtool is installed).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import promtool_support as pt
import pytest

from greenmail import layout, logfmt
from greenmail.config import RetryConfig, from_dict
from greenmail.metrics import (
    CONNECT_RESULTS,
    REQUEUE_REASONS,
    RESULTS,
    SCAN_TRIGGERS,
    SPOOL_STATES,
    Metrics,
    wsgi_app,
)
from greenmail.outbox import Attempt, Outbox
from greenmail.protocol import STAGES
from greenmail.spool import Spool
from greenmail.spoolqueue import SpoolQueue

# The contract's families (section 6): name -> (type, {label: enumerated values}).
CONTRACT: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "greenmail_smtp_stage_reached": ("counter", {"stage": STAGES}),
    "greenmail_smtp_replies": ("counter", {}),
    "greenmail_requeues": ("counter", {"reason": REQUEUE_REASONS}),
    "greenmail_delivery_attempts": ("counter", {"result": RESULTS}),
    "greenmail_recipients": ("counter", {"result": RESULTS}),
    "greenmail_bounces": ("counter", {}),
    "greenmail_messages_expired": ("counter", {}),
    "greenmail_connection_attempts": ("counter", {"result": CONNECT_RESULTS}),
    "greenmail_connections_active": ("gauge", {}),
    "greenmail_connections_max": ("gauge", {}),
    "greenmail_spool_messages": ("gauge", {"state": SPOOL_STATES}),
    "greenmail_spool_oldest_message_timestamp_seconds": ("gauge", {}),
    "greenmail_spool_scans": ("counter", {"trigger": SCAN_TRIGGERS}),
    "greenmail_spool_scan_last_success_timestamp_seconds": ("gauge", {}),
    "greenmail_delivery_delay_seconds": ("histogram", {}),
    "greenmail_smtp_session_duration_seconds": ("histogram", {}),
    "greenmail_build_info": ("gauge", {}),
    # contract section 8
    "greenmail_listener_connections": ("counter", {"result": ("accepted", "refused")}),
    "greenmail_listener_messages": ("counter", {"result": ("queued", "rejected")}),
    "greenmail_listener_sessions_active": ("gauge", {}),
    "greenmail_messages_received": ("counter", {"source": ("smtp", "local")}),
}


def render(m: Metrics) -> str:
    return m.render().decode()


def value(m: Metrics, name: str, **labels: str) -> float:
    return pt.parse(render(m))[pt.key(name, **labels)]


# -- the families -----------------------------------------------------------------------


def test_every_contract_family_with_its_type() -> None:
    fams = pt.families(render(Metrics(7)))
    for name, (kind, _) in CONTRACT.items():
        assert fams.get(name) == kind, name
    own = {n for n in fams if n.startswith("greenmail_")}
    assert own == set(CONTRACT)


def test_enumerated_label_values_are_present_at_zero_from_start_up() -> None:
    samples = pt.parse(render(Metrics(7)))
    for name, (kind, labels) in CONTRACT.items():
        suffix = "_total" if kind == "counter" else ""
        for label, values in labels.items():
            for v in values:
                assert samples[pt.key(name + suffix, **{label: v})] == 0, (name, v)
    assert samples[pt.key("greenmail_bounces_total")] == 0
    assert samples[pt.key("greenmail_delivery_delay_seconds_count")] == 0
    assert samples[pt.key("greenmail_smtp_replies_total", stage="rcpt", code="451")] == 0
    assert {s for s, _ in (k for k in samples if k[0] == "greenmail_smtp_replies_total")} and all(
        dict(k[1])["stage"] in STAGES for k in samples if k[0] == "greenmail_smtp_replies_total"
    )


def test_gauges_at_start_up() -> None:
    m = Metrics(7)
    assert value(m, "greenmail_connections_max") == 7
    assert value(m, "greenmail_connections_active") == 0
    assert value(m, "greenmail_build_info", version=__import__("greenmail").__version__) == 1


def test_process_and_gc_collectors_and_no_created_series() -> None:
    names = pt.sample_names(render(Metrics()))
    assert "process_cpu_seconds_total" in names
    assert "python_gc_collections_total" in names
    assert not [n for n in names if n.endswith("_created")]


def test_own_registry_each_time() -> None:
    a, b = Metrics(), Metrics()
    a.count("bounce")
    assert value(b, "greenmail_bounces_total") == 0


@pytest.mark.parametrize(
    ("code", "label"), [(250, "250"), (451, "451"), (None, "other"), (0, "other"), (42, "other")]
)
def test_reply_code_label(code: int | None, label: str) -> None:
    m = Metrics()
    m.reply("rcpt", code)
    assert value(m, "greenmail_smtp_replies_total", stage="rcpt", code=label) == 1


def test_promtool_check_metrics_at_start_up() -> None:
    r = pt.run_tool(pt.need("promtool"), "check", "metrics", stdin=Metrics(3).render())
    assert r.returncode == 0, r.stdout + r.stderr


# -- the HTTP app -----------------------------------------------------------------------


def call(app: Any, path: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
    return seen["status"], seen["headers"], body


def test_wsgi_routes() -> None:
    m = Metrics()
    health = {"now": (True, "ok")}
    app = wsgi_app(m, lambda: health["now"])
    status, headers, body = call(app, "/metrics")
    assert status.startswith("200") and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"greenmail_spool_messages" in body
    assert call(app, "/healthz")[0].startswith("200")
    health["now"] = (False, "stale")
    status, _, body = call(app, "/healthz")
    assert status.startswith("503") and body == b"stale\n"
    for path in ("/", "/metrics/", "/favicon.ico", "/healthz/x"):
        assert call(app, path)[0].startswith("404"), path


def daemon_for(tmp_path: Path, interval: float = 1) -> Any:
    from greenmail.daemon import Daemon

    raw = {"spool": {"path": "spool"}, "delivery": {"check_interval": interval}, "metrics": {"listen": ""}}
    d = Daemon(from_dict(raw, tmp_path))
    d.queue.spool.ensure()
    return d


def test_healthz_follows_the_heartbeat_and_the_spool(tmp_path: Path) -> None:
    d = daemon_for(tmp_path, interval=1)
    assert d._healthy()[0] is False  # no check yet
    d.scheduler.last_check = time.time()
    assert d._healthy() == (True, d._healthy()[1])
    d.scheduler.last_check = time.time() - 2.9
    assert d._healthy()[0] is True
    d.scheduler.last_check = time.time() - 3.1  # older than three intervals
    ok, why = d._healthy()
    assert not ok and "stale" in why
    d.scheduler.last_check = time.time()
    (tmp_path / "spool" / "tmp").rmdir()  # not writable: root ignores modes, a missing dir it cannot
    ok, why = d._healthy()
    assert not ok and "writable" in why


# -- spool gauges -----------------------------------------------------------------------


def spool_gauges(m: Metrics) -> dict[str, float]:
    return {s: value(m, "greenmail_spool_messages", state=s) for s in SPOOL_STATES}


def gauged(tmp_path: Path) -> tuple[Spool, Metrics, SpoolQueue, Outbox]:
    spool = Spool(tmp_path / "spool", owner="me")
    spool.ensure()
    m = Metrics()
    q = SpoolQueue(spool)
    m.queue_gauges = q.gauges
    return spool, m, q, Outbox(q, RetryConfig(bounce=False), m)


def test_spool_gauges_follow_each_event(tmp_path: Path) -> None:
    spool, m, q, ob = gauged(tmp_path)
    first = spool.enqueue("a@example.org", ["x@example.net"], b"Subject: 1\n\nbody\n")
    time.sleep(0.002)
    spool.enqueue("a@example.org", ["y@example.net"], b"Subject: 2\n\nbody\n")
    q.refresh()
    assert spool_gauges(m) == {"queued": 2, "deferred": 0, "active": 0, "failed": 0, "held": 0}
    oldest = value(m, "greenmail_spool_oldest_message_timestamp_seconds")
    assert abs(oldest - int(first[:13], 16) / 1e6) < 1e-6
    # the kernel stamps files with a coarse clock, a few ms behind the id's: the gauge keeps to the id
    (file,) = (tmp_path / "spool" / "outgoing").glob(first + "*")
    os.utime(file, (oldest - 1, oldest - 1))

    claim = ob.take()
    assert claim is not None and claim.id == first
    assert spool_gauges(m) == {"queued": 1, "deferred": 0, "active": 1, "failed": 0, "held": 0}
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == oldest  # active is not delivered
    ob.finish(claim)  # nothing settled: deferred
    assert spool_gauges(m) == {"queued": 1, "deferred": 1, "active": 0, "failed": 0, "held": 0}

    second = ob.take()
    assert second is not None
    ob.finish(second, Attempt({"y@example.net": ("delivered", "250 ok")}))
    assert spool_gauges(m) == {"queued": 0, "deferred": 1, "active": 0, "failed": 0, "held": 0}
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == oldest

    third = spool.enqueue("a@example.org", ["z@example.net"], b"Subject: 3\n\nbody\n")
    q.wakeup()
    claim = ob.take()
    assert claim is not None and claim.id == third
    ob.finish(claim, Attempt({"z@example.net": ("failed", "550 no")}))
    assert spool_gauges(m) == {"queued": 0, "deferred": 1, "active": 0, "failed": 1, "held": 0}

    held = spool.enqueue("a@example.org", ["h@example.net"], b"Subject: 4\n\nbody\n")
    spool.hold(held)
    q.refresh()
    q.maintain()  # the periodic check: a full re-index and a listing agree with the events
    assert spool_gauges(m) == {"queued": 0, "deferred": 1, "active": 0, "failed": 1, "held": 1}
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == oldest


def test_oldest_timestamp_moves_on_and_drops_to_zero(tmp_path: Path) -> None:
    spool, m, q, ob = gauged(tmp_path)
    a = spool.enqueue("s@example.org", ["a@example.net"], b"Subject: a\n\nbody\n")
    time.sleep(0.002)
    b = spool.enqueue("s@example.org", ["b@example.net"], b"Subject: b\n\nbody\n")
    q.refresh()
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == layout.id_time(a)
    claim = ob.take()
    ob.finish(claim, Attempt({"a@example.net": ("delivered", "250 ok")}))
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == layout.id_time(b)
    claim = ob.take()
    ob.release(claim, "shutdown")  # back to outgoing/: still waiting
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == layout.id_time(b)
    spool.delete(b)  # by `greenmail queue delete`
    q.refresh()
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == 0
    assert spool_gauges(m) == dict.fromkeys(SPOOL_STATES, 0)


def test_reindex_keeps_claimed_messages(tmp_path: Path) -> None:
    spool, m, q, ob = gauged(tmp_path)
    a = spool.enqueue("s@example.org", ["a@example.net"], b"Subject: a\n\nbody\n")
    time.sleep(0.002)
    b = spool.enqueue("s@example.org", ["b@example.net"], b"Subject: b\n\nbody\n")
    q.refresh()
    claim = ob.take()
    assert claim.id == a
    spool.delete(b)
    q.refresh()  # a periodic check while "a" is being sent; "b" is gone
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == layout.id_time(a)
    ob.finish(claim, Attempt({"a@example.net": ("delivered", "250 ok")}))
    assert value(m, "greenmail_spool_oldest_message_timestamp_seconds") == 0


# -- logs ---------------------------------------------------------------------------------


def capture(fmt: str, emit: Any) -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logfmt.setup(fmt, verbose=False, stream=stream)
        emit(logging.getLogger("greenmail.session"))
    finally:
        root.handlers[:], root.level = saved
    return stream.getvalue()


DELIVERY = {
    "event": "delivery",
    "queue_id": "66156E86F528402C954B7E49",
    "to": "x@example.net",
    "relay": "relay.test[127.0.0.1]:25",
    "delay": 0.2,
    "attempts": 1,
    "dsn": "2.0.0",
    "status": "sent",
    "reply": "250 2.0.0 queued",
}


def test_json_lines_carry_the_fields() -> None:
    out = capture("json", lambda log: log.info("a line", extra={"fields": DELIVERY}))
    line = json.loads(out)
    assert line == {**DELIVERY, "time": line["time"], "level": "INFO", "logger": "greenmail.session"} | {
        "pid": line["pid"],
        "message": "a line",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


def test_json_plain_lines_and_exceptions() -> None:
    def emit(log: logging.Logger) -> None:
        log.debug("hidden")
        log.warning("plain %s", "text")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"fields": {"level": "forged", "x": 1}})

    lines = [json.loads(x) for x in capture("json", emit).splitlines()]
    assert [x["message"] for x in lines] == ["plain text", "failed"]
    assert lines[0]["event"] == "log" and lines[0]["level"] == "WARNING"
    assert lines[1]["level"] == "ERROR" and lines[1]["x"] == 1 and "ValueError: boom" in lines[1]["exception"]


def test_text_format_is_the_postfix_style_prefix() -> None:
    out = capture(
        "text", lambda log: log.info("Q1: to=<x@example.net>, status=sent", extra={"fields": DELIVERY})
    )
    assert re.fullmatch(r"\S+ \S+ greenmail/smtp\[\d+\]: Q1: to=<x@example.net>, status=sent\n", out)


def test_unknown_format() -> None:
    with pytest.raises(ValueError):
        logfmt.formatter("xml")


def test_configuration_dump_is_flat_and_redacted(tmp_path: Path) -> None:
    cfg = from_dict({"spool": {"path": "s"}, "relay": {"port": 2525}}, tmp_path)
    flat = logfmt.settings(cfg)
    assert flat["relay.port"] == 2525 and flat["spool.path"] == str(tmp_path / "s")
    assert flat["metrics.listen"] == "127.0.0.1:9465"
    assert all(isinstance(v, bool | int | float | str | list) for v in flat.values())
    red = logfmt.redact({"relay.password": "hunter2", "relay.password_file": "/etc/pw", "relay.token": ""})
    assert red == {"relay.password": "***", "relay.password_file": "/etc/pw", "relay.token": ""}
    assert logfmt.settings_text({"a": 1, "b": ["x", "y"]}) == "a=1 b=x,y"


def test_configuration_line_never_shows_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from greenmail import cli

    (tmp_path / "pw").write_text("hunter2-file\n")
    monkeypatch.setenv("GM_TEST_PASSWORD", "hunter2-env")
    for relay in (
        {"username": "u", "password_file": "pw"},
        {"username": "u", "password_env": "GM_TEST_PASSWORD"},
    ):
        cfg = from_dict({"spool": {"path": "s"}, "relay": relay}, tmp_path)
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            for fmt in ("text", "json"):
                cli.setup_logging(False, fmt, cfg)
        finally:
            root.handlers[:], root.level = saved
            logging.captureWarnings(False)
        err = capsys.readouterr().err
        text, js = err.splitlines()
        assert re.search(r"greenmail/master\[\d+\]: configuration: spool\.path=", text)
        assert json.loads(js)["event"] == "config"
        assert "hunter2" not in err


# -- the dashboard and the rules, as files ------------------------------------------------------


def exported() -> tuple[set[str], set[str]]:
    """Sample names greenmail exports (greenmail_* only, plus `up`) and those that are counters."""
    text = render(Metrics())
    fams = pt.families(text)
    names = {n for n in pt.sample_names(text) if n.startswith("greenmail_")} | {"up"}
    counters = {f + "_total" for f, kind in fams.items() if kind == "counter"}
    counters |= {
        f + s for f, kind in fams.items() if kind == "histogram" for s in ("_bucket", "_count", "_sum")
    }
    return names, counters & names


def test_dashboard_shape() -> None:
    d = pt.dashboard()
    assert d["uid"] == "greenmail" and d["title"]
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS", "VAR_RUNBOOK_BASE"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("job", "instance"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["title"] and p["description"], p
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        assert all('job=~"$job"' in t["expr"] and 'instance=~"$instance"' in t["expr"] for t in p["targets"])
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in (
        "spool by state",
        "oldest message age",
        "delivery results rate",
        "replies by stage and code",
        "requeues by reason",
        "stage funnel",
        "connections active vs max",
        "connection attempts by result",
        "delivery delay p50 / p95 / p99",
        "delivery delay heatmap",
        "session duration",
        "scanner heartbeat age",
        "up",
    ):
        assert wanted in titles, wanted
    assert any(p["type"] == "heatmap" for p in panels)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_name_only_exported_series() -> None:
    names, _ = exported()
    for title, expr in pt.dashboard_queries():
        used = pt.metric_names(expr)
        assert used, (title, expr)
        assert used <= names, (title, used - names)


def test_dashboard_counters_only_inside_rate_over_rate_interval() -> None:
    _, counters = exported()
    for title, expr in pt.dashboard_queries():
        assert pt.bare_counters(expr, counters) == [], (title, expr)


def test_the_counter_check_itself() -> None:
    c = {"x_total"}
    assert pt.bare_counters('sum(rate(x_total{a="b"}[$__rate_interval]))', c) == []
    assert pt.bare_counters("increase(x_total[$__rate_interval])", c) == []
    assert pt.bare_counters("x_total", c) == ["x_total"]
    assert pt.bare_counters("rate(x_total[5m])", c) == ["x_total"]
    assert pt.bare_counters("sum(x_total) / rate(x_total[$__rate_interval])", c) == ["x_total"]
    assert pt.metric_names('time() - (a_b{c="d"} > 0) + sum by (le) (rate(x_total[1m])) * 1e9') == {
        "a_b",
        "x_total",
    }


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    exprs = [pt.substitute(e) for _, e in pt.dashboard_queries()]
    r = pt.check_exprs_parse(exprs, tmp_path)
    assert r.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout + r.stderr


def test_promtool_check_rules_and_config() -> None:
    promtool = pt.need("promtool")
    r = pt.run_tool(promtool, "check", "rules", str(pt.RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = pt.run_tool(promtool, "check", "config", str(pt.SCRAPE_EXAMPLE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_fire_on_synthetic_series() -> None:
    r = pt.run_tool(
        pt.need("promtool"), "test", "rules", str(Path(__file__).parent / "greenmail-rules.test.yml")
    )
    assert r.returncode == 0, r.stdout + r.stderr
