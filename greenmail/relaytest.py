"""``greenmail relay test``: open a session with each configured relay as the daemon would, send nothing.

Owns: running connect, banner, EHLO, STARTTLS (with the configured
verification) and AUTH through connection.py, and describing each step
and what the relay offers; the exit code of a failure: 69 (unavailable:
refused by the relay's policy, TLS or authentication, a protocol error)
or 75 (temporary: cannot connect, timeout, connection lost, a 4xx).
Must not touch: the queue, messages.
"""

from __future__ import annotations

from collections.abc import Iterator

from greenmail.config import Config
from greenmail.connection import Connection, Transport
from greenmail.errors import AuthFailed, ProtocolError, RelayRefused, SmtpError, TlsFailed
from greenmail.metrics import Metrics

EX_UNAVAILABLE, EX_TEMPFAIL = 69, 75


def exit_code(e: SmtpError) -> int:
    """69 for what will fail again until something is changed, 75 for what may pass later."""
    if isinstance(e, TlsFailed | AuthFailed | ProtocolError):
        return EX_UNAVAILABLE
    if isinstance(e, RelayRefused) and ": 5" in str(e):  # a 5xx banner or HELO
        return EX_UNAVAILABLE
    return EX_TEMPFAIL


def run(cfg: Config, helo: str) -> Iterator[str]:
    """The report, a line per step; raises SmtpError for the step that failed (its ``stage``)."""
    rc = cfg.relay
    transport = Transport.build(rc, cfg.timeouts, Metrics(1), helo)
    conn = Connection(transport)
    conn.open()
    try:
        yield f"connect: ok, {conn.relay}"
        yield "banner: ok"
        yield "ehlo: ok, the relay offers " + (" ".join(_offers(conn.extensions)) or "nothing")
        if conn.tls:
            cipher = conn.sock.cipher() if hasattr(conn.sock, "cipher") else None  # type: ignore[union-attr]
            what = f"{cipher[1]} {cipher[0]}" if cipher else "on"
            check = "certificate verified" if rc.tls_verify else "certificate NOT verified (relay.tls_verify)"
            yield f"tls: ok, {what}, {check}"
        else:
            yield f"tls: not used (relay.tls = {rc.tls_mode})"
        yield f"auth: ok as {rc.username}" if rc.username else "auth: not configured"
    finally:
        conn.quit()
        conn.close()


def _offers(ext: dict[str, str]) -> Iterator[str]:
    for name, value in ext.items():
        yield f"{name}={value.replace(' ', ',')}" if value else name
