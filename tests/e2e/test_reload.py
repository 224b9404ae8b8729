"""SIGHUP reloads the configuration: live settings apply, the others wait for a restart, a broken
file keeps the old settings, and a reload during a drain loses and doubles nothing."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import promtool_support as pt
import support
from aiosmtpd_server import drop_many, start_daemon, start_relay


def connections_max(port: int) -> float | None:
    try:
        status, body = pt.http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except OSError:
        return None
    m = re.search(rb"^greenmail_connections_max(?:\{[^}]*\})? (\S+)$", body, re.MULTILINE)
    return float(m[1]) if status == 200 and m else None


def write(tmp_path: Path, relay_port: int, mport: int, **delivery: object) -> Path:
    return support.write_config(
        tmp_path,
        relay_port,
        metrics={"listen": f"127.0.0.1:{mport}"},
        delivery={"max_connections": 2, **delivery},
    )


def test_a_changed_limit_applies_and_is_visible_in_metrics(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    mport = support.free_port()
    try:
        cfg = write(tmp_path, relay.port, mport)
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            assert connections_max(mport) == 2
            write(tmp_path, relay.port, mport, max_connections=5)
            d.signal(signal.SIGHUP)
            support.wait_until(lambda: connections_max(mport) == 5, 10, what="connections_max 5")
            line = "configuration reloaded: delivery.max_connections changed"
            support.wait_until(lambda: line in d.text(), 5, what="the reload line")
            support.enqueue(cfg, b"Subject: after\n\nx\n")
            support.wait_until(lambda: relay.count() == 1, 10, what="a delivery after the reload")
        finally:
            assert d.stop() == 0
    finally:
        relay.stop()


def test_a_broken_file_keeps_the_old_settings(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    mport = support.free_port()
    try:
        cfg = write(tmp_path, relay.port, mport)
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            good = cfg.read_text()
            assert "max_connections = 2" in good
            cfg.write_text(good.replace("max_connections = 2", "max_conections = 7"))
            d.signal(signal.SIGHUP)
            support.wait_until(lambda: "configuration not reloaded" in d.text(), 10, what="the refusal")
            assert "max_conections" in d.text()
            assert d.proc.poll() is None and connections_max(mport) == 2
            cfg.write_text(good)
            support.enqueue(cfg, b"Subject: still\n\nx\n")
            support.wait_until(lambda: relay.count() == 1, 10, what="a delivery with the old settings")
        finally:
            assert d.stop() == 0
    finally:
        relay.stop()


def test_settings_that_need_a_restart_are_named_and_kept(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    mport = support.free_port()
    try:
        cfg = write(tmp_path, relay.port, mport)
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            text = cfg.read_text().replace('path = "spool"', 'path = "elsewhere"')
            cfg.write_text(text.replace(f"127.0.0.1:{mport}", f"127.0.0.1:{support.free_port()}"))
            d.signal(signal.SIGHUP)
            support.wait_until(lambda: "configuration reloaded" in d.text(), 10, what="the reload line")
            log = d.text()
            assert (
                "spool.path changed: needs a restart" in log
                and "metrics.listen changed: needs a restart" in log
            )
            assert connections_max(mport) == 2  # still served where it was
            drop_many(tmp_path / "spool", 1, "old-spool")
            support.wait_until(lambda: relay.count() == 1, 10, what="the old spool still delivered")
            assert not (tmp_path / "elsewhere").exists()
        finally:
            assert d.stop() == 0
    finally:
        relay.stop()


def test_reloads_during_a_drain_lose_and_double_nothing(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=0.01)
    mport = support.free_port()
    try:
        cfg = write(tmp_path, relay.port, mport)
        mids = drop_many(tmp_path / "spool", 100, "drain")
        d = start_daemon(cfg, tmp_path / "daemon.log", metrics_port=mport)
        try:
            for limit in (4, 1, 3):
                seen = relay.count()
                support.wait_until(lambda seen=seen: relay.count() > seen, 20, what="progress")
                write(tmp_path, relay.port, mport, max_connections=limit, check_interval=30)
                d.signal(signal.SIGHUP)
            support.wait_until(lambda: relay.count() >= 100, 60, what="100 messages")
            support.wait_until(lambda: d.text().count("configuration reloaded") == 3, 5, what="3 reloads")
        finally:
            assert d.stop() == 0
        got = relay.message_ids()
        assert len(got) == 100 and set(got) == mids
    finally:
        relay.stop()
