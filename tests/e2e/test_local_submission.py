"""Local submission end to end: the host's own mail (cron to root, other users, -bs, getopt).

The real ``greenmail`` commands and daemon against an aiosmtpd relay on 127.0.0.1. Commands
run as ``nobody`` through ``setpriv`` with Debian's /usr/bin/python3 and greenmail's source
and dependencies on PYTHONPATH (the venv's interpreter lives under root's home, which other
users cannot enter).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from aiosmtpd_server import Relay, start_daemon, start_relay

EX_TEMPFAIL, EX_CONFIG, EX_DATAERR = 75, 78, 65
ORIGIN = "example.org"
HOSTNAME = "mx.example.org"
ALIASES = """\
# who reads root's mail
root: ops@example.net,
  alice
alice: alice@example.com
postmaster: root
loop1: loop2
loop2: loop1
"""
CRON_MESSAGE = b"Subject: Cron <root@vm> run-parts /etc/cron.daily\nContent-Type: text/plain\n\nok\n"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="greenmail-local-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def relay(shared: Path) -> Iterator[Relay]:
    r = start_relay(shared)
    yield r
    r.stop()


def config(directory: Path, relay: Relay, admin: str | None = None, **extra: str) -> Path:
    (directory / "aliases").write_text(ALIASES)
    addresses = {"origin": ORIGIN, "hostname": HOSTNAME, "aliases": "aliases", **extra}
    if admin:
        addresses["admin"] = admin
    path = support.write_config(directory, relay.port, addresses=addresses)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module", autouse=True)
def code_for_others() -> Iterator[None]:
    """greenmail's source and click copied where every user may read them (a checkout or a
    venv under root's home is not); as_nobody runs them with /usr/bin/python3."""
    d = Path(tempfile.mkdtemp(prefix="greenmail-code-"))
    import click

    shutil.copytree(support.ROOT / "greenmail", d / "greenmail", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(click.__file__).parent, d / "click", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [d, *d.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    CODE[:] = [str(d)]
    yield
    shutil.rmtree(d, ignore_errors=True)


CODE: list[str] = []


def as_nobody(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``python -m greenmail ARGS`` as nobody:nogroup, with no supplementary groups."""
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3")
    env = support.env()
    env["PYTHONPATH"] = CODE[0]
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-P"]
    return subprocess.run(
        [*cmd, "-m", "greenmail", *args], input=stdin, capture_output=True, env=env, timeout=60
    )


def need_debian_gevent() -> None:
    """The daemon as nobody imports gevent and prometheus-client: Debian's python3-gevent and
    python3-prometheus-client (the package's own dependencies), not copies of the venv's
    compiled modules. Skip when missing, fail under CI (.ci/run installs them)."""
    probe = ["/usr/bin/python3", "-c", "import gevent, prometheus_client"]
    if subprocess.run(probe, capture_output=True, timeout=60).returncode != 0:
        message = "needs Debian's python3-gevent and python3-prometheus-client (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def sendmail(cfg: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return support.greenmail("sendmail", "-C", str(cfg), *args, stdin=stdin)


def queued(cfg: Path) -> list[dict]:
    r = support.greenmail("queue", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def delivered(relay: Relay, n: int) -> list:
    support.wait_until(lambda: relay.count() >= n, 15, what=f"{n} messages at the relay")
    return relay.messages()


# -- cron's command line ---------------------------------------------------------------------


def test_crons_exact_command_line_delivers_to_root_at_origin(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    (shared / "aliases").write_text("")  # no alias: root is qualified
    r = sendmail(cfg, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=CRON_MESSAGE)
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r
    [q] = queued(cfg)
    assert q["recipients"] == [f"root@{ORIGIN}"]
    login = pwd.getpwuid(os.getuid()).pw_name
    assert q["sender"] == f"{login}@{ORIGIN}"
    d = start_daemon(cfg, shared / "daemon.log")
    try:
        [m] = delivered(relay, 1)
    finally:
        d.stop()
    assert m.rcpt_tos == [f"root@{ORIGIN}"] and m.mail_from == f"{login}@{ORIGIN}"
    msg = email.message_from_bytes(m.content, policy=email.policy.default)
    assert msg["From"].addresses[0].display_name == "CronDaemon"
    assert msg["From"].addresses[0].addr_spec == f"{login}@{ORIGIN}"
    assert msg["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert msg.get_content().rstrip("\r\n") == "ok"


# -- aliases and admin on every path -------------------------------------------------------------


def _smtp_bs(cfg: Path, sender: str, rcpts: list[str], body: bytes) -> tuple[int, bytes]:
    """A real SMTP client (smtplib) talking to ``sendmail -bs`` over a socket pair."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*support.GREENMAIL, "sendmail", "-C", str(cfg), "-bs"],
        stdin=theirs,
        stdout=theirs,
        stderr=subprocess.PIPE,
        env=support.env(),
    )
    theirs.close()
    try:
        client = smtplib.SMTP(timeout=20)
        client.sock = ours
        code, banner = client.getreply()
        assert code == 220 and HOSTNAME.encode() in banner, banner
        client.ehlo("client.test")
        assert client.has_extn("pipelining") and client.has_extn("8bitmime")
        client.mail(sender)
        for r in rcpts:
            assert client.rcpt(r)[0] == 250
        code, text = client.data(body)
        client.quit()
    finally:
        ours.close()
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else b""
    return code, text


PATHS = ["enqueue", "sendmail", "api", "bs"]


def submit(path: str, cfg: Path, rcpts: list[str], body: bytes = b"Subject: paths\n\nx\n") -> None:
    if path == "enqueue":
        support.enqueue(cfg, body, "app", *rcpts)
    elif path == "sendmail":
        r = sendmail(cfg, "-f", "app", *rcpts, stdin=body)
        assert r.returncode == 0, r.stderr
    elif path == "api":
        code = (
            "import sys, greenmail\n"
            "greenmail.enqueue('app', sys.argv[2:], b'Subject: api\\n\\nx\\n', config=sys.argv[1])"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(cfg), *rcpts], env=support.env(), capture_output=True
        )
        assert r.returncode == 0, r.stderr
    else:
        code, text = _smtp_bs(cfg, "app", rcpts, body)
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), (code, text)


@pytest.mark.parametrize("path", PATHS)
def test_aliases_are_applied_on_every_path(shared: Path, relay: Relay, path: str) -> None:
    cfg = config(shared, relay)
    submit(path, cfg, ["postmaster", f"root@{HOSTNAME}", "root@localhost", "bob@example.net", "loop1"])
    [q] = queued(cfg)
    # postmaster -> root -> ops@, alice -> alice@; root@hostname and root@localhost are root too
    # (each address once); a loop ends at its own name; a remote address is left alone
    assert q["recipients"] == ["ops@example.net", "alice@example.com", "bob@example.net", f"loop1@{ORIGIN}"]
    assert q["sender"] == f"app@{ORIGIN}"


@pytest.mark.parametrize("path", PATHS)
def test_admin_takes_the_mail_of_local_names_without_an_alias(shared: Path, relay: Relay, path: str) -> None:
    cfg = config(shared, relay, admin="admin@example.net")
    submit(path, cfg, ["www-data", "root", "carol@example.net"])
    [q] = queued(cfg)
    assert q["recipients"] == [
        "admin@example.net",
        "ops@example.net",
        "alice@example.com",
        "carol@example.net",
    ]


# -- another local user ---------------------------------------------------------------------------


def test_roots_mail_into_a_spool_of_the_daemons_own_user_is_that_users(shared: Path, relay: Relay) -> None:
    """The packaged set-up: the daemon runs as its own user (here nobody) and owns the spool;
    cron's mail to root, written by root, must be a file that daemon can read and send."""
    need_debian_gevent()
    cfg = config(shared, relay)
    (shared / "aliases").write_text("")
    spool, nobody = shared / "spool", pwd.getpwnam("nobody")
    spool.mkdir(0o711)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)  # as the package's postinst makes it
    made = as_nobody("queue", "list", "--config", str(cfg))  # and its subdirectories, as that user
    assert made.returncode == 0, made.stderr
    r = sendmail(cfg, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=CRON_MESSAGE)
    assert r.returncode == 0, r
    [name] = os.listdir(spool / "outgoing")
    st = os.stat(spool / "outgoing" / name)
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid) and st.st_mode & 0o077 == 0
    assert os.listdir(spool / "tmp") == []
    d = as_nobody("run", "--once", "--config", str(cfg))
    assert d.returncode == 0, d.stderr
    [m] = delivered(relay, 1)
    assert m.rcpt_tos == [f"root@{ORIGIN}"] and os.listdir(spool / "corrupt") == []


def test_a_message_from_nobody_is_delivered_with_its_uid_and_nobody_cannot_touch_the_queue(
    shared: Path, relay: Relay
) -> None:
    cfg = config(shared, relay)
    spool = shared / "spool"
    root_qid = support.enqueue(
        cfg, b"Subject: root's own\n\nsecret\n", "root", "bob@example.net"
    )  # makes the spool
    r = as_nobody(
        "enqueue",
        "--config",
        str(cfg),
        "--from",
        "nobody",
        "--to",
        "root",
        stdin=b"Subject: hi\n\nfrom nobody\n",
    )
    assert r.returncode == 0, r.stderr
    dropped = r.stdout.decode().strip()
    assert os.listdir(spool / "maildrop") == [dropped]  # durable on return, the daemon not running
    st = os.stat(spool / "maildrop" / dropped)
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid and st.st_mode & 0o777 == 0o640

    probe = (
        "import os, sys\n"
        "for what, fn in [('list maildrop', lambda: os.listdir(sys.argv[1] + '/maildrop')),\n"
        "                 ('list outgoing', lambda: os.listdir(sys.argv[1] + '/outgoing')),\n"
        "                 ('read', lambda: open(sys.argv[1] + '/outgoing/' + sys.argv[2], 'rb').read()),\n"
        "                 ('delete', lambda: os.unlink(sys.argv[1] + '/outgoing/' + sys.argv[2])),\n"
        "                 ('rename', lambda: os.rename(sys.argv[1] + '/outgoing/' + sys.argv[2],\n"
        "                                              sys.argv[1] + '/maildrop/x'))]:\n"
        "    try:\n        fn()\n        print(what, 'ALLOWED')\n"
        "    except PermissionError:\n        print(what, 'refused')\n"
    )
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    p = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            probe,
            str(spool),
            root_qid,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.stdout.split("\n")[:5] == [
        f"{w} refused" for w in ("list maildrop", "list outgoing", "read", "delete", "rename")
    ], p

    d = start_daemon(cfg, shared / "daemon.log")
    try:
        messages = delivered(relay, 2)
        support.wait_until(lambda: not os.listdir(spool / "maildrop"), 5, what="maildrop/ emptied")
    finally:
        d.stop()
    mine = [m for m in messages if b"from nobody" in m.content]
    assert len(mine) == 1 and mine[0].rcpt_tos == ["ops@example.net", "alice@example.com"]
    assert mine[0].mail_from == f"nobody@{ORIGIN}"
    assert b"(greenmail, from userid 65534)" in mine[0].content
    log = d.text()
    assert f"uid=65534 from=<nobody@{ORIGIN}>" in log  # the pickup line
    assert ", nrcpt=2, uid=65534 (queue active)" in log


def test_sendmail_as_nobody_with_the_daemon_running(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    d = start_daemon(cfg, shared / "daemon.log")
    try:
        r = as_nobody("sendmail", "-C", str(cfg), "-ti", stdin=b"To: alice\nSubject: t\n\nbody\n")
        assert r.returncode == 0 and r.stderr == b"", r
        [m] = delivered(relay, 1)
    finally:
        d.stop()
    assert m.rcpt_tos == ["alice@example.com"] and m.mail_from == f"nobody@{ORIGIN}"


def test_invalid_files_in_maildrop_are_quarantined_never_delivered(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    support.greenmail("queue", "list", config=cfg)  # the spool made
    drop = shared / "spool" / "maildrop"
    (drop / "not-an-id").write_bytes(b"a@example.org\nb@example.net\n\nx\n")
    (drop / ("0" * 24)).write_bytes(b"garbage without an envelope")
    os.symlink("/etc/passwd", drop / ("1" * 24))
    d = start_daemon(cfg, shared / "daemon.log")
    try:
        support.wait_until(lambda: not os.listdir(drop), 10, what="maildrop/ emptied")
    finally:
        d.stop()
    assert sorted(os.listdir(shared / "spool" / "corrupt")) == sorted(
        ["maildrop-not-an-id", "maildrop-" + "0" * 24, "maildrop-" + "1" * 24]
    )
    assert relay.count() == 0 and queued(cfg) == []
    assert d.text().count("moved to corrupt/maildrop-") == 3


# -- sendmail's options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-ti"],
        ["-it"],
        ["-t", "-i"],
        ["-oi", "-t"],
        ["-i", "--", "bob@example.net"],
        ["bob@example.net", "-i"],
    ],
    ids=" ".join,
)
def test_getopt_forms_queue_the_message(shared: Path, relay: Relay, args: list[str]) -> None:
    cfg = config(shared, relay)
    r = sendmail(cfg, *args, stdin=b"To: bob@example.net\nSubject: g\n\n.\nafter a dot line\n")
    assert r.returncode == 0, r.stderr
    [q] = queued(cfg)
    assert q["recipients"] == ["bob@example.net"]
    [m] = [support.greenmail("queue", "show", q["id"], config=cfg).stdout]
    assert b"after a dot line" in m  # -i: a lone dot does not end the message


def test_bv_prints_the_rewriting_and_queues_nothing(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    r = sendmail(cfg, "-bv", "root", "bob@example.net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        "root: ops@example.net, alice@example.com",
        "bob@example.net: bob@example.net",
    ]
    assert queued(cfg) == []


def test_bi_and_newaliases_check_the_aliases_file(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    assert sendmail(cfg, "-bi").returncode == 0
    (shared / "aliases").write_text("root: ops@example.net\nbackup: |/usr/bin/backup\n")
    r = sendmail(cfg, "-bi")
    assert r.returncode == EX_CONFIG
    assert b"aliases:2: backup:" in r.stderr and b"command" in r.stderr
    r = sendmail(cfg, "-I")
    assert r.returncode == EX_CONFIG
    r = sendmail(cfg, "root", stdin=b"Subject: x\n\ny\n")  # and a submission to a local name says why
    assert r.returncode == EX_CONFIG and b"aliases:2" in r.stderr


def test_bp_ends_with_postfixs_summary_line(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    r = sendmail(cfg, "-bp")
    assert r.returncode == 0 and r.stdout.decode().splitlines() == ["Mail queue is empty"], r
    for _ in range(2):
        support.enqueue(cfg, b"Subject: x\n\n" + b"y" * 3000 + b"\n", "a@example.org", "b@example.net")
    lines = sendmail(cfg, "-bp").stdout.decode().splitlines()
    assert lines[-1] == "-- 7 Kbytes in 2 Requests.", lines


def test_bs_answers_errors_and_keeps_only_what_got_250(shared: Path, relay: Relay) -> None:
    cfg = config(shared, relay)
    script = (
        b"EHLO c\r\nRCPT TO:<a@example.net>\r\nMAIL FROM:<a b@c>\r\nMAIL FROM:<app@example.org>\r\n"
        b"RCPT TO:<x y@example.net>\r\nDATA\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
        b"Subject: bs\r\n\r\n..stuffed\r\n.\r\n"
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
        b"unfinished\r\n"  # the client goes away: this message is not kept
    )
    r = sendmail(cfg, "-bs", stdin=script)
    assert r.returncode == 0, r.stderr
    codes = [line[:3] for line in r.stdout.decode().splitlines() if line[3:4] == " "]
    assert codes == [
        "220",
        "250",
        "503",
        "501",
        "250",
        "501",
        "554",
        "250",
        "354",
        "250",
        "250",
        "250",
        "354",
    ], r.stdout
    [q] = queued(cfg)
    body = support.greenmail("queue", "show", q["id"], config=cfg).stdout
    assert b"\r\n.stuffed\r\n" in body and b"unfinished" not in body


def test_q_asks_the_running_daemon_and_prints_nothing(shared: Path) -> None:
    from faultserver import FaultServer

    with FaultServer({"rcpt": "451 4.7.1 later"}) as fault:
        cfg = support.write_config(shared, fault.port, delivery={"check_interval": 60})
        d = start_daemon(cfg, shared / "daemon.log")
        try:
            support.enqueue(cfg, b"Subject: q\n\nx\n", "a@example.org", "b@example.net")
            support.wait_until(lambda: "status=deferred" in d.text(), 10, what="a deferral")
            r = sendmail(cfg, "-q")
            assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r
            support.wait_until(lambda: d.text().count("status=deferred") >= 2, 10, what="the retry at once")
        finally:
            d.stop()


# -- exit 75 for a spool that cannot be written ----------------------------------------------------


def _cause_not_a_directory(shared: Path) -> list[str]:
    (shared / "spool").write_text("a file\n")
    return []


def _cause_missing_for_a_user(shared: Path) -> list[str]:
    os.chmod(shared, 0o755)  # nobody may not create shared/spool
    return ["nobody"]


def _cause_permission(shared: Path) -> list[str]:
    (shared / "spool").mkdir(mode=0o700)  # an old spool without maildrop/, closed to others
    return ["nobody"]


CAUSES = {
    "not a directory": _cause_not_a_directory,
    "missing": _cause_missing_for_a_user,
    "permission": _cause_permission,
}


@pytest.mark.parametrize("command", ["enqueue", "sendmail"])
@pytest.mark.parametrize("cause", list(CAUSES))
def test_exit_75_for_an_unwritable_spool(shared: Path, relay: Relay, cause: str, command: str) -> None:
    cfg = config(shared, relay)
    who = CAUSES[cause](shared)
    args = (
        ["enqueue", "--config", str(cfg), "--from", "a@example.org", "--to", "b@example.net"]
        if command == "enqueue"
        else ["sendmail", "-C", str(cfg), "b@example.net"]
    )
    r = (
        as_nobody(*args, stdin=b"Subject: x\n\ny\n")
        if who
        else support.greenmail(*args, stdin=b"Subject: x\n\ny\n")
    )
    assert r.returncode == EX_TEMPFAIL, r
    assert r.stderr.startswith(b"greenmail: ") and r.stderr.count(b"\n") == 1, r.stderr


@pytest.mark.parametrize("command", ["enqueue", "sendmail"])
@pytest.mark.parametrize("cause", ["read-only", "full"])
def test_exit_75_for_a_read_only_or_full_spool(shared: Path, relay: Relay, cause: str, command: str) -> None:
    """A private mount namespace: the spool on a read-only bind mount, or on a full 1 MiB tmpfs."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    cfg = config(shared, relay)
    support.greenmail("queue", "list", config=cfg)  # the spool made
    spool = shared / "spool"
    if cause == "read-only":
        mount = f"mount --bind {spool} {spool} && mount -o remount,bind,ro {spool}"
    else:
        fill = f"head -c 2M /dev/zero > {spool}/fill 2>/dev/null"
        mount = f"mount -t tmpfs -o size=1m tmpfs {spool} && ({fill}; true)"
    sub = (
        "enqueue --config {c} --from a@example.org --to b@example.net"
        if command == "enqueue"
        else "sendmail -C {c} b@example.net"
    )
    shell = f"{mount} && {sys.executable} -m greenmail {sub.format(c=cfg)}"
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", shell],
        input=b"Subject: x\n\n" + b"y" * 200_000 + b"\n",
        capture_output=True,
        env=support.env(),
        timeout=60,
    )
    if r.returncode != EX_TEMPFAIL and b"mount" in r.stderr and b"greenmail" not in r.stderr:
        pytest.skip(f"cannot mount here: {r.stderr.decode()[:200]}")
    assert r.returncode == EX_TEMPFAIL, r
    assert r.stderr.startswith(b"greenmail: ") and r.stderr.count(b"\n") == 1, r.stderr
