"""The Debian package on this machine as its MTA: installed with apt, used, purged.

Destructive, so only with GREENMAIL_DEB=path/to/greenmail_VERSION_all.deb (`make deb-test`,
run by CI after every other test): apt removes the installed MTA (the interop Postfix) for
it, installs bsd-mailx, and the package is purged at the end. Without systemd (a container),
the daemon runs as the unit would run it: as the greenmail user, from /usr/bin/greenmail on
Debian's own python3-gevent, python3-prometheus-client and python3-click. The tests run in
file order, each building on the one before.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port, wait_port, wait_until

DEB = os.environ.get("GREENMAIL_DEB", "")
pytestmark = pytest.mark.skipif(not DEB, reason="GREENMAIL_DEB is not set (make deb-test)")

CONF = Path("/etc/greenmail/greenmail.toml")
SPOOL = Path("/var/spool/greenmail")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(*cmd: str, input: bytes | None = None, user: str | None = None, check: bool = True) -> str:
    """A command (as ``user`` through runuser, a login-less switch as cron and PHP-FPM make)."""
    argv = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    r = subprocess.run(argv, input=input, capture_output=True, timeout=300, env=APT_ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")


def apt_install(*what: str) -> None:
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", *what)


def installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.endswith(" installed")


class Relay:
    """The package's own development sink on a loopback port, as root."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["/usr/bin/greenmail", "sink", "--listen", f"127.0.0.1:{self.port}", "--maildir", str(maildir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def messages(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Daemon:
    """greenmail run as the unit runs it (User=greenmail, the package's configuration)."""

    def __init__(self) -> None:
        user = ["setpriv", "--reuid=greenmail", "--regid=greenmail", "--init-groups"]  # execs: SIGTERM is its
        cmd = [*user, "/usr/bin/greenmail", "run", "--config", str(CONF)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err.decode(errors="replace")
        return err.decode(errors="replace")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    apt_install(str(Path(DEB).resolve()))
    sink = Relay(tmp_path_factory.mktemp("relay") / "maildir")
    yield sink
    sink.stop()


def version() -> str:
    """The package's version (dpkg's), which must be greenmail's own."""
    return run("dpkg-deb", "-f", DEB, "Version").strip()


def mailq() -> str:
    return run("/usr/bin/mailq")


def test_install_replaces_the_mta(relay: Relay) -> None:
    assert installed("greenmail")
    assert not installed("postfix")  # Conflicts: mail-transport-agent
    status = run("dpkg-query", "-W", "-f=${Provides}", "greenmail")
    assert "mail-transport-agent" in status
    # bsd-mailx needs an MTA (default-mta | mail-transport-agent): greenmail satisfies it
    apt_install("bsd-mailx")
    for name in ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases"):
        assert os.path.realpath(name) == "/usr/bin/greenmail", name
    assert Path("/usr/bin/greenmail").read_text().startswith("#!/usr/bin/python3\n")
    assert run("/usr/bin/greenmail", "--version").split()[-1] == version()
    assert Path("/lib/systemd/system/greenmail.service").is_file()
    for page in ("greenmail", "greenmail.toml", "sendmail"):
        assert run("man", "-w", page).strip().startswith("/usr/share/man/"), page


def test_user_conffile_and_spool_modes(relay: Relay) -> None:
    user = pwd.getpwnam("greenmail")
    assert user.pw_uid < 1000 and user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    assert grp.getgrgid(user.pw_gid).gr_name == "greenmail"
    assert str(CONF) in run("dpkg-query", "-W", "-f=${Conffiles}", "greenmail")
    assert stat.S_IMODE(CONF.stat().st_mode) == 0o644  # every local user's sendmail reads it
    st = SPOOL.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o711)
    maildrop = (SPOOL / "maildrop").stat()
    assert (maildrop.st_uid, stat.S_IMODE(maildrop.st_mode)) == (user.pw_uid, 0o3733)
    for d in ("tmp", "outgoing", "outgoing_active", "failed", "corrupt", "hold", "meta"):
        s = (SPOOL / d).stat()
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (user.pw_uid, 0o700), d
    assert "ok" in run("/usr/bin/greenmail", "config", "check")  # /etc/greenmail/greenmail.toml by default


def test_cron_and_www_data_mail_reach_the_relay(relay: Relay) -> None:
    text = CONF.read_text()
    assert re.search(r"^port = 25$", text, re.M), text  # as shipped
    CONF.write_text(re.sub(r"^port = \d+$", f"port = {relay.port}", text, flags=re.M))  # the operator sets it
    host = os.uname().nodename
    # root's mail as cron sends it, and as a script's `mail` does
    cron = f"Subject: Cron <root@{host}> run-parts /etc/cron.daily\n\nthe job's output\n".encode()
    run("/usr/sbin/sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=cron)
    run("mail", "-s", "disk report", "root", input=b"test\n")
    # a PHP application as www-data: mail() runs `sendmail -t -i`
    php = b"To: customer@example.net\nSubject: your order\nFrom: shop@example.org\n\nthanks\n.\nmore\n"
    run("/usr/sbin/sendmail", "-t", "-i", input=php, user="www-data")
    q = mailq()  # nothing delivers yet: root's two are queued (www-data's waits in maildrop/)
    assert "Requests." in q and q.count("root@") >= 2, q
    daemon = Daemon()
    try:
        wait_until(lambda: len(relay.messages()) == 3, timeout=30, what="3 messages at the relay")
        wait_until(lambda: "Mail queue is empty" in mailq(), timeout=10, what="an empty queue")
    finally:
        log = daemon.stop()
    got = relay.messages()
    root = run("/usr/sbin/sendmail", "-bv", "root").split(":", 1)[1].strip()  # root@ /etc/mailname or FQDN
    crons = [m for m in got if b"Subject: Cron <root@" in m]
    assert len(crons) == 1 and b'"CronDaemon" <root@' in crons[0], got
    assert any(b"Subject: disk report" in m and b"\ntest\n" in m.replace(b"\r\n", b"\n") for m in got)
    shop = [m for m in got if b"Subject: your order" in m]
    assert len(shop) == 1 and b"thanks\n.\nmore\n" in shop[0].replace(b"\r\n", b"\n"), got  # -i: "." kept
    assert b"from userid 33" in shop[0]
    assert log.count("status=sent") == 3 and log.count(f"to=<{root}>") == 2, log


def test_purge_keeps_only_queued_mail(relay: Relay) -> None:
    files = [Path(p) for p in run("dpkg-query", "-L", "greenmail").split("\n") if p.startswith("/")]
    qid = run("/usr/bin/greenmail", "enqueue", "--from", "root", "--to", "ops@example.net", input=b"kept\n")
    run("apt-get", "purge", "-y", "-q", "bsd-mailx")  # it needs an MTA
    run("dpkg", "--purge", "greenmail")
    left = [p for p in files if not p.is_dir() and (p.is_symlink() or p.exists())]  # /lib: usrmerge's
    assert left == [], left
    assert not Path("/etc/greenmail").exists()
    kept = sorted(str(p.relative_to(SPOOL)) for p in SPOOL.rglob("*") if p.is_file())
    assert kept == [f"outgoing/{qid.strip()}"], kept  # the queued message, nothing else
    pwd.getpwnam("greenmail")  # still there: it owns the kept mail


def test_reinstall_and_purge_with_an_empty_queue(relay: Relay) -> None:
    apt_install(str(Path(DEB).resolve()))
    assert len(run("/usr/bin/mailq").splitlines()) >= 2  # the kept message is back in the queue
    for entry in json.loads(run("/usr/bin/greenmail", "queue", "list", "--json")):
        run("/usr/bin/greenmail", "queue", "delete", entry["id"])
    assert "Mail queue is empty" in mailq()
    run("dpkg", "--purge", "greenmail")
    assert not SPOOL.exists() and not Path("/etc/greenmail").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam("greenmail")
    with pytest.raises(KeyError):
        grp.getgrnam("greenmail")
