"""Log set-up: the text and JSON formats of greenmail's log lines on stderr.

Owns: the two formatters and ``setup``. A record may carry structured data
in ``extra={"fields": {...}}`` (the delivery line: event, queue_id, to,
relay, delay, attempts, dsn, status, reply); the text format shows only the
message, the JSON format one object per line with the fields at top level.
Must not touch: what is logged (callers decide) -- callers never pass
passwords or message bodies; ``redact`` is for configuration dumps.
Imports nothing of greenmail, so ``greenmail enqueue`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s greenmail[%(process)d]: %(levelname)s %(message)s"
PIPE_BUF = 4096  # bytes a pipe writes at once (POSIX: at least 512; Linux: 4096)
RESERVED = ("time", "level", "logger", "pid", "message")  # JSON keys fields cannot override
SECRET_WORDS = ("password", "secret", "token")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, event, message, then the record's fields."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process if record.process is not None else self.pid,
            "event": "log",
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update((k, v) for k, v in fields.items() if k not in RESERVED)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-28T14:15:39.347Z."""
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((created - whole) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with the time string made once per second (a delivery line per recipient)
    and the pid written in when no record carries one (see ``setup``)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._pid_style = logging.PercentStyle(TEXT_FORMAT.replace("%(process)d", str(os.getpid())))
        self._second = -1
        self._stamp = ""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return (self._style if record.process is not None else self._pid_style).format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return self.default_msec_format % (self._stamp, record.msecs)


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: one write per ``interval`` rather than one per record.

    A WARNING or worse is written at once (with what is pending before it);
    so is a batch of ``MAX_PENDING`` lines. ``flush()`` writes what is
    pending: the daemon calls it every ``interval``, and logging calls it at
    exit. A kill -9 may lose the last ``interval`` of INFO lines.
    """

    MAX_PENDING = 512

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        super().__init__(stream)
        self.interval = interval
        self._pending: list[str] = []
        self._last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if (
            record.levelno >= logging.WARNING
            or len(self._pending) >= self.MAX_PENDING
            or time.monotonic() - self._last >= self.interval
        ):
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._last = time.monotonic()
            if not self._pending:
                return
            lines, self._pending = self._pending, []
            try:
                for piece in _pieces(lines, PIPE_BUF):
                    self.stream.write(piece)
                    self.stream.flush()
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": lines[0]}))


def _pieces(lines: list[str], size: int) -> Iterator[str]:
    """The lines joined into pieces of at most ``size`` bytes where they allow it.

    Several delivery processes write to one stderr; a write of up to
    PIPE_BUF bytes to a pipe is never interleaved with another's.
    """
    piece: list[str] = []
    length = 0
    for line in lines:
        n = len(line.encode()) + 1 if not line.isascii() else len(line) + 1
        if piece and length + n > size:
            yield "\n".join(piece) + "\n"
            piece, length = [], 0
        piece.append(line)
        length += n
    if piece:
        yield "\n".join(piece) + "\n"


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")


def setup(
    fmt: str = "text", verbose: bool = False, stream: TextIO | None = None, batched: bool = False
) -> None:
    """Send every log record to ``stream`` (stderr) in ``fmt``; DEBUG with ``verbose``, else INFO.

    Python warnings go through logging too, so that with ``json`` every line is JSON.
    ``batched`` (the daemon, which calls ``flush()`` periodically): see BatchingHandler.
    Records are not asked for their source line or thread (nothing shows them):
    that is most of a record's cost.
    """
    logging._srcfile = None  # type: ignore[attr-defined]  # the logging HOWTO's optimisation
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # getpid() is a system call per record: the formatters know the pid
    out = stream or sys.stderr
    handler = BatchingHandler(out) if batched else logging.StreamHandler(out)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def flush() -> None:
    """Write every pending log line now."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def settings(config: Any) -> dict[str, Any]:
    """The configuration as flat, JSON-friendly, redacted {"section.key": value}."""
    return redact(flatten(config))


def settings_text(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs for the text line (lists joined with commas)."""
    return " ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in values.items())


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with every secret-looking key's value hidden.

    ``*_file`` and ``*_env`` keys name where a secret is, not the secret, and stay.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        reference = key.endswith(("_file", "_env"))
        secret = any(w in key.lower() for w in SECRET_WORDS) and not reference
        out[key] = "***" if secret and value else value
    return out


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass tree (the Config) as {"section.key": value}, in declaration order; None left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(flatten(value, key + "."))
        elif isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, tuple | list | frozenset | set):
            out[key] = [str(v) for v in value]
        elif value is not None:
            out[key] = str(value)
    return out
