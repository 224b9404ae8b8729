"""End-to-end delivery: the real ``greenmail`` process against real SMTP servers on 127.0.0.1.

The relays are subprocesses (tests/aiosmtpd_server.py, or ``greenmail sink``);
everything lives in tmp_path and every process is stopped in a finally.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import support
from aiosmtpd_server import Queued, drop, drop_many, numbered, queued, start_daemon, start_relay

from greenmail.wire import normalise

# Three messages that exercise the DATA encoding: bare LF line ends (and no final
# newline), lines starting with "." (one of them a lone "."), CRLF with 8-bit UTF-8.
BARE_LF = b"Subject: bare LF\nMessage-ID: <bare-lf@test>\n\nfirst line\nsecond line\n\nlast line, no newline"
DOTS = (
    b"Subject: dots\r\nMessage-ID: <dots@test>\r\n\r\n"
    b".starts with a dot\r\n..two dots\r\n.\r\n. \r\nafter the lone dot\r\n.\r\n"
)
UTF8 = (
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <utf8@test>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße aus Köln — 日本語のテキスト, ünïcödé\r\n\xa0non-breaking\r\n"
).encode()
MESSAGES = [
    (BARE_LF, "lf-sender@example.org", ("one@example.net",)),
    (DOTS, "dot-sender@example.org", ("two@example.net", "three@example.com")),
    (UTF8, "<>", ("four@example.net",)),
]


def outgoing(spool: Path) -> list[str]:
    return support.spool_files(spool, "outgoing")


def active(spool: Path) -> list[str]:
    return support.spool_files(spool, "outgoing_active")


def spool_empty(spool: Path) -> bool:
    return not outgoing(spool) and not active(spool)


def enqueue_three(config: Path) -> dict[str, Queued]:
    """The three MESSAGES through ``greenmail enqueue``; the queue files, by Message-ID."""
    ids = [support.enqueue(config, body, sender, *to) for body, sender, to in MESSAGES]
    files = queued(config.parent / "spool")
    assert sorted(files) == sorted(ids)
    by_mid = {q.message_id: q for q in files.values()}
    assert set(by_mid) == {"<bare-lf@test>", "<dots@test>", "<utf8@test>"}
    return by_mid


def check_byte_exact(received: dict[str, bytes], expected: dict[str, Queued]) -> None:
    assert set(received) == set(expected)
    for mid, q in expected.items():
        assert received[mid] == normalise(q.body), mid


def metrics_config(tmp_path: Path, relay_port: int, **sections: dict) -> tuple[Path, int]:
    port = support.free_port()
    sections.setdefault("metrics", {})["listen"] = f"127.0.0.1:{port}"
    return support.write_config(tmp_path, relay_port, **sections), port


def test_delivery_to_aiosmtpd_is_byte_exact(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    try:
        config, mport = metrics_config(tmp_path, relay.port)
        spool = tmp_path / "spool"
        expected = enqueue_three(config)
        d = start_daemon(config, tmp_path / "daemon.log", metrics_port=mport)
        try:
            support.wait_until(lambda: relay.count() >= 3, 10, what="3 messages at the relay")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
            got = relay.messages()
            assert len(got) == 3
            by_mid = {m.message_id: m for m in got}
            check_byte_exact({mid: m.content for mid, m in by_mid.items()}, expected)
            for mid, q in expected.items():
                # aiosmtpd reports the null sender (an empty envelope line in the spool) as "<>"
                assert by_mid[mid].mail_from == (q.sender or "<>")
                assert by_mid[mid].rcpt_tos == q.recipients
            assert expected["<utf8@test>"].sender == ""
        finally:
            assert d.stop() == 0, d.text()
        assert spool_empty(spool)
        assert support.spool_files(spool, "failed") == []
        assert support.spool_files(spool, "corrupt") == []
    finally:
        relay.stop()


def test_delivery_to_greenmail_sink_and_run_once(tmp_path: Path) -> None:
    port = support.free_port()
    maildir = tmp_path / "maildir"
    sink = support.sink(port, maildir, tmp_path / "sink.log")
    try:
        config = support.write_config(tmp_path, port)
        expected = enqueue_three(config)
        r = support.greenmail("run", "--once", config=config, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        spool = tmp_path / "spool"
        assert spool_empty(spool), r.stderr.decode()
        # the sink renames into new/ before its 250, so the files are all there now
        files = sorted((maildir / "new").iterdir())
        assert len(files) == 3
        received = {}
        for f in files:
            data = f.read_bytes()
            mid = next(line.split(b":", 1)[1].strip().decode() for line in data.split(b"\r\n")
                       if line.lower().startswith(b"message-id:"))  # fmt: skip
            received[mid] = data
        check_byte_exact(received, expected)
        log = sink.text()
        assert "from=<lf-sender@example.org> to=<one@example.net>" in log
        assert "from=<dot-sender@example.org> to=<two@example.net>,<three@example.com>" in log
        assert "from=<> to=<four@example.net>" in log
    finally:
        sink.stop()


def test_new_files_are_picked_up_without_restart(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    try:
        config = support.write_config(tmp_path, relay.port, delivery={"check_interval": 60})
        spool = tmp_path / "spool"
        # a first message proves the first periodic check is over before the others come
        support.enqueue(config, numbered(0, "pickup"))
        d = start_daemon(config, tmp_path / "daemon.log")
        try:
            support.wait_until(lambda: relay.count() == 1, 5, what="the first message")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")

            body = numbered(1, "pickup")
            drop(spool, "app-msg-1", body, "app@example.org", "someone@example.net")
            support.wait_until(lambda: relay.count() == 2, 3, what="the dropped file at the relay")

            support.enqueue(config, numbered(2, "pickup"))
            support.wait_until(lambda: relay.count() == 3, 3, what="the enqueued message at the relay")

            got = {m.message_id: m for m in relay.messages()}
            assert set(got) == {"<pickup-0@test>", "<pickup-1@test>", "<pickup-2@test>"}
            assert got["<pickup-1@test>"].content == normalise(body)
            assert got["<pickup-1@test>"].mail_from == "app@example.org"
            assert got["<pickup-1@test>"].rcpt_tos == ["someone@example.net"]
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
            # log lines are written in batches; the last ones still reach the log of an idle daemon
            support.wait_until(lambda: d.text().count("status=sent") == 3, 2, what="3 lines in the live log")
        finally:
            assert d.stop() == 0, d.text()
    finally:
        relay.stop()


def test_one_connection_carries_twenty_messages(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    try:
        config = support.write_config(tmp_path, relay.port, delivery={"max_connections": 1})
        spool = tmp_path / "spool"
        mids = drop_many(spool, 20)
        d = start_daemon(config, tmp_path / "daemon.log")
        try:
            support.wait_until(lambda: relay.count() >= 20, 15, what="20 messages at the relay")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
            support.wait_until(lambda: relay.stats()["active"] == 0, 5, what="the session to QUIT")
        finally:
            assert d.stop() == 0, d.text()
        got = relay.message_ids()
        assert sorted(got) == sorted(mids)
        stats = relay.stats()
        assert stats["connections"] == 1, stats
        assert stats["messages"] == 20, stats
    finally:
        relay.stop()


def test_never_more_than_max_connections(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=0.005)
    try:
        config = support.write_config(tmp_path, relay.port, delivery={"max_connections": 3})
        spool = tmp_path / "spool"
        mids = drop_many(spool, 100)
        d = start_daemon(config, tmp_path / "daemon.log")
        try:
            support.wait_until(lambda: relay.count() >= 100, 30, what="100 messages at the relay")
            support.wait_until(lambda: spool_empty(spool), 5, what="an empty spool")
        finally:
            assert d.stop() == 0, d.text()
        got = relay.message_ids()
        dupes = [m for m, n in Counter(got).items() if n > 1]
        assert dupes == []
        assert set(got) == mids and len(got) == 100
        stats = relay.stats()
        assert 1 <= stats["max_active"] <= 3, stats
        assert stats["messages"] == 100, stats
    finally:
        relay.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_idle_exits_0_quickly(tmp_path: Path, sig: signal.Signals) -> None:
    relay = start_relay(tmp_path)
    try:
        config, mport = metrics_config(tmp_path, relay.port)
        d = start_daemon(config, tmp_path / "daemon.log", metrics_port=mport)
        try:
            started = time.monotonic()
            d.signal(sig)
            assert d.wait(5) == 0, d.text()
            assert time.monotonic() - started < 2.0
            assert "greenmail stopped" in d.text()
        finally:
            d.stop()
        assert relay.stats()["connections"] == 0
    finally:
        relay.stop()


def message_ids_in(spool: Path, sub: str) -> list[str | None]:
    return [q.message_id for q in queued(spool, sub).values()]


@pytest.mark.parametrize("once", [False, True], ids=["run", "run-once"])
def test_graceful_stop_with_a_slow_relay(tmp_path: Path, once: bool) -> None:
    grace = 10
    relay = start_relay(tmp_path, delay_data=2.0)
    try:
        config, mport = metrics_config(
            tmp_path, relay.port, delivery={"max_connections": 2, "shutdown_grace": grace}
        )
        spool = tmp_path / "spool"
        mids = drop_many(spool, 4, "slow")
        if once:  # no metrics server with --once; sessions in DATA imply the signal handlers are set
            d = support.daemon(config, tmp_path / "daemon.log", "--once")
        else:
            d = start_daemon(config, tmp_path / "daemon.log", metrics_port=mport)
        try:
            # both sessions have sent a whole message and wait for the (delayed) reply
            support.wait_until(lambda: relay.stats()["data_started"] >= 2, 10, what="two DATA payloads")
            assert len(active(spool)) == 2
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.wait(grace + 5) == 0, d.text()
            elapsed = time.monotonic() - started
        finally:
            d.stop()
        assert elapsed < grace, elapsed
        delivered = relay.message_ids()
        back = message_ids_in(spool, "outgoing")
        assert active(spool) == []
        assert len(delivered) == len(set(delivered)), delivered
        assert not set(delivered) & set(back), (delivered, back)
        assert sorted(delivered + back) == sorted(mids)
        # the two transactions in flight finished; the two never started stayed as they were
        assert len(delivered) == 2, d.text()
        assert sorted(outgoing(spool)) == sorted(n for n, q in queued(spool).items() if q.message_id in back)
        assert all("," not in n for n in outgoing(spool)), outgoing(spool)
    finally:
        relay.stop()


def test_grace_period_over_puts_messages_back(tmp_path: Path) -> None:
    relay = start_relay(tmp_path, delay_data=30)
    try:
        config, mport = metrics_config(
            tmp_path,
            relay.port,
            delivery={"max_connections": 2, "shutdown_grace": 0.5},
            timeouts={"data_end": 60},
        )
        spool = tmp_path / "spool"
        mids = drop_many(spool, 4, "stall")
        d = start_daemon(config, tmp_path / "daemon.log", metrics_port=mport)
        try:
            support.wait_until(lambda: relay.stats()["data_started"] >= 2, 10, what="two DATA payloads")
            started = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.wait(10) == 0, d.text()
            elapsed = time.monotonic() - started
        finally:
            d.stop()
        assert elapsed < 5, elapsed
        assert active(spool) == []
        assert sorted(message_ids_in(spool, "outgoing")) == sorted(mids)
        # a shutdown is not the message's fault: no attempt counted, still due now
        assert all("," not in n for n in outgoing(spool)), outgoing(spool)
        support.wait_until(lambda: relay.stats()["active"] == 0, 5, what="the relay to see the hang-ups")
        assert relay.count() == 0
    finally:
        relay.stop()


def test_large_message_across_read_chunks_is_byte_exact(tmp_path: Path) -> None:
    """The session reads the body in 64 KiB chunks: line ends and dots on the chunk borders."""
    chunk = 64 * 1024
    head = b"From: a@test\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <large@test>\r\n\r\n"
    body = bytearray(head)

    def pad_to(offset: int) -> None:
        """Lines of x up to ``offset``, the last one ended by LF."""
        filler = bytearray(b"x" * (offset - len(body)))
        filler[70::71] = b"\n" * len(filler[70::71])
        filler[-1:] = b"\n"
        body.extend(filler)

    pad_to(chunk - 1)
    body.extend(b"\r\n.after a CRLF split over the border\n")  # CR ends chunk 1, LF starts chunk 2
    pad_to(2 * chunk - 1)
    body.extend(b"\r.after a bare CR at the end of a chunk\r\n")  # bare CR, then "." opens chunk 3
    pad_to(3 * chunk)
    body.extend(b".a dot opening chunk 4\nno newline at the end")
    data = bytes(body)
    assert data[chunk - 1 : chunk + 1] == b"\r\n" and data[2 * chunk - 1 : 2 * chunk + 1] == b"\r."
    assert data[3 * chunk - 1 : 3 * chunk + 1] == b"\n."

    relay = start_relay(tmp_path)
    try:
        config = support.write_config(tmp_path, relay.port)
        support.enqueue(config, data)
        [q] = queued(tmp_path / "spool").values()
        assert q.body == data  # nothing added: Date and Message-ID are there
        r = support.greenmail("run", "--once", config=config, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        [got] = relay.messages()
        assert got.content == normalise(data)
    finally:
        relay.stop()


def test_relay_down_run_once_keeps_the_message(tmp_path: Path) -> None:
    port = support.free_port()  # nothing listens there
    config = support.write_config(tmp_path, port)
    qid = support.enqueue(config, numbered(0, "down"))
    spool = tmp_path / "spool"
    started = time.monotonic()
    r = support.greenmail("run", "--once", config=config, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert time.monotonic() - started < 10
    # an unreachable relay does not count against the message: same name, attempts 0
    assert outgoing(spool) == [qid]
    assert active(spool) == []
    assert support.spool_files(spool, "failed") == []
    assert os.path.getsize(spool / "outgoing" / qid) > 0


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_pickup_does_not_depend_on_a_visible_mtime_change(tmp_path: Path) -> None:
    relay = start_relay(tmp_path)
    try:
        config, mport = metrics_config(tmp_path, relay.port, delivery={"check_interval": 60})
        spool = tmp_path / "spool"
        d = start_daemon(config, tmp_path / "daemon.log", metrics_port=mport)
        try:
            # the first check is over, so the watcher has taken outgoing/'s mtime; nothing changed it since
            heartbeat = "greenmail_spool_scan_last_success_timestamp_seconds"
            support.wait_until(lambda: metric(mport, heartbeat), 5, what="the first periodic check")
            before = os.stat(spool / "outgoing")
            drop(spool, "same-tick", numbered(0, "tick"))
            # what a filesystem with 1-second timestamps shows when both changes fall in one second
            os.utime(spool / "outgoing", ns=(before.st_atime_ns, before.st_mtime_ns))
            support.wait_until(lambda: relay.count() == 1, 3, what="the file at the relay")
        finally:
            assert d.stop() == 0, d.text()
    finally:
        relay.stop()
