"""A strict reader for the plain subset of TOML a greenmail.toml is written in.

Owns: ``loads``, which returns exactly what ``tomllib.loads`` returns for a
document inside the subset and None ("not sure") for anything else; the caller
then asks tomllib, which also words the errors. It exists because importing
tomllib (typing, datetime, re) costs more than a ``greenmail enqueue`` should.

The subset, line by line (ASCII only; LF or CRLF line ends; spaces and tabs):
blank lines and ``# comments``; table headers ``[name]``; ``key = value``
with bare keys; values: "basic" strings without backslashes, 'literal'
strings, decimal integers (at most 18 digits, no underscores), decimals
like 1.5 (no exponent, inf or nan), true, false, and one-line arrays of
those. Every other construct — dotted or quoted keys, escapes, multi-line
strings or arrays, inline tables, dates, a key or table defined twice —
is declined, never guessed at.
Must not touch: the meaning of any key (confcheck.py), files.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
DIGITS = frozenset("0123456789")
ENDS = " \t,]#"  # what may follow a number or boolean
MAX_DIGITS = 18


class _Decline(Exception):
    """The document is outside the subset."""


def loads(data: bytes) -> dict[str, Any] | None:
    """The document as tomllib would return it, or None when it is outside the subset."""
    if not data.isascii():
        return None
    text = data.decode("ascii").replace("\r\n", "\n")
    if not text.replace("\t", " ").replace("\n", " ").isprintable():
        return None  # control characters (a lone CR among them): tomllib's to judge
    root: dict[str, Any] = {}
    table = root
    try:
        for line in text.split("\n"):
            s = line.lstrip(" \t")
            if not s or s[0] == "#":
                continue
            if s[0] == "[":
                name, rest = _header(s)
                if name in root:
                    return None
                table = root[name] = {}
            else:
                key, value, rest = _pair(s)
                if key in table:
                    return None
                table[key] = value
            if rest and rest[0] != "#":
                return None
    except _Decline:
        return None
    return root


def _bare(s: str) -> tuple[str, str]:
    """The bare key at the start of ``s`` and what follows it."""
    i = 0
    while i < len(s) and s[i] in BARE:
        i += 1
    if not i:
        raise _Decline
    return s[:i], s[i:]


def _header(s: str) -> tuple[str, str]:
    """``[name]``: the name and the rest of the line, stripped."""
    if s.startswith("[["):
        raise _Decline
    name, rest = _bare(s[1:].lstrip(" \t"))
    rest = rest.lstrip(" \t")
    if not rest.startswith("]"):
        raise _Decline
    return name, rest[1:].lstrip(" \t")


def _pair(s: str) -> tuple[str, Any, str]:
    """``key = value``: key, value and the rest of the line, stripped."""
    key, rest = _bare(s)
    rest = rest.lstrip(" \t")
    if not rest.startswith("="):
        raise _Decline
    value, rest = _value(rest[1:].lstrip(" \t"))
    return key, value, rest.lstrip(" \t")


def _value(s: str) -> tuple[Any, str]:
    """A value at the start of ``s`` and what follows it."""
    if s.startswith("["):
        return _array(s[1:])
    return _scalar(s)


def _array(s: str) -> tuple[list[Any], str]:
    items: list[Any] = []
    while True:
        s = s.lstrip(" \t")
        if s.startswith("]"):
            return items, s[1:]
        value, s = _scalar(s)
        items.append(value)
        s = s.lstrip(" \t")
        if s.startswith(","):
            s = s[1:]
        elif not s.startswith("]"):
            raise _Decline


def _scalar(s: str) -> tuple[Any, str]:
    if s[:1] in ('"', "'"):
        quote = s[0]
        if s.startswith(quote * 3):
            raise _Decline  # multi-line string
        end = s.find(quote, 1)
        if end < 0 or (quote == '"' and "\\" in s[1:end]):
            raise _Decline
        return s[1:end], s[end + 1 :]
    end = 0
    while end < len(s) and s[end] not in ENDS:
        end += 1
    token, rest = s[:end], s[end:]
    if token == "true":
        return True, rest
    if token == "false":
        return False, rest
    whole, dot, fraction = token.partition(".")
    digits = whole[1:] if whole[:1] in ("+", "-") else whole
    if not digits or len(digits) + len(fraction) > MAX_DIGITS or not set(digits) <= DIGITS:
        raise _Decline
    if digits[0] == "0" and len(digits) > 1:
        raise _Decline  # leading zeros are not TOML
    if not dot:
        return int(token), rest
    if not fraction or not set(fraction) <= DIGITS:
        raise _Decline
    return float(token), rest
