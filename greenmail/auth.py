"""SASL client mechanisms for SMTP AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5.

Owns: choosing a mechanism from what the relay advertises and the
configured preference, and computing each client response.
Must not touch: sockets, logging (a response may hold the password).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def choose(advertised: str, preference: Iterable[str]) -> str | None:
    """The first mechanism of ``preference`` in the relay's AUTH line, if any."""
    offered = {m.upper() for m in advertised.split()}
    return next((m for m in preference if m in offered), None)


def initial(mechanism: str, username: str, password: str) -> str | None:
    """The initial response sent with AUTH (None: wait for the first challenge)."""
    if mechanism == "PLAIN":
        return b64(b"\0" + username.encode() + b"\0" + password.encode())
    return None


def respond(mechanism: str, step: int, challenge: str, username: str, password: str) -> str:
    """The answer to challenge number ``step`` (0-based) of a 334 reply."""
    if mechanism == "LOGIN":
        return b64((username if step == 0 else password).encode())
    if mechanism == "CRAM-MD5":
        nonce = base64.b64decode(challenge.strip() or "")
        digest = hmac.new(password.encode(), nonce, hashlib.md5).hexdigest()
        return b64(f"{username} {digest}".encode())
    raise ValueError(f"{mechanism} takes no challenge")
