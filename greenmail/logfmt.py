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
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s greenmail[%(process)d]: %(levelname)s %(message)s"
RESERVED = ("time", "level", "logger", "pid", "message")  # JSON keys fields cannot override
SECRET_WORDS = ("password", "secret", "token")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, event, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
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


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(FORMATS)})")


def setup(fmt: str = "text", verbose: bool = False, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in ``fmt``; DEBUG with ``verbose``, else INFO.

    Python warnings go through logging too, so that with ``json`` every line is JSON.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


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
