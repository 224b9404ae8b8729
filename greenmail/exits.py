"""How commands end: the exit codes (sysexits), one-line errors, and the two steps every command starts with.

Owns: EX_* codes, ``fail`` (one ``greenmail:`` line on stderr, then exit),
loading the configuration (exit 78 naming the key) and opening the queue
(exit 73 when it cannot be set up) for a command. Used by the click
commands and by ``greenmail enqueue``'s start without click.
Must not touch: what the commands do.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from greenmail.config import Config
    from greenmail.queue import QueueAdmin

EX_USAGE, EX_DATAERR, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 64, 65, 70, 73, 75, 78


def fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"greenmail: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def load_config(path: str | None) -> Config:
    from greenmail.config import load
    from greenmail.errors import ConfigError

    try:
        return load(path)
    except ConfigError as e:
        fail(f"configuration error: {e}", EX_CONFIG)


def open_queue(cfg: Config, code: int = EX_CANTCREAT) -> QueueAdmin:
    """The configured queue for a command; exits with ``code`` when it cannot be set up."""
    from greenmail import backends
    from greenmail.errors import GreenmailError

    try:
        return backends.admin_queue(cfg)
    except GreenmailError as e:
        fail(str(e), code)
