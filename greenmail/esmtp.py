"""ESMTP service extensions as they bear on one message: SIZE, 8BITMIME, SMTPUTF8.

Owns: the MAIL FROM parameters a message needs, and refusing recipients
up front when the relay cannot take the message (too big for its SIZE, or
non-ASCII addresses without SMTPUTF8) - permanent failures, before DATA.
Must not touch: sockets, the spool's directories.
"""

from __future__ import annotations

from greenmail.protocol import Transaction
from greenmail.wire import Reply


def relay_size_limit(extensions: dict[str, str]) -> int:
    """The relay's advertised SIZE (0 = none or unlimited)."""
    value = extensions.get("SIZE", "").strip()
    return int(value) if value.isascii() and value.isdigit() else 0


def precheck(txn: Transaction, extensions: dict[str, str], size: int, sender: str) -> bool:
    """Refuse what the relay cannot take; returns whether SMTPUTF8 must be asked for."""
    limit = relay_size_limit(extensions)
    if limit and size > limit:
        reply = Reply(552, (f"5.3.4 message size {size} exceeds the relay's limit of {limit} bytes",))
        for rcpt in txn.recipients:
            txn.refuse(rcpt, reply)
        return False
    utf8 = not sender.isascii() or any(not r.isascii() for r in txn.recipients)
    if not utf8 or "SMTPUTF8" in extensions:
        return utf8
    reply = Reply(553, ("5.6.7 non-ASCII address and the relay does not offer SMTPUTF8",))
    for rcpt in txn.recipients:
        if not sender.isascii() or not rcpt.isascii():
            txn.refuse(rcpt, reply)
    return False


def mail_params(extensions: dict[str, str], size: int, eight_bit: bool, utf8: bool) -> str:
    """The parameters after MAIL FROM:<...>, each only if the relay offers it."""
    params = []
    if "SIZE" in extensions:
        params.append(f"SIZE={size}")
    if eight_bit and "8BITMIME" in extensions:
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    return "".join(" " + p for p in params)
