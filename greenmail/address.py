"""Envelope address checks.

Owns: what an acceptable envelope sender or recipient is.
Must not touch: files, sockets, gevent.
"""

from __future__ import annotations

from greenmail.errors import AddressError

MAX_LENGTH = 254  # RFC 5321 4.5.3.1.3: a path is at most 256 octets with its < >


def check(addr: str, *, null_ok: bool = False) -> str:
    """Return the address as stored in the spool, or raise AddressError.

    ``null_ok`` admits the null sender, written ``<>`` (or as an empty string)
    and stored as "".
    """
    if null_ok and addr in ("", "<>"):
        return ""
    if not addr:
        raise AddressError("empty address")
    if not _clean(addr):
        raise AddressError(f"address {addr!r} contains whitespace or a control character")
    for c in "<>,":
        if c in addr:
            raise AddressError(f"address {addr!r} contains {c!r}")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"address {addr!r} is not of the form local@domain")
    try:
        size = len(addr.encode("utf-8"))
    except UnicodeEncodeError:
        raise AddressError(f"address {addr!r} is not valid UTF-8") from None
    if size > MAX_LENGTH:
        raise AddressError(f"address {addr[:40]!r}... is longer than {MAX_LENGTH} octets")
    return addr


def _clean(addr: str) -> bool:
    """No whitespace and no control character (C0 or DEL) in ``addr``."""
    if addr.isascii():  # the common case, without a loop: ASCII printable is exactly 0x20-0x7E
        return addr.isprintable() and " " not in addr
    return not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in addr)


def lenient(field: str, *, null_ok: bool = False) -> str:
    """Check an address read from a queue file, where <angle brackets> are tolerated."""
    field = field.strip()
    if field.startswith("<") and field.endswith(">"):
        field = field[1:-1]
    return check(field, null_ok=null_ok)
