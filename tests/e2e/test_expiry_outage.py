"""A message past retry.max_lifetime fails even while the relay cannot be reached."""

from __future__ import annotations

import json
import time
from pathlib import Path

import support


def old_id(age: float) -> str:
    """A queue id in greenmail's own format whose embedded enqueue time is ``age`` seconds ago."""
    return f"{int((time.time() - age) * 1e6):013X}00001ABCDEF"


def test_expires_while_the_relay_is_down(tmp_path: Path) -> None:
    config = support.write_config(
        tmp_path, support.free_port(), retry={"max_lifetime": 3600}
    )  # nobody listens
    spool = tmp_path / "spool"
    for sub in ("tmp", "outgoing"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    qid = old_id(7200)
    (spool / "outgoing" / qid).write_bytes(b"app@example.org\nrcpt@example.net\nSubject: old\n\nbody\n")
    fresh = support.enqueue(config, b"Subject: new\n\nbody\n")

    r = support.greenmail("run", "--once", config=config)
    assert r.returncode == 0, r.stderr

    listing = {
        m["id"]: m for m in json.loads(support.greenmail("queue", "list", "--json", config=config).stdout)
    }
    assert listing[qid]["state"] == "failed"
    assert "expired" in listing[qid]["last_error"]
    assert (
        listing[fresh]["state"] == "queued" and listing[fresh]["attempts"] == 0
    )  # not charged for the outage
    bounces = [m for m in listing.values() if m["sender"] == ""]
    assert len(bounces) == 1 and bounces[0]["recipients"] == ["app@example.org"]
