"""The hub is never blocked: the daemon runs under gevent's monitor thread.

With GEVENT_MONITOR_THREAD_ENABLE the monitor prints "appears to be blocked"
whenever one greenlet keeps the hub for longer than GEVENT_MAX_BLOCKING_TIME:
a blocking call (fsync, a big directory scan, a flock) made on the hub
instead of in the threadpool. A busy delivery run must print none.
"""

from __future__ import annotations

from pathlib import Path

import support
from aiosmtpd_server import drop_many

N = 400


def test_no_blocking_call_on_the_hub_while_delivering(tmp_path: Path, monkeypatch) -> None:
    port = support.free_port()
    sink = support.sink(port, tmp_path / "mail", tmp_path / "sink.log")
    try:
        config = support.write_config(tmp_path, port, delivery={"max_connections": 5, "check_interval": 1})
        drop_many(tmp_path / "spool", N)
        monkeypatch.setenv("GEVENT_MONITOR_THREAD_ENABLE", "1")
        monkeypatch.setenv("GEVENT_MAX_BLOCKING_TIME", "0.1")
        daemon = support.daemon(config, tmp_path / "daemon.log")
        try:
            new = tmp_path / "mail" / "new"
            support.wait_until(
                lambda: new.exists() and len(list(new.iterdir())) >= N, timeout=60, what="delivery"
            )
            for _ in range(20):  # and enqueue while it runs, through the wake-up path
                support.enqueue(config, b"Subject: late\n\nbody\n")
            support.wait_until(lambda: len(list(new.iterdir())) >= N + 20, timeout=20, what="late mail")
        finally:
            assert daemon.stop() == 0
        log = daemon.text()
        assert "appears to be blocked" not in log, log[-3000:]
        assert log.count("status=sent") == N + 20
    finally:
        sink.stop()
