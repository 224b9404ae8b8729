"""The daemon prunes failed/ after spool.prune_after, at a periodic check, and says so."""

from __future__ import annotations

import os
from pathlib import Path

import support
from faultserver import FaultServer


def test_a_failed_message_is_pruned_once_it_is_older_than_prune_after(tmp_path: Path) -> None:
    with FaultServer({"rcpt": "550 5.1.1 no such user"}) as relay:
        cfg = support.write_config(
            tmp_path,
            relay.port,
            spool={"path": "spool", "prune_after": 1.5},
            delivery={"check_interval": 0.3},
            retry={"bounce": False},
        )
        d = support.daemon(cfg, tmp_path / "daemon.log")
        try:
            support.enqueue(cfg, b"Subject: x\n\ny\n", "a@example.org", "nobody@example.net")
            failed = tmp_path / "spool" / "failed"
            support.wait_until(
                lambda: failed.is_dir() and os.listdir(failed), 10, what="the message in failed/"
            )
            support.wait_until(lambda: not os.listdir(failed), 10, what="failed/ pruned")
            support.wait_until(lambda: "pruned 1 message(s) from failed/" in d.text(), 5, what="the log line")
        finally:
            assert d.stop() == 0, d.text()
    assert os.listdir(tmp_path / "spool" / "meta") == []
