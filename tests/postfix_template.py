"""The files of a private Postfix instance (``postfix -c DIR/etc``): its layout, master.cf, main.cf.

Shared by the interop tests (tests/interop/peers.py: a relay whose smtpd speaks TLS and logs
verbosely) and the benchmark (bench/peers/postfix.py: no smtpd, mail held while the queue
fills). This module owns what every such instance needs: its own configuration, queue and
data directories and maillog under one base directory, the services of a relay-only Postfix
without chroot, local delivery disabled, and everything relayed to one port on 127.0.0.1.
Each user adds its own lines. Standard library only: bench/ loads this file by its path.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# master.cf services of every instance (no smtpd: a user that listens adds its own line)
SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass(frozen=True)
class Layout:
    """The directories and files of one instance below ``base``."""

    base: Path

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def queue(self) -> Path:
        return self.base / "spool"

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    @property
    def master_pid_file(self) -> Path:
        return self.queue / "pid" / "master.pid"

    def create(self) -> None:
        """Make the (empty) directories and the maillog, owned as Postfix's daemons need them."""
        for d in (self.etc, self.queue, self.data):
            d.mkdir(parents=True)
        shutil.chown(self.data, "postfix", "postfix")
        self.maillog.touch()
        shutil.chown(self.maillog, "postfix")

    def master_pid(self) -> int | None:
        """The pid the master wrote, or None before it did (or after it removed the file)."""
        try:
            return int(self.master_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def master_cf(comment: str, extra_services: Iterable[str] = ()) -> str:
    """master.cf: a comment line, the user's own services (e.g. an smtpd), then SERVICES."""
    return f"# {comment}\n" + "".join(f"{line}\n" for line in extra_services) + SERVICES


def main_cf(
    layout: Layout, *, myhostname: str, relay_port: int, size_limit: int, extra: Iterable[str] = ()
) -> str:
    """main.cf: what every instance needs, then the user's ``extra`` lines (comments allowed)."""
    lines = [
        "compatibility_level = 3.6",
        f"queue_directory = {layout.queue}",
        f"data_directory = {layout.data}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        f"myhostname = {myhostname}",
        "mydestination =",
        f"relayhost = [127.0.0.1]:{relay_port}",
        "inet_interfaces = loopback-only",
        "inet_protocols = ipv4",
        "local_transport = error:local delivery disabled",
        "alias_maps =",
        "alias_database =",
        "smtp_tls_security_level = none",
        f"message_size_limit = {size_limit}",
        f"maillog_file = {layout.maillog}",
        f"maillog_file_prefixes = {layout.base}",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def write(layout: Layout, master: str, main: str) -> None:
    """Write master.cf and main.cf into the instance's etc/."""
    (layout.etc / "master.cf").write_text(master)
    (layout.etc / "main.cf").write_text(main)
