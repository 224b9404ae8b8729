"""The daemon's log path: the text time stamp made once a second, and lines written in batches."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest

from greenmail import logfmt


def record(msg: str, created: float, level: int = logging.INFO) -> logging.LogRecord:
    r = logging.LogRecord("greenmail.session", level, __file__, 1, msg, None, None)
    r.created = created
    r.msecs = (created - int(created)) * 1000
    return r


@pytest.mark.parametrize("created", [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_600_000_000.25])
def test_text_formatter_matches_the_stock_formatter(created: float) -> None:
    ours, stock = logfmt.TextFormatter(), logging.Formatter(logfmt.TEXT_FORMAT)
    ours.format(record("warm the cache", created - 1))  # a cached second must not leak into the next
    for t in (created, created + 0.001, created + 1):
        assert ours.format(record("x", t)) == stock.format(record("x", t))


def test_text_formatter_writes_the_pid_when_records_carry_none() -> None:
    """logfmt.setup turns off the getpid() per record: the line must not change."""
    ours = logfmt.TextFormatter()
    with_pid = record("x", 1_700_000_000.5)
    without = record("x", 1_700_000_000.5)
    without.process = None
    assert with_pid.process == os.getpid()
    assert ours.format(without) == ours.format(with_pid)
    assert f"greenmail[{os.getpid()}]: INFO x" in ours.format(without)
    assert json.loads(logfmt.JsonFormatter().format(without))["pid"] == os.getpid()


def handler(stream: io.StringIO, interval: float = 3600.0) -> logfmt.BatchingHandler:
    h = logfmt.BatchingHandler(stream, interval=interval)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return h


def test_info_lines_wait_for_flush_and_come_out_in_order() -> None:
    out = io.StringIO()
    h = handler(out)
    for i in range(3):
        h.handle(record(f"line {i}", 1.0))
    assert out.getvalue() == ""
    h.flush()
    assert out.getvalue() == "INFO line 0\nINFO line 1\nINFO line 2\n"
    h.flush()  # nothing pending: nothing written
    assert out.getvalue().count("\n") == 3


def test_a_warning_is_written_at_once_after_what_was_pending() -> None:
    out = io.StringIO()
    h = handler(out)
    h.handle(record("before", 1.0))
    h.handle(record("trouble", 1.0, logging.WARNING))
    assert out.getvalue() == "INFO before\nWARNING trouble\n"


def test_a_full_batch_is_written_without_waiting() -> None:
    out = io.StringIO()
    h = handler(out)
    for i in range(h.MAX_PENDING):
        h.handle(record(f"{i}", 1.0))
    assert out.getvalue().count("\n") == h.MAX_PENDING


def test_the_interval_bounds_how_long_a_line_waits_when_more_come() -> None:
    out = io.StringIO()
    h = handler(out, interval=0.0)
    h.handle(record("a", 1.0))
    assert out.getvalue() == "INFO a\n"


def test_logging_shutdown_writes_what_is_pending() -> None:
    out = io.StringIO()
    h = handler(out)
    h.handle(record("last words", 1.0))
    logging.shutdown([lambda: h])  # what the interpreter runs at exit
    assert out.getvalue() == "INFO last words\n"
