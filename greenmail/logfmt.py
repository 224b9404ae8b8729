"""Log set-up: the shape of greenmail's log lines and where they go.

Owns: the text format (syslog-shaped, with Postfix's service tags and level words, so
that pflogsumm and other mail-log tools read it; the lines themselves are maillog.py's),
the JSON format, the targets (stderr, with journald priorities when stderr is the
journal; syslog; a file reopened on request), the batching of lines, and the
configuration dump. A record may carry structured data in ``extra={"fields": {...}}``:
the JSON format puts it at top level, the text shows only the message.
Must not touch: what is logged (callers decide) -- callers never pass passwords or
message bodies; ``redact`` is for configuration dumps.
Imports nothing of greenmail, so ``greenmail enqueue`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
PIPE_BUF = 4096  # bytes a pipe writes at once (POSIX: at least 512; Linux: 4096)
RESERVED = ("time", "level", "logger", "pid", "message")  # JSON keys fields cannot override
SECRET_WORDS = ("password", "secret", "token")
SYSLOG_NAME = "greenmail"  # pflogsumm --syslog-name=greenmail
# Postfix's service names, by logger: the tag is greenmail/SERVICE[pid]
SERVICES = {
    "greenmail": "master", "greenmail.workers": "master",
    "greenmail.session": "smtp", "greenmail.connection": "smtp", "greenmail.shaping": "smtp",
    "greenmail.queue": "qmgr", "greenmail.scheduler": "qmgr", "greenmail.spool": "qmgr",
    "greenmail.bounce": "bounce", "greenmail.pickup": "pickup",
}  # fmt: skip
# Postfix's word before a message (none for information), and the syslog(3) priority
LEVELS = {50: ("fatal: ", 2), 40: ("error: ", 3), 30: ("warning: ", 4), 20: ("", 6), 10: ("debug: ", 7)}


def level_word(levelno: int) -> tuple[str, int]:
    """The Postfix word ("warning: ") and the syslog priority of a level (a custom one: the next below)."""
    return LEVELS.get(levelno) or LEVELS[max((k for k in LEVELS if k <= levelno), default=10)]


def service(logger: str) -> str:
    """The service tag of a logger: SERVICES, else the last part of its name."""
    return SERVICES.get(logger) or logger.rpartition(".")[2] or "master"


# -- formats --------------------------------------------------------------------------------


class LineFormatter(logging.Formatter):
    """A record as one line: a head, then the body (text: "warning: message"; JSON: an object).

    Heads: "stamp" (stderr and files: RFC 3339 time, host, greenmail/SERVICE[pid]:), "tag"
    (syslog, which adds time and host: greenmail/SERVICE[pid]:), "journal" (journald adds
    all that: "<N>" on every line, the priority), "" (nothing, JSON on stderr and files).
    """

    def __init__(self, json_body: bool = False, head: str = "stamp") -> None:
        super().__init__()
        self.json_body = json_body
        self.head = head
        self.pid = os.getpid()
        self.host = socket.gethostname().split(".")[0] or "localhost"
        self._tags: dict[str, str] = {}
        self._second = -1
        self._stamp = ("", "")
        self._ms, self._ms_stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        body = self.json(record) if self.json_body else self.text(record)
        return self.headed(record.name, record.levelno, record.created, body)

    def headed(self, logger: str, levelno: int, created: float, body: str) -> str:
        """``body`` behind this formatter's head."""
        head = self.head
        if head == "stamp":
            return f"{self.stamp(created)} {self.host} {self._tags.get(logger) or self.tag(logger)} {body}"
        if head == "journal":
            prefix = f"<{level_word(levelno)[1]}>"
            return prefix + body.replace("\n", "\n" + prefix)
        if head == "tag":
            return f"{self.tag(logger)} {body}"
        return body

    def text(self, record: logging.LogRecord) -> str:
        message = level_word(record.levelno)[0] + record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message

    def json(self, record: logging.LogRecord) -> str:
        """time, level, logger, pid, event, message, then the record's fields."""
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

    def tag(self, logger: str) -> str:
        tag = self._tags.get(logger)
        if tag is None:
            tag = self._tags[logger] = f"{SYSLOG_NAME}/{service(logger)}[{self.pid}]:"
        return tag

    def stamp(self, created: float) -> str:
        """RFC 3339 local time with milliseconds and offset: 2026-11-28T14:15:39.347+01:00.

        The part without milliseconds is made once a second, the whole once a millisecond
        (several lines per message).
        """
        ms = round(created * 1_000_000) // 1000  # as datetime rounds
        if ms == self._ms:
            return self._ms_stamp
        second, milli = divmod(ms, 1000)
        if second != self._second:
            local = time.localtime(second)
            off = local.tm_gmtoff // 60
            zone = f"{'+' if off >= 0 else '-'}{abs(off) // 60:02d}:{abs(off) % 60:02d}"
            self._stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", local), zone)
            self._second = second
        self._ms, self._ms_stamp = ms, f"{self._stamp[0]}.{milli:03d}{self._stamp[1]}"
        return self._ms_stamp


def _iso(created: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-11-28T14:15:39.347Z."""
    whole = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((created - whole) * 1000):03d}Z"


def formatter(fmt: str, head: str | None = None) -> logging.Formatter:
    """The formatter of ``fmt`` ("text" or "json"); ``head`` as in LineFormatter (default per format)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")
    json_body = fmt == "json"
    return LineFormatter(json_body, head if head is not None else ("" if json_body else "stamp"))


# -- targets --------------------------------------------------------------------------------


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
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line, record.levelno >= logging.WARNING)

    def add(self, line: str, now: bool) -> None:
        """A formatted line, written now or with the batch."""
        self._pending.append(line)
        if now or len(self._pending) >= self.MAX_PENDING or time.monotonic() - self._last >= self.interval:
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


class FileHandler(BatchingHandler):
    """Batched lines appended to a file; ``reopen()`` (SIGUSR1) starts on the file now at the path.

    After logrotate moved the file away, the lines pending at the signal still go to
    the old file, every later one to the new: none is lost.
    """

    def __init__(self, path: str, interval: float = 0.2) -> None:
        self.path = path
        super().__init__(self._open(), interval)

    def _open(self) -> TextIO:
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115

    def reopen(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.flush()
            fresh = self._open()  # first: if it cannot be opened, the old file goes on
            old, self.stream = self.stream, fresh
            old.close()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.flush()
            self.stream.close()
        super().close()


class SyslogHandler(logging.handlers.SysLogHandler):
    """The stdlib SysLogHandler, facility mail, to a local socket (/dev/log), never blocking.

    A datagram the syslog daemon cannot take now (its queue is full, or it is restarting)
    waits in a bounded backlog for the next ``flush()`` (the daemon calls it every 0.2 s);
    when the backlog overflows, the oldest lines are dropped and the count told on stderr.
    """

    MAX_BACKLOG = 10_000

    def __init__(self, address: str = "/dev/log") -> None:
        super().__init__(address, facility=self.LOG_MAIL, socktype=socket.SOCK_DGRAM)
        self.append_nul = False
        self._backlog: deque[bytes] = deque()
        self.dropped = 0
        self._connect()
        if self.socket is None:
            raise OSError(f"cannot send to syslog at {address}")

    def _connect(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = None
        self.createSocket()  # the stdlib swallows a failure to connect: a closed socket is left
        if self.socket is not None and self.socket.fileno() >= 0:
            self.socket.setblocking(False)
        else:
            self.socket = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = self.encodePriority(self.facility, self.mapPriority(record.levelname))
            data = f"<{prio}>{self.format(record)}".encode()
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            if len(self._backlog) >= self.MAX_BACKLOG:
                self._backlog.popleft()
                self.dropped += 1
            self._backlog.append(data)
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            for retry in (False, True):
                if self.socket is None or retry:
                    self._connect()
                try:
                    while self._backlog and self.socket is not None:
                        self.socket.send(self._backlog[0])
                        self._backlog.popleft()
                    break
                except BlockingIOError:
                    return  # the syslog daemon is busy: the next flush tries again
                except OSError:
                    continue  # it went away (restarted): connect again, once
            if self.dropped and not self._backlog:
                sys.stderr.write(f"greenmail: syslog was not reachable: {self.dropped} log lines lost\n")
                self.dropped = 0


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


_ROOT = logging.getLogger()
_INFO = logging.INFO
_direct: BatchingHandler | None = None  # setup()'s handler when it writes text (see info())


def info(logger: logging.Logger, message: str) -> bool:
    """Write an INFO line of ``logger`` straight to the daemon's text handler, as logging would.

    Done (True) when INFO is enabled for ``logger`` and a record of it would reach only
    the handler ``setup()`` installed on the root, unfiltered (the text format shows no
    fields). Else False: the record must go through ``Logger.handle`` if enabled. Checked
    on every call: a handler added since (a test's capture, say) is never missed.
    """
    h = _direct
    root = _ROOT
    if h is None or logger.filters or logger.disabled or h.filters or h.level > _INFO:
        return False
    if root.manager.disable >= _INFO:  # logging.disable()
        return False
    name, level = logger.name, logger.level  # the effective level: the first set, up to the root
    while logger is not root:
        if logger.handlers or not logger.propagate or logger.parent is None:
            return False
        logger = logger.parent
        level = level or logger.level
    if level > _INFO:
        return False
    handlers = root.handlers
    if len(handlers) != 1 or handlers[0] is not h:
        return False
    line = h.formatter.headed(name, _INFO, time.time(), message)  # type: ignore[union-attr]
    with h.lock:  # type: ignore[union-attr]
        h.add(line, False)
    return True


def on_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to journald ($JOURNAL_STREAM names its device and inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def parse_target(target: str) -> tuple[str, str]:
    """ "stderr", "syslog", "syslog:SOCKET" or "file:PATH" as (kind, where)."""
    kind, _, where = target.partition(":")
    if kind == "stderr" and not where:
        return kind, ""
    if kind == "syslog":
        return kind, where or "/dev/log"
    if kind == "file" and where:
        return kind, where
    raise ValueError(f"log target {target!r}: expected stderr, syslog, syslog:SOCKET or file:PATH")


def handler(
    fmt: str, target: str = "stderr", stream: TextIO | None = None, batched: bool = False
) -> logging.Handler:
    """The handler for ``target`` writing ``fmt``; OSError when the file or syslog cannot be opened."""
    kind, where = parse_target(target)
    out: logging.Handler
    if kind == "syslog":
        out, head = SyslogHandler(where), "tag"
    elif kind == "file":
        out, head = FileHandler(where), None
    else:
        stream = stream or sys.stderr
        out = BatchingHandler(stream) if batched else logging.StreamHandler(stream)
        head = "journal" if on_journal(stream) else None
    out.setFormatter(formatter(fmt, head))
    return out


def setup(
    fmt: str = "text",
    verbose: bool = False,
    stream: TextIO | None = None,
    batched: bool = False,
    target: str = "stderr",
) -> None:
    """Send every log record to ``target`` in ``fmt``; DEBUG with ``verbose``, else INFO.

    Python warnings go through logging too, so that with ``json`` every line is JSON.
    ``batched`` (the daemon, which calls ``flush()`` periodically): see BatchingHandler;
    files are always batched. Records are not asked for their source line, thread or
    process (nothing shows them, the formatter knows the pid): that is most of a record's cost.
    """
    new = handler(fmt, target, stream, batched)  # first: a target that fails leaves logging as it was
    logging._srcfile = None  # type: ignore[attr-defined]  # the logging HOWTO's optimisation
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(new)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    global _direct
    lf = new.formatter
    text = isinstance(lf, LineFormatter) and not lf.json_body
    _direct = new if isinstance(new, BatchingHandler) and text else None
    logging.captureWarnings(True)


def flush() -> None:
    """Write every pending log line now."""
    for h in logging.getLogger().handlers:
        h.flush()


def reopen() -> int:
    """Reopen the log files (SIGUSR1, after logrotate); returns how many there were."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, FileHandler)]
    for h in files:
        h.reopen()
    return len(files)


# -- the configuration dump -------------------------------------------------------------


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
        if key.endswith("dsn") and isinstance(value, str):
            out[key] = redact_dsn(value)
    return out


def redact_dsn(dsn: str) -> str:
    """A libpq connection string with its password hidden (URI or key=value form)."""
    import re

    dsn = re.sub(r"^([a-z]+://[^:/@?]*:)[^/?]*@", r"\1***@", dsn)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn)


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
