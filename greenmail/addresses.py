"""The rewriting of addresses at submission: local names, aliases, the origin domain.

Owns: the host's names (``hostname``, ``origin``: /etc/mailname, else this
host's FQDN), the aliases(5) subset greenmail reads (comments, continuation
lines, "name: addr, other-name" chains; :include:, pipes and files refused,
there is no local delivery), and ``Rewriter``: a local recipient (no @, or
@localhost / @hostname) replaced by its aliases, recursively, loops and
duplicates removed, else by ``admin``, else qualified as name@origin; a
sender without @ qualified with origin. Applied once, at submission, on every
way in (dropoff.py calls it).
Must not touch: the spool, sockets, gevent.
"""

from __future__ import annotations

import os

from greenmail.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

MAILNAME = "/etc/mailname"
MAX_ALIASES_SIZE = 4 * 1024 * 1024  # an aliases file is configuration: a bigger one is a mistake
MAX_EXPANSION = 10_000  # recipients one local name may expand to


class AliasError(ConfigError):
    """An aliases file greenmail cannot use; the message names the file and line."""


def default_hostname() -> str:
    """This host's name: gethostname(), or its FQDN from the resolver when that adds a domain."""
    name = os.uname().nodename
    if "." in name:
        return name
    import socket  # only when the name has no domain: a submission with the settings cache never gets here

    try:
        fqdn = socket.getfqdn(name)
    except OSError:
        return name
    return fqdn if "." in fqdn and fqdn.split(".", 1)[0] == name else name


def default_origin(hostname: str | None = None) -> str:
    """The first line of /etc/mailname, else the host name."""
    try:
        with open(MAILNAME) as f:
            first = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        first = ""
    return first or hostname or default_hostname()


# -- aliases(5) ------------------------------------------------------------------------------


def parse_aliases(text: str, source: str = "aliases") -> dict[str, list[str]]:
    """``name: target, target`` entries; AliasError naming the line for what cannot be used."""
    entries: dict[str, list[str]] = {}
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1] in (" ", "\t"):
            if not logical:
                raise AliasError(f"{source}:{number}: a continuation line before any entry")
            start, previous = logical[-1]
            logical[-1] = (start, f"{previous} {line.strip()}")
        else:
            logical.append((number, line.strip()))
    for number, line in logical:
        name, colon, rest = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or any(c.isspace() for c in name):
            raise AliasError(f"{source}:{number}: expected 'name: address, ...', got {line[:60]!r}")
        targets = [t.strip() for t in rest.split(",") if t.strip()]
        if not targets:
            raise AliasError(f"{source}:{number}: {name}: no address")
        for t in targets:
            why = _unusable(t)
            if why:
                raise AliasError(f"{source}:{number}: {name}: {t[:60]!r}: {why}")
        entries.setdefault(name, [])
        entries[name].extend(t[1:] if t.startswith("\\") else t for t in targets)
    return entries


def _unusable(target: str) -> str | None:
    if target.lower().startswith(":include:"):
        return ":include: files are not supported (greenmail has no local delivery)"
    if target.startswith("|") or target.startswith('"|'):
        return "delivery to a command is not supported (greenmail has no local delivery)"
    if target.startswith("/"):
        return "delivery to a file is not supported (greenmail has no local delivery)"
    if any(c.isspace() or c in "<>" for c in target):
        return "not an address or a local name"
    return None


def load_aliases(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ALIASES_SIZE + 1)
    except OSError as e:
        raise AliasError(f"{os.fspath(path)}: cannot read the aliases file: {e.strerror}") from None
    if len(data) > MAX_ALIASES_SIZE:
        raise AliasError(f"{os.fspath(path)}: over {MAX_ALIASES_SIZE} bytes; not an aliases file")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise AliasError(f"{os.fspath(path)}: not UTF-8 text (byte {e.start})") from None
    return parse_aliases(text, os.fspath(path))


# -- the rewriting ----------------------------------------------------------------------------


class Rewriter:
    """Rewrites envelope addresses at submission as contract section 7 says.

    ``origin``/``hostname`` default to the host's (computed on first need);
    the aliases file is read on the first local recipient, not before.
    """

    def __init__(
        self,
        origin: str | None = None,
        hostname: str | None = None,
        admin: str | None = None,
        aliases: str | os.PathLike[str] | None = None,
    ) -> None:
        self._origin = origin
        self._hostname = hostname
        self.admin = admin
        self.aliases_path = aliases
        self._aliases: dict[str, list[str]] | None = None if aliases else {}

    @property
    def hostname(self) -> str:
        if self._hostname is None:
            self._hostname = default_hostname()
        return self._hostname

    @property
    def origin(self) -> str:
        if self._origin is None:
            self._origin = default_origin(self._hostname)
        return self._origin

    @property
    def aliases(self) -> dict[str, list[str]]:
        if self._aliases is None:
            assert self.aliases_path is not None
            self._aliases = load_aliases(self.aliases_path)
        return self._aliases

    def local_part(self, addr: str) -> str | None:
        """The name of a local address (no @, or @localhost, or @hostname), lower case; None if not local."""
        local, at, domain = addr.rpartition("@")
        if not at:
            return addr.lower()
        domain = domain.lower().rstrip(".")
        if domain == "localhost" or domain == self.hostname.lower():
            return local.lower()
        return None

    def sender(self, addr: str) -> str:
        """A sender without @ qualified with origin; anything else (the null sender too) as it is."""
        if addr in ("", "<>") or "@" in addr:
            return addr
        return f"{addr}@{self.origin}"

    def recipients(self, addrs: Iterable[str]) -> list[str]:
        """Every recipient rewritten, in order, each resulting address once."""
        out: dict[str, None] = {}
        for addr in addrs:
            for r in self.expand(addr):
                out[r] = None
        return list(out)

    def expand(self, addr: str) -> list[str]:
        """What one recipient becomes: itself when not local, else its aliases, admin, or name@origin."""
        name = self.local_part(addr) if addr else None
        if name is None:
            return [addr]
        out: dict[str, None] = {}
        self._expand(name, set(), out)
        return list(out)

    def _expand(self, name: str, seen: set[str], out: dict[str, None]) -> None:
        if len(out) >= MAX_EXPANSION:
            raise AliasError(f"aliases: {name}: expands to more than {MAX_EXPANSION} addresses")
        targets = self.aliases.get(name) if name not in seen else None
        if not targets:  # no alias (or a loop back to a name being expanded): the name itself
            out[self.admin or f"{name}@{self.origin}"] = None
            return
        seen = seen | {name}
        for t in targets:
            local = self.local_part(t)
            if local is None:
                out[t] = None
            elif local in seen:  # "root: root, ops@x": the name itself, once
                out[self.admin or f"{local}@{self.origin}"] = None
            else:
                self._expand(local, seen, out)


def explain(rewriter: Rewriter, addrs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(recipient, what it is rewritten to) for each recipient: ``sendmail -bv``."""
    return [(a, rewriter.expand(a)) for a in addrs]
