"""The hub is never blocked: the daemon runs under gevent's monitor thread.

With GEVENT_MONITOR_THREAD_ENABLE the monitor prints "appears to be blocked"
whenever one greenlet keeps the hub for longer than GEVENT_MAX_BLOCKING_TIME:
a blocking call (fsync, a big directory scan, a flock) made on the hub
instead of in the threadpool. A busy delivery run must print none.
"""

from __future__ import annotations

import os
import re
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


BIG = 20 * 1024 * 1024  # bytes of body: well over the size a claim reads with its envelope
# seconds the hub may be held: reading one 20 MiB body on the hub takes longer (about 3 ms from the page
# cache, 13 ms from the disk); a clean run never holds it this long
MONITOR_BIG = "0.005"


def blocked_stacks(log: str) -> list[str]:
    """The stacks gevent's monitor printed, one per "appears to be blocked" report."""
    if "appears to be blocked" not in log:
        return []
    stacks = [part.split("Info:", 1)[0] for part in log.split("Blocked Stack")[1:]]
    return stacks or [log[-3000:]]  # a report without its stack: shown, and fails the check


def only_socket_copies(stack: str) -> bool:
    """Whether no greenmail code blocked: the innermost greenmail frame, if any, is a socket send or
    receive (the kernel copying a big chunk on a loaded machine holds the hub for a few ms)."""
    frames = re.findall(r'File "[^"]*/greenmail/(\w+\.py)", line \d+, in (\w+)', stack)
    if not frames:  # the hub itself (the loop, the garbage collector): no call of greenmail's
        return True
    return frames[-1] in {("connection.py", "send"), ("connection.py", "read")}


def big_message(tag: str, eight_bit: bool) -> bytes:
    line = ("é" * 499 if eight_bit else "x" * 998).encode() + b"\r\n"  # 998 bytes either way
    head = f"Subject: {tag}\r\nMessage-ID: <{tag}@test>\r\n".encode()
    if eight_bit:
        head += b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        head += b"Content-Transfer-Encoding: 8bit\r\n"
    return head + b"\r\n" + line * (BIG // len(line))


def evict(directory: Path) -> None:
    """Drop the (written, fsync'd) queue files from the page cache: a read of them goes to the disk."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_no_blocking_call_on_the_hub_while_delivering_big_messages(tmp_path: Path, monkeypatch) -> None:
    """Big bodies, half of them 8-bit: whatever reads a body (the 8-bit check, BODY=8BITMIME, the
    data itself) must do it in the threadpool, never on the hub, or the monitor reports it."""
    port = support.free_port()
    sink = support.sink(port, tmp_path / "mail", tmp_path / "sink.log")
    try:
        config = support.write_config(tmp_path, port, delivery={"max_connections": 2, "check_interval": 60})
        messages = {f"big{i}": big_message(f"big{i}", eight_bit=i % 2 == 1) for i in range(4)}
        for message in messages.values():
            support.enqueue(config, message)
        evict(tmp_path / "spool" / "outgoing")
        monkeypatch.setenv("GEVENT_MONITOR_THREAD_ENABLE", "1")
        monkeypatch.setenv("GEVENT_MAX_BLOCKING_TIME", MONITOR_BIG)
        daemon = support.daemon(config, tmp_path / "daemon.log")
        try:
            new = tmp_path / "mail" / "new"
            support.wait_until(
                lambda: new.exists() and len(list(new.iterdir())) >= len(messages),
                timeout=30,
                what="delivery",
            )
        finally:
            assert daemon.stop() == 0
        log = daemon.text()
        stacks = blocked_stacks(log)
        assert all(only_socket_copies(stack) for stack in stacks), stacks
        assert log.count("status=sent") == len(messages)
        got = {}
        for path in new.iterdir():
            data = path.read_bytes()
            tag = data.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode()
            got[tag] = data
        for tag, message in messages.items():
            body = message.split(b"\r\n\r\n", 1)[1]
            assert got[tag].replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n")), tag
    finally:
        sink.stop()
