"""The sendmail interface as programs use it: a ``sendmail`` (and ``mailq``) symlink to the installed script.

cron, PHP's mail(), git send-email and mail(1) run /usr/sbin/sendmail; greenmail's
console script invoked under that name behaves as ``greenmail sendmail``, and under
``mailq`` as ``greenmail queue list``. Every test runs the real installed script.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import support

EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 64, 65, 75, 78


def installed_script() -> Path:
    """The console script pip installed (.venv/bin/greenmail)."""
    beside = Path(sys.executable).parent / "greenmail"
    found = beside if beside.exists() else Path(shutil.which("greenmail") or "")
    assert found.name == "greenmail" and found.exists(), "greenmail console script not installed"
    return found


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return support.write_config(tmp_path, support.free_port())


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("sendmail", "mailq"):
        (d / name).symlink_to(installed_script())
    return d


def run(
    program: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(program), *args], input=stdin, capture_output=True, timeout=60, env=env or support.env()
    )


def queue(cfg: Path) -> list[dict[str, Any]]:
    r = support.greenmail("queue", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def stored(cfg: Path, qid: str) -> bytes:
    """The message as spooled (``queue show`` prints the envelope fields, a blank line, the message)."""
    spool = cfg.parent / "spool"
    (path,) = [spool / "outgoing" / n for n in os.listdir(spool / "outgoing") if n.split(",")[0] == qid]
    return path.read_bytes().split(b"\n", 2)[2]


def parsed(message: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def spool_files(cfg: Path) -> list[str]:
    spool = cfg.parent / "spool"
    return [f"{d}/{n}" for d in ("tmp", "outgoing", "failed") for n in support.spool_files(spool, d)]


def error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("greenmail:"), lines[0]
    return lines[0]


CRON_MAIL = (
    b"From: Cron Daemon <root@example.org>\n"
    b'To: Alice <alice@example.net>, ops: bob@example.net, "Carol, C." <carol@example.net>;\n'
    b"Cc: dave@example.net\n"
    b"Bcc: secret@example.net,\n"
    b"  Hidden Person <hidden@example.net>\n"
    b"Subject: nightly report\n"
    b"\n"
    b"all good\n"
)


# -- sendmail through the symlink -------------------------------------------------------------------------


def test_t_takes_recipients_from_to_cc_bcc_and_drops_bcc(cfg: Path, bindir: Path) -> None:
    r = run(bindir / "sendmail", "-t", "-i", "-f", "cron@example.org", "-C", str(cfg), stdin=CRON_MAIL)
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    assert m["sender"] == "cron@example.org"
    assert sorted(m["recipients"]) == sorted(
        [
            "alice@example.net",
            "bob@example.net",
            "carol@example.net",
            "dave@example.net",
            "secret@example.net",
            "hidden@example.net",
        ]
    )
    body = stored(cfg, m["id"])
    assert b"bcc:" not in body.lower()
    assert b"secret@example.net" not in body and b"hidden@example.net" not in body
    msg = parsed(body)
    assert msg["Subject"] == "nightly report"
    assert msg["From"].addresses[0].addr_spec == "root@example.org"  # kept as it was
    assert "alice@example.net" in str(msg["To"]) and msg["Cc"] == "dave@example.net"
    assert msg["Message-ID"] and msg["Date"]  # added at enqueue
    assert msg.get_content() == "all good\n"


def test_recipients_as_arguments_sender_and_full_name(cfg: Path, bindir: Path) -> None:
    r = run(
        bindir / "sendmail",
        "-fapp@example.org",
        "-F",
        "The App",
        "-oi",
        "a@example.net",
        "b@example.net",
        "-C",
        str(cfg),
        stdin=b"Subject: from php\n\nline one\n.\nline after a lone dot\n",
    )
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    assert (m["sender"], m["recipients"]) == ("app@example.org", ["a@example.net", "b@example.net"])
    msg = parsed(stored(cfg, m["id"]))
    addr = msg["From"].addresses[0]
    assert (addr.display_name, addr.addr_spec) == ("The App", "app@example.org")
    assert msg.get_content() == "line one\n.\nline after a lone dot\n"  # -oi: the dot is just a line


@pytest.mark.parametrize(
    "form", [["-r", "ret@example.org"], ["-rret@example.org"], ["-f", "ret@example.org"]]
)
def test_sender_option_forms(cfg: Path, bindir: Path, form: list[str]) -> None:
    r = run(bindir / "sendmail", *form, "a@example.net", "-C", str(cfg), stdin=b"Subject: s\n\nx\n")
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    assert m["sender"] == "ret@example.org"


def test_without_i_a_lone_dot_ends_the_message(cfg: Path, bindir: Path) -> None:
    r = run(
        bindir / "sendmail",
        "a@example.net",
        "-C",
        str(cfg),
        stdin=b"Subject: dot\n\nbefore\n.\nafter the dot: not part of the message\n",
    )
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    assert parsed(stored(cfg, m["id"])).get_content() == "before\n"


def test_message_without_headers(cfg: Path, bindir: Path) -> None:
    """``echo text | sendmail user``: a From: is added and the text stays the body."""
    r = run(
        bindir / "sendmail", "-f", "me@example.org", "a@example.net", "-C", str(cfg), stdin=b"just text\n"
    )
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    msg = parsed(stored(cfg, m["id"]))
    assert msg["From"].addresses[0].addr_spec == "me@example.org"
    assert msg.get_content() == "just text\n"


def test_unknown_o_options_are_ignored(cfg: Path, bindir: Path) -> None:
    r = run(
        bindir / "sendmail",
        "-odb",
        "-oem",
        "-oQ/var/spool/mqueue",
        "-v",
        "-B",
        "8BITMIME",
        "a@example.net",
        "-C",
        str(cfg),
        stdin=b"Subject: x\n\nbody\n",
    )
    assert r.returncode == 0, r.stderr
    assert len(queue(cfg)) == 1


def test_config_from_the_environment(cfg: Path, bindir: Path) -> None:
    """Programs do not pass -C: $GREENMAIL_CONFIG is used."""
    env = support.env()
    env["GREENMAIL_CONFIG"] = str(cfg)
    r = run(bindir / "sendmail", "a@example.net", stdin=b"Subject: env\n\nx\n", env=env)
    assert r.returncode == 0, r.stderr
    assert [m["recipients"] for m in queue(cfg)] == [["a@example.net"]]
    r = run(bindir / "mailq", env=env)
    assert r.returncode == 0, r.stderr
    assert "a@example.net" in r.stdout.decode()


def test_long_config_option(cfg: Path, bindir: Path) -> None:
    for form in (["--config", str(cfg)], [f"--config={cfg}"]):
        r = run(bindir / "sendmail", *form, "a@example.net", stdin=b"Subject: x\n\nx\n")
        assert r.returncode == 0, r.stderr
    assert len(queue(cfg)) == 2


def test_greenmail_sendmail_subcommand(cfg: Path) -> None:
    r = support.greenmail("sendmail", "-t", config=cfg, stdin=CRON_MAIL)
    assert r.returncode == 0, r.stderr
    (m,) = queue(cfg)
    assert b"bcc" not in stored(cfg, m["id"]).lower()


# -- -bp, mailq, -q ---------------------------------------------------------------------------------------


def test_mailq_and_bp_list_the_queue(cfg: Path, bindir: Path) -> None:
    ids = [support.enqueue(cfg, b"Subject: q\n\nx\n", "s@example.org", f"r{i}@example.net") for i in range(2)]
    for r in (run(bindir / "mailq", "--config", str(cfg)), run(bindir / "sendmail", "-bp", "-C", str(cfg))):
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        for qid in ids:
            assert qid in out
        assert "r0@example.net" in out and "r1@example.net" in out
        assert out.splitlines()[-1] == "-- 1 Kbytes in 2 Requests."  # Postfix's summary line
    json_out = run(bindir / "mailq", "--json", "--config", str(cfg))
    assert json_out.returncode == 0, json_out.stderr
    assert sorted(m["id"] for m in json.loads(json_out.stdout)) == sorted(ids)


def test_q_delivers_the_queue_to_a_sink(tmp_path: Path, bindir: Path) -> None:
    port = support.free_port()
    cfg = support.write_config(tmp_path, port)
    r = run(bindir / "sendmail", "-t", "-C", str(cfg), stdin=CRON_MAIL)
    assert r.returncode == 0, r.stderr
    sink = support.sink(port, tmp_path / "maildir", tmp_path / "sink.log")
    try:
        q = run(bindir / "sendmail", "-q", "-C", str(cfg))
        assert q.returncode == 0, q.stderr
        (delivered,) = support.wait_until(lambda: list((tmp_path / "maildir" / "new").iterdir()))
    finally:
        sink.stop()
    msg = parsed(delivered.read_bytes())
    assert msg["Subject"] == "nightly report"
    assert "Bcc" not in msg
    assert queue(cfg) == []
    log = sink.text()
    for rcpt in ("alice@", "bob@", "carol@", "dave@", "secret@", "hidden@"):
        assert rcpt in log


# -- exit codes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stdin", "code"),
    [
        (["-Z", "a@example.net"], b"Subject: x\n\nx\n", EX_USAGE),  # unknown option
        (["-bd"], b"", EX_USAGE),  # a daemon mode: greenmail run is the daemon
        ([], b"Subject: no recipients\n\nx\n", EX_USAGE),
        (["-t"], b"Subject: no recipient headers\n\nx\n", EX_USAGE),
        (["a@example.net", "-f"], b"Subject: x\n\nx\n", EX_USAGE),  # missing argument
        (["no-domain@"], b"Subject: x\n\nx\n", EX_DATAERR),
        (["a@example.net", "white space@example.net"], b"Subject: x\n\nx\n", EX_DATAERR),
        (["-f", "bad sender@example.org", "a@example.net"], b"Subject: x\n\nx\n", EX_DATAERR),
        (["-t"], b"To: Nobody <nobody@>\nSubject: x\n\nx\n", EX_DATAERR),
    ],
    ids=[
        "unknown-option",
        "bd",
        "no-recipients",
        "t-without-recipients",
        "missing-argument",
        "bad-recipient",
        "one-bad-recipient",
        "bad-sender",
        "t-bad-address",
    ],
)
def test_exit_codes(cfg: Path, bindir: Path, args: list[str], stdin: bytes, code: int) -> None:
    r = run(bindir / "sendmail", "-C", str(cfg), *args, stdin=stdin)
    assert r.returncode == code, (r.returncode, r.stderr)
    error_line(r)
    assert spool_files(cfg) == []


def test_exit_78_for_a_missing_config(tmp_path: Path, bindir: Path) -> None:
    r = run(
        bindir / "sendmail", "-C", str(tmp_path / "nope.toml"), "a@example.net", stdin=b"Subject: x\n\nx\n"
    )
    assert r.returncode == EX_CONFIG, r.stderr
    assert "nope.toml" in error_line(r)


def test_exit_78_for_a_bad_config(tmp_path: Path, bindir: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[spool]\npath = "spool"\n[retry]\nbouncee = true\n')
    r = run(bindir / "sendmail", "-C", str(bad), "a@example.net", stdin=b"Subject: x\n\nx\n")
    assert r.returncode == EX_CONFIG, r.stderr
    assert "bouncee" in error_line(r)
    for program, args in (
        (bindir / "mailq", ["--config", str(bad)]),
        (bindir / "sendmail", ["-bp", "-C", str(bad)]),
    ):
        r = run(program, *args)
        assert r.returncode == EX_CONFIG, (program, r.stderr)


def test_exit_75_when_the_spool_cannot_be_written(cfg: Path, bindir: Path) -> None:
    """spool/tmp points into sysfs, where not even root can create a file."""
    support.skip_unless_sysfs_refuses_files()
    first = run(bindir / "sendmail", "a@example.net", "-C", str(cfg), stdin=b"Subject: first\n\nx\n")
    assert first.returncode == 0, first.stderr
    spool = cfg.parent / "spool"
    before = spool_files(cfg)
    os.rmdir(spool / "tmp")
    os.symlink("/sys", spool / "tmp")
    try:
        r = run(bindir / "sendmail", "a@example.net", "-C", str(cfg), stdin=b"Subject: second\n\nx\n")
    finally:
        os.unlink(spool / "tmp")
        os.mkdir(spool / "tmp")
    assert r.returncode == EX_TEMPFAIL, r.stderr
    error_line(r)
    assert spool_files(cfg) == before
