"""The listener's AUTH users: a file of names and scrypt password hashes.

Owns: the format, one user per line ``name:scrypt$N$r$p$SALT$HASH`` (N, r, p the
scrypt cost, SALT and HASH base64; ``#`` comments and blank lines allowed),
reading it (ConfigError naming the line), checking a password in constant
time, and making a line for ``greenmail user add``. The file holds no
password, but should still be readable by the daemon's user only.
Must not touch: sockets, the queue.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from greenmail.errors import ConfigError

N, R, P = 2**14, 8, 1  # scrypt's cost: ~16 MiB and a few tens of ms per check
DKLEN = 32


def hash_line(name: str, password: str, n: int = N, r: int = R, p: int = P) -> str:
    """The users-file line for ``name`` with ``password`` (a fresh salt)."""
    if not name or any(c in name for c in ":\n\r") or name != name.strip():
        raise ConfigError(f"user name {name!r}: no colon, line break or surrounding space")
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=DKLEN)
    return f"{name}:scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def load(path: str | os.PathLike[str]) -> dict[str, str]:
    """name -> stored hash; ConfigError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1024 * 1024 + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"listener.users_file: {os.fspath(path)}: cannot read it: {e}") from None
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, stored = line.partition(":")
        if not name or not _parse(stored):
            raise ConfigError(
                f"listener.users_file: {os.fspath(path)}:{number}: expected name:scrypt$N$r$p$SALT$HASH"
            )
        users[name] = stored
    return users


def check(users: dict[str, str], name: str, password: str) -> bool:
    """Whether ``password`` is ``name``'s (an unknown name costs the same time)."""
    stored = users.get(name) or f"scrypt${N}${R}${P}${_b64(bytes(16))}${_b64(bytes(DKLEN))}"
    parsed = _parse(stored)
    assert parsed is not None
    n, r, p, salt, digest = parsed
    try:
        got = hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=256 * 1024 * 1024
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, digest) and name in users


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        return None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or not salt or not digest:
        return None
    return n, r, p, salt, digest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
