"""The log path: line shapes (text, syslog, journal, JSON), service tags, batching, the file and
syslog targets, and the Postfix-style delivery line with delays=a/b/c/d."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greenmail import logfmt, maillog


def record(
    msg: str, created: float, level: int = logging.INFO, name: str = "greenmail.session"
) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    r.created = created
    r.msecs = (created - int(created)) * 1000
    r.process = None  # as logfmt.setup makes records: the formatter writes its own pid
    return r


@pytest.fixture
def zone(request: pytest.FixtureRequest) -> Iterator[None]:
    """Run with the time zone ``request.param`` (TZ and tzset)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


# -- the text line -------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns", "Europe/Berlin"], indirect=True)
@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_719_999_999.5, 1_600_000_000.25])
def test_the_stamp_is_rfc3339_local_time_with_milliseconds(zone: None, created: float) -> None:
    f = logfmt.formatter("text")
    f.format(record("warm the cache", created - 1))  # a cached second must not leak into the next
    for t in (created, created + 0.001, created + 1):
        stamp = f.format(record("x", t)).split(" ")[0]
        expected = datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")
        assert stamp == expected


def test_the_text_line_is_syslog_shaped_with_the_service_tag() -> None:
    line = logfmt.formatter("text").format(record("Q1: to=<x@example.net>, status=sent", 1_700_000_000.5))
    host = socket.gethostname().split(".")[0]
    pattern = rf"\S+ {re.escape(host)} greenmail/smtp\[{os.getpid()}\]: Q1: to=<x@example\.net>, status=sent"
    assert re.fullmatch(pattern, line)


@pytest.mark.parametrize(
    ("logger", "tag"),
    [
        ("greenmail", "master"),
        ("greenmail.workers", "master"),
        ("greenmail.session", "smtp"),
        ("greenmail.connection", "smtp"),
        ("greenmail.queue", "qmgr"),
        ("greenmail.scheduler", "qmgr"),
        ("greenmail.spool", "qmgr"),
        ("greenmail.bounce", "bounce"),
        ("greenmail.pickup", "pickup"),
        ("greenmail.http", "http"),
        ("py.warnings", "warnings"),
    ],
)
def test_service_tags(logger: str, tag: str) -> None:
    line = logfmt.formatter("text", head="tag").format(record("m", 1.0, name=logger))
    assert line == f"greenmail/{tag}[{os.getpid()}]: m"


@pytest.mark.parametrize(
    ("level", "word", "priority"),
    [
        (logging.DEBUG, "debug: ", 7),
        (logging.INFO, "", 6),
        (logging.WARNING, "warning: ", 4),
        (logging.ERROR, "error: ", 3),
        (logging.CRITICAL, "fatal: ", 2),
        (25, "", 6),  # a level of its own: the word of the one below
    ],
)
def test_levels_are_postfix_words_and_syslog_priorities(level: int, word: str, priority: int) -> None:
    assert logfmt.formatter("text", head="tag").format(record("m", 1.0, level)).endswith(f"]: {word}m")
    assert logfmt.formatter("text", head="journal").format(record("m", 1.0, level)) == f"<{priority}>{word}m"


def test_journal_lines_carry_the_priority_on_every_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        r = logging.LogRecord("greenmail", logging.ERROR, __file__, 1, "failed", None, None)
        r.exc_info = sys.exc_info()
    out = logfmt.formatter("text", head="journal").format(r)
    lines = out.splitlines()
    assert lines[0] == "<3>error: failed" and len(lines) > 2
    assert all(x.startswith("<3>") for x in lines) and lines[-1] == "<3>ValueError: boom"
    assert json.loads(logfmt.formatter("json", head="journal").format(r)[3:])["message"] == "failed"


def test_json_lines_keep_their_fields_and_the_pid() -> None:
    r = record("Q1: removed", 1_700_000_000.5, name="greenmail.queue")
    r.fields = {"event": "removed", "queue_id": "Q1", "pid": "forged"}
    out = json.loads(logfmt.formatter("json").format(r))
    assert out == {
        "time": "2023-11-14T22:13:20.500Z",
        "level": "INFO",
        "logger": "greenmail.queue",
        "pid": os.getpid(),
        "event": "removed",
        "message": "Q1: removed",
        "queue_id": "Q1",
    }


# -- where lines go --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("stderr", ("stderr", "")),
        ("syslog", ("syslog", "/dev/log")),
        ("syslog:/run/log.sock", ("syslog", "/run/log.sock")),
        ("file:/var/log/greenmail.log", ("file", "/var/log/greenmail.log")),
        ("file:relative.log", ("file", "relative.log")),
    ],
)
def test_targets(target: str, parsed: tuple[str, str]) -> None:
    assert logfmt.parse_target(target) == parsed


@pytest.mark.parametrize("target", ["", "file", "file:", "stderr:x", "journal", "udp:127.0.0.1:514"])
def test_bad_targets(target: str) -> None:
    with pytest.raises(ValueError, match="expected stderr, syslog"):
        logfmt.parse_target(target)


def test_stderr_is_the_journal_when_journal_stream_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st_a = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st_a.st_dev}:{st_a.st_ino}")
        assert logfmt.on_journal(a) and not logfmt.on_journal(b)
        assert not logfmt.on_journal(io.StringIO())
        h = logfmt.handler("text", "stderr", stream=a)
        h.handle(record("journal line", 1.0, logging.WARNING))
        h.flush()
    assert (tmp_path / "a").read_text() == "<4>warning: journal line\n"
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not logfmt.on_journal(sys.stderr)


def batching(stream: io.StringIO, interval: float = 3600.0) -> logfmt.BatchingHandler:
    h = logfmt.BatchingHandler(stream, interval=interval)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return h


def test_info_lines_wait_for_flush_and_come_out_in_order() -> None:
    out = io.StringIO()
    h = batching(out)
    for i in range(3):
        h.handle(record(f"line {i}", 1.0))
    assert out.getvalue() == ""
    h.flush()
    assert out.getvalue() == "INFO line 0\nINFO line 1\nINFO line 2\n"
    h.flush()  # nothing pending: nothing written
    assert out.getvalue().count("\n") == 3


def test_a_warning_is_written_at_once_after_what_was_pending() -> None:
    out = io.StringIO()
    h = batching(out)
    h.handle(record("before", 1.0))
    h.handle(record("trouble", 1.0, logging.WARNING))
    assert out.getvalue() == "INFO before\nWARNING trouble\n"


def test_a_full_batch_is_written_without_waiting() -> None:
    out = io.StringIO()
    h = batching(out)
    for i in range(h.MAX_PENDING):
        h.handle(record(f"{i}", 1.0))
    assert out.getvalue().count("\n") == h.MAX_PENDING


def test_the_interval_bounds_how_long_a_line_waits_when_more_come() -> None:
    out = io.StringIO()
    h = batching(out, interval=0.0)
    h.handle(record("a", 1.0))
    assert out.getvalue() == "INFO a\n"


def test_logging_shutdown_writes_what_is_pending() -> None:
    out = io.StringIO()
    h = batching(out)
    h.handle(record("last words", 1.0))
    logging.shutdown([lambda: h])  # what the interpreter runs at exit
    assert out.getvalue() == "INFO last words\n"


def test_a_file_moved_away_keeps_what_was_pending_and_reopen_starts_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "greenmail.log"
    h = logfmt.FileHandler(str(path))
    h.setFormatter(logging.Formatter("%(message)s"))
    h.handle(record("one", 1.0))
    h.flush()
    h.handle(record("two", 1.0))  # pending when logrotate moves the file
    path.rename(tmp_path / "greenmail.log.1")
    h.reopen()
    h.handle(record("three", 1.0))
    h.close()
    assert (tmp_path / "greenmail.log.1").read_text() == "one\ntwo\n"
    assert path.read_text() == "three\n"


def test_a_file_that_cannot_be_reopened_keeps_the_old_one(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    h = logfmt.FileHandler(str(d / "greenmail.log"))
    h.setFormatter(logging.Formatter("%(message)s"))
    (d / "greenmail.log").rename(tmp_path / "moved.log")
    d.rmdir()
    with pytest.raises(FileNotFoundError):
        h.reopen()
    h.handle(record("still logged", 1.0))
    h.close()
    assert (tmp_path / "moved.log").read_text() == "still logged\n"


# -- syslog ----------------------------------------------------------------------------------


def syslog_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    return s


def test_syslog_datagrams_have_facility_mail_and_the_tag(tmp_path: Path) -> None:
    with syslog_socket(tmp_path / "log") as rx:
        h = logfmt.handler("text", f"syslog:{tmp_path / 'log'}")
        h.handle(record("Q1: to=<x@example.net>, status=sent", 1.0))
        h.handle(record("5 failed connects", 1.0, logging.WARNING, "greenmail.scheduler"))
        h.close()
        pid = os.getpid()
        assert rx.recv(4096) == f"<22>greenmail/smtp[{pid}]: Q1: to=<x@example.net>, status=sent".encode()
        assert rx.recv(4096) == f"<20>greenmail/qmgr[{pid}]: warning: 5 failed connects".encode()


def test_syslog_missing_is_an_error_at_set_up(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot send to syslog"):
        logfmt.handler("text", f"syslog:{tmp_path / 'nobody'}")


def test_a_busy_syslog_keeps_lines_for_later_and_never_blocks(tmp_path: Path) -> None:
    with syslog_socket(tmp_path / "log") as rx:
        h = logfmt.SyslogHandler(str(tmp_path / "log"))
        h.setFormatter(logging.Formatter("%(message)s"))
        n = 3000  # more than the kernel queues for a reader that does not read
        started = time.monotonic()
        for i in range(n):
            h.handle(record(f"line {i}", 1.0))
        assert time.monotonic() - started < 5
        rx.setblocking(False)
        got = drain(rx)
        assert 0 < len(got) < n  # the rest waits in the handler, not in a blocked send
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            h.flush()  # the daemon's log writer, every 0.2 s
            got += drain(rx)
        h.close()
    assert got == [f"<22>line {i}".encode() for i in range(n)]


def drain(rx: socket.socket) -> list[bytes]:
    out = []
    try:
        while True:
            out.append(rx.recv(4096))
    except BlockingIOError:
        return out


def test_a_restarted_syslog_is_found_again(tmp_path: Path) -> None:
    path = tmp_path / "log"
    rx = syslog_socket(path)
    h = logfmt.SyslogHandler(str(path))
    h.setFormatter(logging.Formatter("%(message)s"))
    h.handle(record("before", 1.0))
    assert rx.recv(4096) == b"<22>before"
    rx.close()
    path.unlink()
    with syslog_socket(path) as rx2:
        h.handle(record("after", 1.0))
        assert rx2.recv(4096) == b"<22>after"
    h.close()


# -- the delivery line ------------------------------------------------------------------------


def test_the_delivery_line_has_postfix_fields_in_postfix_order() -> None:
    now = time.time()
    t = maillog.Timing(queued=now - 2.0, seen=now - 1.5, connected=now - 1.0, first=True, claimed=now - 0.25)
    line, fields = maillog.delivery(
        "661A3F780866407B15A3415E", "x@example.net", "r[127.0.0.1]:25", t, ("2.0.0", "sent", "250 ok"), 1
    )
    m = re.fullmatch(
        r"661A3F780866407B15A3415E: to=<x@example\.net>, relay=r\[127\.0\.0\.1\]:25, delay=(2\.0\d), "
        r"delays=0\.5/0\.5/0\.75/(0\.2\d?), dsn=2\.0\.0, status=sent \(250 ok\)",
        line,
    )
    assert m, line
    assert fields["delays"][:3] == [0.5, 0.5, 0.75] and fields["attempts"] == 1
    assert fields["event"] == "delivery" and fields["status"] == "sent" and fields["delay"] == float(m[1])


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0"), (0.004, "0"), (0.006, "0.01"), (0.1, "0.1"), (1.25, "1.25"), (12.0, "12"), (100.0, "100")],
)
def test_delays_are_written_like_postfix(value: float, text: str) -> None:
    t = maillog.Timing(queued=0.0, seen=0.0, connected=0.0, first=False, claimed=0.0)
    assert maillog.delays(t, value)[3] == value
    assert maillog._short(value) == text


moments = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(moments, moments, moments, moments, moments, st.booleans())
def test_delays_add_up_to_the_delay(
    queued: float, start: float, conn: float, claim: float, extra: float, first: bool
):
    """Whatever the order of enqueue, start-up and connect, a + b + c + d = done - queued, none negative."""
    started = start
    connected = max(started, conn)  # a connection is opened after the daemon started
    claimed = max(queued, connected, claim)  # a message is claimed after it was queued, on an open connection
    done = claimed + extra
    parts = maillog.delays(maillog.Timing(queued, started, connected, first, claimed), done)
    assert min(parts) >= 0
    assert sum(parts) == pytest.approx(done - queued, abs=1e-6)
    if not first:
        assert parts[2] == 0  # a reused connection: no set-up for this message


def test_queue_entry_and_pickup_lines() -> None:
    assert maillog.queue_entry("Q1", "a@example.org", 1234, 2)[0] == (
        "Q1: from=<a@example.org>, size=1234, nrcpt=2 (queue active)"
    )
    assert maillog.pickup("Q1", 1000, "a")[0] == "Q1: uid=1000 from=<a>"


# -- the daemon's mail-log lines skip the record only when nothing else could see them -------------


@contextlib.contextmanager
def set_up_as_the_daemon(fmt: str) -> Iterator[io.StringIO]:
    """logfmt.setup as the daemon calls it (batched) on a StringIO; root handlers put back after."""
    root = logging.getLogger()
    saved, level, direct = list(root.handlers), root.level, logfmt._direct
    out = io.StringIO()
    logfmt.setup(fmt, stream=out, batched=True)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
        logfmt._direct = direct


@pytest.fixture
def daemon_logging() -> Iterator[io.StringIO]:
    with set_up_as_the_daemon("text") as out:
        yield out


@contextlib.contextmanager
def only_the_daemons_handler() -> Iterator[None]:
    """pytest's own capture handlers off the root meanwhile (it adds them around each test)."""
    root = logging.getLogger()
    others = [h for h in root.handlers if h is not logfmt._direct]
    for h in others:
        root.removeHandler(h)
    try:
        yield
    finally:
        for h in others:
            root.addHandler(h)


def _unstamped(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines()]


def test_a_mail_log_line_is_the_same_straight_or_through_logging(daemon_logging: io.StringIO) -> None:
    """maillog.emit writes straight to the handler; with another handler on the root the record
    goes through logging: the text is the same but for the time, and the other handler gets it."""
    log = logging.getLogger("greenmail.queue")
    line, fields = maillog.queue_entry("661BD7FE3E0330316A44B24D", "a@example.org", 10, 1, 0)
    other = logging.handlers.BufferingHandler(10)
    with only_the_daemons_handler():
        assert logfmt.info(log, "probe")  # nothing else listens: written straight
        maillog.emit(log, line, fields)
        logging.getLogger().addHandler(other)
        try:
            assert not logfmt.info(log, "probe")
            maillog.emit(log, line, fields)
        finally:
            logging.getLogger().removeHandler(other)
    logfmt.flush()
    first, second = _unstamped(daemon_logging.getvalue())[1:]
    assert first == second and first.endswith(f"greenmail/qmgr[{os.getpid()}]: {line}")
    assert [r.getMessage() for r in other.buffer] == [line] and other.buffer[0].fields == fields  # type: ignore[attr-defined]


def test_a_handler_or_filter_below_the_root_turns_the_shortcut_off(daemon_logging: io.StringIO) -> None:
    parent, log = logging.getLogger("greenmail"), logging.getLogger("greenmail.session")
    seen = logging.handlers.BufferingHandler(10)
    quiet = logging.Filter("nothing")  # a filter on the logger itself is asked first
    with only_the_daemons_handler():
        parent.addHandler(seen)
        try:
            assert not logfmt.info(log, "x")
        finally:
            parent.removeHandler(seen)
        log.addFilter(quiet)
        try:
            assert not logfmt.info(log, "x")
            maillog.emit(log, "filtered out", {})
        finally:
            log.removeFilter(quiet)
        assert logfmt.info(log, "x")
        logging.getLogger().setLevel(logging.WARNING)  # INFO off: nothing written either way
        assert not logfmt.info(log, "x")
        maillog.emit(log, "below the level", {})
        logging.getLogger().setLevel(logging.INFO)
        log.setLevel(logging.WARNING)  # on the logger itself
        maillog.emit(log, "below its own level", {})
        log.setLevel(logging.NOTSET)
        logging.disable(logging.INFO)
        try:
            assert not logfmt.info(log, "x")
            maillog.emit(log, "disabled", {})
        finally:
            logging.disable(logging.NOTSET)
        assert logfmt.info(log, "x")
    logfmt.flush()
    written = daemon_logging.getvalue()
    assert "x" in written
    for text in ("filtered out", "below the level", "below its own level", "disabled"):
        assert text not in written


def test_json_lines_never_take_the_shortcut() -> None:
    with set_up_as_the_daemon("json") as out:
        log = logging.getLogger("greenmail.queue")
        with only_the_daemons_handler():
            assert not logfmt.info(log, "x")
        maillog.emit(log, *maillog.queue_entry("661BD7FE3E0330316A44B24D", "a@example.org", 10, 1, 0))
        logfmt.flush()
        assert json.loads(out.getvalue())["event"] == "queued"


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_the_delivery_fields_read_back_from_the_text_are_round_x_2(x: float) -> None:
    """delivery()'s JSON delays are its text read back: the same numbers as round(x, 2)."""
    assert float(maillog._short(x)) == round(x, 2) == float(f"{x:.2f}")
