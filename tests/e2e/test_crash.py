"""End-to-end crash safety: kill -9 in the middle of delivery, and daemons sharing one spool.

Each message carries its own Message-ID, so "delivered", "lost" and "twice"
are read off the relay's files, whatever queue ids the daemons used.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import support
from aiosmtpd_server import drop_many, numbered, queued, start_daemon, start_relay

MAX_CONNECTIONS = 5


def owner_pid(claim_name: str) -> int:
    """The pid in a claim's owner part: NAME@HOST.PID.RANDOM."""
    owner = claim_name.rpartition("@")[2]
    return int(owner.rsplit(".", 2)[1])


def spool_empty(spool: Path) -> bool:
    return not support.spool_files(spool, "outgoing") and not support.spool_files(spool, "outgoing_active")


def test_kill_9_during_delivery_loses_nothing(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=0.02)
    spool = tmp_path / "spool"
    try:
        config = support.write_config(tmp_path, relay.port, delivery={"max_connections": MAX_CONNECTIONS})
        mids = drop_many(spool, 200, "crash")
        first = start_daemon(config, tmp_path / "first.log")
        try:
            support.wait_until(lambda: relay.count() >= 50, 20, what="50 messages at the relay")
            first.proc.kill()
            assert first.wait(5) == -signal.SIGKILL
        finally:
            first.stop()
        at_kill = relay.count()
        assert at_kill < 200, "everything was delivered before the kill: the test proves nothing"
        claims = support.spool_files(spool, "outgoing_active")
        # whatever is left claimed belongs to the dead daemon, and is one of ours
        assert claims, "nothing was in flight at the kill: recovery is not tested"
        assert all(owner_pid(c) == first.proc.pid for c in claims), claims
        assert len(claims) <= MAX_CONNECTIONS, claims
        in_flight = {q.message_id for q in queued(spool, "outgoing_active").values()}

        second = start_daemon(config, tmp_path / "second.log")
        try:
            support.wait_until(lambda: set(relay.message_ids()) >= mids, 30, what="all 200 at the relay")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
        finally:
            assert second.stop() == 0, second.text()
        assert f"{len(claims)} claims of dead daemons returned" in second.text()
        got = Counter(relay.message_ids())
        assert set(got) == mids  # none lost, nothing foreign
        twice = {m for m, n in got.items() if n > 1}
        assert all(got[m] == 2 for m in twice), twice
        # only a message in flight at the kill may have arrived twice
        assert len(twice) <= MAX_CONNECTIONS, twice
        assert twice <= in_flight, (twice, in_flight)
        assert support.spool_files(spool, "failed") == []
    finally:
        relay.stop()


def test_two_daemons_on_one_spool_send_each_message_once(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=0.01)
    spool = tmp_path / "spool"
    try:
        config = support.write_config(tmp_path, relay.port, delivery={"max_connections": 3})
        a = start_daemon(config, tmp_path / "a.log")
        b = start_daemon(config, tmp_path / "b.log")
        try:
            # both are idle and watching; the messages arrive while both run
            mids = drop_many(spool, 200, "pair")
            support.wait_until(lambda: relay.count() >= 200, 30, what="200 messages at the relay")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
        finally:
            assert a.stop() == 0, a.text()
            assert b.stop() == 0, b.text()
        got = Counter(relay.message_ids())
        assert [m for m, n in got.items() if n > 1] == []
        assert set(got) == mids
        assert relay.stats()["max_active"] <= 6
        sent_a, sent_b = a.text().count("status=sent"), b.text().count("status=sent")
        assert sent_a + sent_b == 200, (sent_a, sent_b)
        assert sent_a and sent_b, "one daemon did all the work: the test proves nothing"
    finally:
        relay.stop()


def test_a_live_daemons_claims_are_never_taken_back(tmp_path: Path) -> None:
    stall = start_relay(tmp_path, "stall", delay_data=30)
    fast = start_relay(tmp_path, "fast")
    spool = tmp_path / "spool"
    try:
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        shared = {"path": str(spool)}
        # A stalls after DATA (and waits long for the reply); B talks to a working relay
        config_a = support.write_config(
            a_dir, stall.port, spool=shared, delivery={"max_connections": 2}, timeouts={"data_end": 120}
        )
        config_b = support.write_config(b_dir, fast.port, spool=shared)
        qids = [support.enqueue(config_a, numbered(i, "live")) for i in range(3)]
        mid = {qid: f"<live-{i}@test>" for i, qid in enumerate(qids)}
        a = start_daemon(config_a, tmp_path / "a.log")
        try:
            support.wait_until(
                lambda: stall.stats()["data_started"] >= 2, 10, what="A's two sessions in DATA"
            )
            claims = support.spool_files(spool, "outgoing_active")
            assert len(claims) == 2 and all(owner_pid(c) == a.proc.pid for c in claims), claims
            left = support.spool_files(spool, "outgoing")
            assert len(left) == 1

            # B while A lives: takes the unclaimed message, leaves A's claims alone
            r = support.greenmail("run", "--once", config=config_b, timeout=30)
            assert r.returncode == 0, r.stderr.decode()
            assert b"claims of dead daemons returned" not in r.stderr
            assert support.spool_files(spool, "outgoing_active") == claims
            assert support.spool_files(spool, "outgoing") == []
            assert fast.message_ids() == [mid[left[0]]]
            assert a.proc.poll() is None

            a.proc.kill()
            assert a.wait(5) == -signal.SIGKILL
        finally:
            a.stop()

        # B again, A dead: A's claims come back and go out
        r = support.greenmail("run", "--once", config=config_b, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        assert b"2 claims of dead daemons returned" in r.stderr, r.stderr.decode()
        assert spool_empty(spool)
        got = fast.message_ids()
        assert sorted(got) == sorted(mid.values())  # each exactly once
        support.wait_until(lambda: stall.stats()["active"] == 0, 5, what="the stalled relay to see A die")
        assert stall.count() == 0
        assert support.spool_files(spool, "failed") == []
    finally:
        stall.stop()
        fast.stop()
