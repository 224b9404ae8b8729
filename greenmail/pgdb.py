"""Connections to PostgreSQL for the shared queue ([queue] backend = "postgresql").

Owns: importing psycopg so that its waits cooperate with gevent in the daemon
(gevent patches ``select`` before psycopg is first imported: psycopg picks its
wait function at import, and its C wait would block the hub), the connection
string with the password file, and the timeouts every connection carries
(connecting, each statement, idle transactions, TCP keepalives), and in the
daemon the database host's name looked up without blocking the hub.
Must not touch: the schema, the queue's rows, SMTP.
"""

from __future__ import annotations

import os
import sys

from greenmail.errors import ConfigError, QueueUnavailable

TYPE_CHECKING = False  # typing costs `greenmail enqueue` ~5 ms per call (pgsubmit.py imports this module)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import ModuleType
    from typing import Any

PSYCOPG = (3, 2)  # the first psycopg whose notifies() takes a timeout (the node's wake-ups)
CONNECT_TIMEOUT = 10  # seconds for one connection attempt
STATEMENT_TIMEOUT = 30_000  # milliseconds any one statement may run
IDLE_IN_TRANSACTION = 60_000  # milliseconds a transaction may sit idle before the server ends it


def psycopg(cooperative: bool) -> ModuleType:
    """The psycopg module; ``cooperative``: its waits must yield to gevent's hub (the daemon).

    Imported after gevent patched ``select`` in every process, commands too: a command may go on
    to run the daemon in the same process (`sendmail -q` with no daemon running)."""
    if "psycopg" not in sys.modules:
        from gevent import monkey

        monkey.patch_select()
    elif cooperative and not _waits_cooperate():
        raise RuntimeError("psycopg was imported before gevent patched select: its waits would block")
    try:
        import psycopg as module
    except ImportError:
        raise ConfigError(
            'queue.backend = "postgresql" needs psycopg 3: pip install "greenmail[postgresql]"'
        ) from None
    if not new_enough(module.__version__):
        raise ConfigError(
            f'queue.backend = "postgresql" needs psycopg {".".join(map(str, PSYCOPG))} or later'
            f' (found {module.__version__}): pip install "greenmail[postgresql]"'
        )
    return module


def new_enough(version: str) -> bool:
    """Whether a psycopg version string (3.1.7, 3.2.0.dev1, 3.3.9) is at least PSYCOPG."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = len(piece) - len(piece.lstrip("0123456789"))  # the leading digits ("2rc1": 2)
        parts.append(int(piece[:digits] or 0))
    return tuple(parts) >= PSYCOPG


def _waits_cooperate() -> bool:
    from gevent import monkey

    return monkey.is_module_patched("select")


def keywords(
    password_file: str | os.PathLike[str] | None, application: str, settings: Mapping[str, str] | None = None
) -> dict[str, str]:
    """libpq's connection keywords besides the DSN: the timeouts, the session's other ``settings``,
    and the password file's first line."""
    extra = "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
    keys = {
        "application_name": application,
        "connect_timeout": str(CONNECT_TIMEOUT),
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT}"
        f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}{extra}",
    }
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                keys["password"] = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"queue.password_file: cannot read {password_file}: {e}") from None
    return keys


def connect(
    dsn: str,
    password_file: str | os.PathLike[str] | None,
    application: str = "greenmail",
    cooperative: bool = False,
    settings: Mapping[str, str] | None = None,
) -> Any:
    """An autocommit connection (a transaction only where ``with conn.transaction()`` says);
    QueueUnavailable when PostgreSQL cannot be reached (the message names why, never the password)."""
    pg = psycopg(cooperative)
    keys = keywords(password_file, application, settings)
    try:
        if cooperative:
            keys.update(resolved(pg.conninfo.conninfo_to_dict(dsn)))
        return pg.connect(dsn, autocommit=True, **keys)
    except pg.Error as e:
        raise QueueUnavailable(f"PostgreSQL is unavailable: {first_line(e)}") from None


def resolved(params: Mapping[str, Any]) -> dict[str, str]:
    """``host``, ``hostaddr`` and ``port`` for a DSN naming its hosts: their addresses looked up by
    gevent's resolver (psycopg would ask the blocking socket.getaddrinfo, and the daemon does not
    patch socket); {} when there is nothing to look up (addresses, socket directories, or
    ``hostaddr`` given)."""
    import ipaddress

    import gevent
    from gevent import socket as gsocket

    hosts = str(params.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if params.get("hostaddr") or len(ports) not in (1, len(hosts)):
        return {}  # as given (libpq reports a mismatch of the lists)
    out: list[tuple[str, str, str]] = []  # (host, hostaddr, port): "" as hostaddr: use the host
    named = False  # a name was looked up
    for host, port in zip(hosts, ports * len(hosts) if len(ports) == 1 else ports, strict=True):
        try:
            out.append((host, str(ipaddress.ip_address(host)), port))
            continue
        except ValueError:
            pass
        if not host or host.startswith("/"):
            out.append((host, "", port))
            continue
        late = QueueUnavailable(f"PostgreSQL is unavailable: looking up {host}: no answer")
        try:
            with gevent.Timeout(CONNECT_TIMEOUT, late):
                found = gsocket.getaddrinfo(
                    host, port or "5432", type=gsocket.SOCK_STREAM, proto=gsocket.IPPROTO_TCP
                )
        except OSError as e:
            raise QueueUnavailable(f"PostgreSQL is unavailable: cannot resolve {host}: {e}") from None
        out += [(host, address, port) for address in dict.fromkeys(str(info[4][0]) for info in found)]
        named = True
    if not named:
        return {}
    keys = {key: ",".join(row[i] for row in out) for i, key in enumerate(("host", "hostaddr", "port"))}
    if not any(port for _, _, port in out):
        del keys["port"]  # libpq's default
    return keys


def first_line(e: BaseException) -> str:
    """An error's first line (psycopg's messages run over several)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
