"""The ``greenmail`` command line, run as a real process: enqueue, configuration, run --once, sink, help.

Contract sections 2 (configuration), 3 (the spool) and 4 (commands).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import support

EX_CONFIG = 78
SENDER = "sender@example.org"
RCPT = "rcpt@example.net"
PLAIN = b"From: Sender <sender@example.org>\nTo: rcpt@example.net\nSubject: hello\n\nbody line\n"


# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return support.write_config(tmp_path, 2525)


def spool_of(cfg: Path) -> Path:
    return cfg.parent / "spool"


def run_enqueue(
    cfg: Path | None, message: bytes, sender: str = SENDER, *to: str
) -> subprocess.CompletedProcess[bytes]:
    args = ["enqueue", "--from", sender]
    for t in to or (RCPT,):
        args += ["--to", t]
    return support.greenmail(*args, config=cfg, stdin=message)


def queue_file(spool: Path, qid: str) -> bytes:
    return (spool / "outgoing" / qid).read_bytes()


def split_queue_file(data: bytes) -> tuple[bytes, bytes, bytes]:
    sender, rcpts, message = data.split(b"\n", 2)
    return sender, rcpts, message


def all_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (dot-files included) with its content."""
    out: dict[str, bytes] = {}
    if not root.exists():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def error_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The process failed with exactly one line on stderr, starting with "greenmail:"."""
    err = r.stderr.decode(errors="replace").splitlines()
    assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
    assert len(err) == 1, err
    assert err[0].startswith("greenmail:"), err
    return err[0]


def assert_nothing_spooled(spool: Path) -> None:
    assert all_files(spool) == {}, all_files(spool)


# -- enqueue: the happy path ------------------------------------------------------------


def test_enqueue_prints_id_and_writes_the_queue_file(cfg: Path) -> None:
    r = run_enqueue(cfg, PLAIN)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert len(out) == 1 and out[0].strip(), out
    qid = out[0].strip()
    spool = spool_of(cfg)
    assert support.spool_files(spool, "outgoing") == [qid]
    assert os.listdir(spool / "tmp") == []
    sender, rcpts, message = split_queue_file(queue_file(spool, qid))
    assert sender == SENDER.encode()
    assert rcpts == RCPT.encode()
    msg = email.message_from_bytes(message, policy=email.policy.default)
    assert msg["Subject"] == "hello"
    assert msg["From"] == "Sender <sender@example.org>"
    assert email.utils.parsedate_to_datetime(str(msg["Date"])) is not None
    mid = str(msg["Message-ID"])
    assert mid.startswith("<") and mid.endswith(">") and "@" in mid, mid
    assert msg.get_content() == "body line\n"
    # the original message is there unchanged, after the added headers
    assert message.endswith(PLAIN)
    assert len(msg.get_all("Date")) == 1 and len(msg.get_all("Message-ID")) == 1


def test_enqueue_creates_the_spool_private_but_for_the_drop_off_directory(cfg: Path) -> None:
    support.enqueue(cfg, PLAIN)
    spool = spool_of(cfg)
    assert spool.stat().st_mode & 0o777 == 0o711  # others may only pass through, to maildrop/
    for sub in ("tmp", "outgoing", "outgoing_active", "failed", "corrupt"):
        assert (spool / sub).is_dir(), sub
        assert (spool / sub).stat().st_mode & 0o777 == 0o700, sub
    assert (spool / "maildrop").stat().st_mode & 0o7777 == 0o3733


def test_enqueue_keeps_existing_date_and_message_id(cfg: Path) -> None:
    message = (
        b"From: a@example.org\nDate: Mon, 01 Jan 2024 10:00:00 +0000\nMessage-ID: <original@example.org>\n"
        b"Subject: kept\n\nbody\n"
    )
    qid = support.enqueue(cfg, message)
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), qid))
    assert stored == message


def test_enqueue_header_names_are_case_insensitive(cfg: Path) -> None:
    message = (
        b"from: a@example.org\ndate: Mon, 01 Jan 2024 10:00:00 +0000\nMESSAGE-ID: <x@example.org>\n\nbody\n"
    )
    qid = support.enqueue(cfg, message)
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), qid))
    assert stored == message


def test_enqueue_adds_only_the_missing_header(cfg: Path) -> None:
    spool = spool_of(cfg)
    with_date = b"Date: Mon, 01 Jan 2024 10:00:00 +0000\nSubject: s\n\nbody\n"
    _, _, stored = split_queue_file(queue_file(spool, support.enqueue(cfg, with_date)))
    msg = email.message_from_bytes(stored)
    assert msg.get_all("Date") == ["Mon, 01 Jan 2024 10:00:00 +0000"]
    assert len(msg.get_all("Message-ID") or []) == 1

    with_mid = b"Message-ID: <mine@example.org>\nSubject: s\n\nbody\n"
    _, _, stored = split_queue_file(queue_file(spool, support.enqueue(cfg, with_mid)))
    msg = email.message_from_bytes(stored)
    assert msg.get_all("Message-ID") == ["<mine@example.org>"]
    assert len(msg.get_all("Date") or []) == 1


def test_enqueue_looks_for_headers_only_in_the_header_block(cfg: Path) -> None:
    message = b"Subject: s\n\nDate: this is body text\nMessage-ID: <also@body>\n"
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), support.enqueue(cfg, message)))
    msg = email.message_from_bytes(stored)
    assert len(msg.get_all("Date") or []) == 1
    assert msg["Date"] != "this is body text"
    assert msg["Message-ID"] != "<also@body>"
    assert stored.endswith(message)


def test_enqueue_message_ids_are_unique(cfg: Path) -> None:
    spool = spool_of(cfg)
    ids = [support.enqueue(cfg, PLAIN) for _ in range(3)]
    assert len(set(ids)) == 3
    mids = {email.message_from_bytes(split_queue_file(queue_file(spool, q))[2])["Message-ID"] for q in ids}
    assert len(mids) == 3
    assert support.spool_files(spool, "outgoing") == sorted(ids)


def test_enqueue_crlf_message_gets_crlf_headers(cfg: Path) -> None:
    message = b"Subject: crlf\r\nTo: rcpt@example.net\r\n\r\nbody\r\n"
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), support.enqueue(cfg, message)))
    assert stored.endswith(message)
    added = stored[: -len(message)]
    assert added, "Date:/Message-ID: were not added"
    assert b"\n" not in added.replace(b"\r\n", b""), added


def test_enqueue_message_without_headers_still_gets_date_and_message_id(cfg: Path) -> None:
    message = b"just a body line, no headers\n"
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), support.enqueue(cfg, message)))
    msg = email.message_from_bytes(stored)
    assert msg["Date"] and msg["Message-ID"]
    assert msg.get_payload() == message.decode()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_enqueue_message_with_an_empty_header_block_keeps_its_body(cfg: Path, eol: bytes) -> None:
    """A message that starts with the blank line has no headers; adding two must not change its body."""
    message = eol + b"body" + eol
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), support.enqueue(cfg, message)))
    msg = email.message_from_bytes(stored)
    assert msg["Date"] and msg["Message-ID"]
    assert msg.get_payload() == ("body" + eol.decode()), stored


def test_enqueue_null_sender_writes_an_empty_first_line(cfg: Path) -> None:
    r = run_enqueue(cfg, PLAIN, "<>")
    assert r.returncode == 0, r.stderr
    data = queue_file(spool_of(cfg), r.stdout.decode().strip())
    assert data.startswith(b"\n" + RCPT.encode() + b"\n")


def test_enqueue_several_recipients_are_joined_by_commas(cfg: Path) -> None:
    to = ("a@example.net", "b@example.com", "c.d+tag@sub.example.org")
    r = run_enqueue(cfg, PLAIN, SENDER, *to)
    assert r.returncode == 0, r.stderr
    sender, rcpts, _ = split_queue_file(queue_file(spool_of(cfg), r.stdout.decode().strip()))
    assert sender == SENDER.encode()
    assert rcpts == ",".join(to).encode()


def test_enqueue_reads_a_large_message_whole(cfg: Path) -> None:
    body = b"".join(b"line %06d of a long body\n" % i for i in range(40000))  # about 1 MiB
    message = b"Subject: big\n\n" + body
    _, _, stored = split_queue_file(queue_file(spool_of(cfg), support.enqueue(cfg, message)))
    assert stored.endswith(message)


# -- enqueue: errors ----------------------------------------------------------------------

BAD_ADDRESSES = [
    "",  # (a name without a domain is a local name: qualified, see test_local_submission.py)
    "a b@c.d",
    "a@b\x01",
    "<a@b.c>",
    "a>b@c.d",
    "a@b,c@d",
    "a\tb@c.d",
    "a@b\x7f",
    "@b.c",
    "a@",
]


@pytest.mark.parametrize("addr", BAD_ADDRESSES, ids=repr)
def test_enqueue_rejects_invalid_sender(cfg: Path, addr: str) -> None:
    r = run_enqueue(cfg, PLAIN, addr)
    error_line(r)
    assert r.returncode == 65, r  # EX_DATAERR, as sendmail (contract section 7)
    assert r.stdout == b""
    assert_nothing_spooled(spool_of(cfg))


@pytest.mark.parametrize("addr", BAD_ADDRESSES, ids=repr)
def test_enqueue_rejects_invalid_recipient(cfg: Path, addr: str) -> None:
    r = run_enqueue(cfg, PLAIN, SENDER, addr)
    error_line(r)
    assert r.returncode == 65, r  # EX_DATAERR, as sendmail (contract section 7)
    assert r.stdout == b""
    assert_nothing_spooled(spool_of(cfg))


def test_enqueue_rejects_null_recipient(cfg: Path) -> None:
    error_line(run_enqueue(cfg, PLAIN, SENDER, "<>"))
    assert_nothing_spooled(spool_of(cfg))


@pytest.mark.parametrize("option", ["--from", "--to"])
def test_enqueue_rejects_an_address_that_is_not_utf8(cfg: Path, option: str) -> None:
    args = [b"enqueue", b"--from", SENDER.encode(), b"--to", RCPT.encode(), b"--config", bytes(cfg)]
    args[args.index(option.encode()) + 1] = b"a\xff@example.org"
    r = subprocess.run(
        [*support.GREENMAIL, *args], input=PLAIN, capture_output=True, timeout=60, env=support.env()
    )
    error_line(r)
    assert_nothing_spooled(spool_of(cfg))


def test_enqueue_rejects_one_bad_recipient_among_good_ones(cfg: Path) -> None:
    r = run_enqueue(cfg, PLAIN, SENDER, "good@example.net", "bad address@example.net", "other@example.net")
    error_line(r)
    assert_nothing_spooled(spool_of(cfg))


def test_enqueue_rejects_an_empty_message(cfg: Path) -> None:
    r = run_enqueue(cfg, b"")
    line = error_line(r)
    assert "empty" in line.lower(), line
    assert r.stdout == b""
    assert_nothing_spooled(spool_of(cfg))


def test_enqueue_spool_path_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    cfg = support.write_config(tmp_path, 2525, spool={"path": "file/spool"})
    r = run_enqueue(cfg, PLAIN)
    error_line(r)
    assert r.stdout == b""
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.parametrize("sub", ["tmp", "outgoing"])
def test_enqueue_spool_subdirectory_is_a_regular_file(cfg: Path, sub: str) -> None:
    spool = spool_of(cfg)
    support.enqueue(cfg, PLAIN)  # create the spool
    shutil.rmtree(spool / sub)
    (spool / sub).write_bytes(b"")
    before = all_files(spool)
    r = run_enqueue(cfg, PLAIN)
    error_line(r)
    assert r.stdout == b""
    assert all_files(spool) == before


def test_enqueue_cannot_create_in_tmp(cfg: Path) -> None:
    """spool/tmp is a directory where even root cannot create files (sysfs)."""
    support.skip_unless_sysfs_refuses_files()
    spool = spool_of(cfg)
    support.enqueue(cfg, PLAIN)
    before = all_files(spool)
    os.rmdir(spool / "tmp")
    os.symlink("/sys", spool / "tmp")
    r = run_enqueue(cfg, PLAIN)
    os.unlink(spool / "tmp")
    os.mkdir(spool / "tmp")
    error_line(r)
    assert r.stdout == b""
    assert all_files(spool) == before


def test_enqueue_rename_failure_leaves_nothing_behind(cfg: Path) -> None:
    """outgoing/ on another filesystem: the rename fails after the data is written."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    spool = spool_of(cfg)
    support.enqueue(cfg, b"Subject: create the spool\n\nx\n")
    shutil.rmtree(spool / "outgoing")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if os.stat(other).st_dev == os.stat(spool).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the spool")
        os.symlink(other, spool / "outgoing")
        r = run_enqueue(cfg, PLAIN)
        error_line(r)
        assert r.stdout == b""
        assert os.listdir(spool / "tmp") == []
        assert os.listdir(other) == []
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "--to", RCPT],
        ["enqueue", "--from", SENDER],
        ["enqueue"],
    ],
    ids=["no --from", "no --to", "neither"],
)
def test_enqueue_missing_required_option(cfg: Path, args: list[str]) -> None:
    r = support.greenmail(*args, config=cfg, stdin=PLAIN)
    assert r.returncode != 0
    assert r.stdout == b""
    err = r.stderr.decode()
    assert "--from" in err or "--to" in err, err
    assert_nothing_spooled(spool_of(cfg))


# -- configuration errors, for every command --------------------------------------------------

BAD_CONFIGS = {
    # name: (overrides for write_config, text appended, the key the message must name)
    "unknown key": ({"relay": {"bogus": 1}}, "", "relay.bogus"),
    "wrong type": ({"relay": {"port": "25"}}, "", "relay.port"),
    "negative duration": ({"retry": {"min_backoff": -5}}, "", "retry.min_backoff"),
    "port out of range": ({"relay": {"port": 70000}}, "", "relay.port"),
}

COMMANDS = {
    "enqueue": (["enqueue", "--from", SENDER, "--to", RCPT], PLAIN),
    "run": (["run", "--once"], b""),
    "queue list": (["queue", "list"], b""),
}


def good_spool(tmp_path: Path) -> dict[str, bytes]:
    """A spool with one message in it, as a good configuration would have made it; its files."""
    spool = tmp_path / "spool"
    for sub in ("tmp", "outgoing", "outgoing_active", "failed", "corrupt", "meta"):
        (spool / sub).mkdir(parents=True, mode=0o700)
    (spool / "outgoing" / "M1").write_bytes(f"{SENDER}\n{RCPT}\n".encode() + PLAIN)
    return all_files(spool)


def write_bad_config(tmp_path: Path, case: str) -> tuple[Path, str]:
    overrides, extra, key = BAD_CONFIGS[case]
    cfg = support.write_config(tmp_path, support.free_port(), **overrides)
    if extra:
        cfg.write_text(cfg.read_text() + extra)
    return cfg, key


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configuration_is_exit_78_naming_the_key(tmp_path: Path, command: str, case: str) -> None:
    before = good_spool(tmp_path)
    cfg, key = write_bad_config(tmp_path, case)
    args, stdin = COMMANDS[command]
    r = support.greenmail(*args, config=cfg, stdin=stdin)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    line = error_line(r)
    assert key in line, line
    assert all_files(tmp_path / "spool") == before


MORE_BAD_VALUES = {
    # checked with one command only (queue list), to keep the suite fast
    "unknown section": ({}, "[nonsense]\nx = 1\n", "nonsense"),
    "bool as number": ({"delivery": {"max_connections": True}}, "", "delivery.max_connections"),
    "number as bool": ({"retry": {"bounce": 1}}, "", "retry.bounce"),
    "negative timeout": ({"timeouts": {"connect": -1}}, "", "timeouts.connect"),
    "port zero": ({"relay": {"port": 0}}, "", "relay.port"),
    "nan duration": ({"timeouts": {"command": float("nan")}}, "", "timeouts.command"),
    "infinite duration": ({"retry": {"max_lifetime": float("inf")}}, "", "retry.max_lifetime"),
    "zero check interval": ({"delivery": {"check_interval": 0}}, "", "delivery.check_interval"),
    "float port": ({"relay": {"port": 25.5}}, "", "relay.port"),
    "metrics port out of range": ({"metrics": {"listen": "127.0.0.1:70000"}}, "", "metrics.listen"),
    "metrics without port": ({"metrics": {"listen": "localhost"}}, "", "metrics.listen"),
    "empty spool path": ({"spool": {"path": ""}}, "", "spool.path"),
    "zero connections": ({"delivery": {"max_connections": 0}}, "", "delivery.max_connections"),
    "min_backoff above max_backoff": ({"retry": {"min_backoff": 500, "max_backoff": 100}}, "", "max_backoff"),
}


@pytest.mark.parametrize("case", MORE_BAD_VALUES)
def test_more_bad_values_are_exit_78(tmp_path: Path, case: str) -> None:
    overrides, extra, key = MORE_BAD_VALUES[case]
    cfg = support.write_config(tmp_path, 2525, **overrides)
    if extra:
        cfg.write_text(cfg.read_text() + extra)
    r = support.greenmail("queue", "list", config=cfg)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    assert key in error_line(r)
    assert not (tmp_path / "spool").exists()


def test_section_that_is_not_a_table_is_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "greenmail.toml"
    cfg.write_text('relay = 5\n[spool]\npath = "spool"\n')
    r = support.greenmail("queue", "list", config=cfg)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    assert "relay" in error_line(r)
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_invalid_toml_is_exit_78(tmp_path: Path, command: str) -> None:
    before = good_spool(tmp_path)
    cfg = support.write_config(tmp_path, 2525)
    cfg.write_text(cfg.read_text() + "[relay\nport = = 3\n")
    args, stdin = COMMANDS[command]
    r = support.greenmail(*args, config=cfg, stdin=stdin)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    line = error_line(r)
    assert "greenmail.toml" in line or "toml" in line.lower(), line
    assert all_files(tmp_path / "spool") == before


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_config_file_is_exit_78(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere" / "greenmail.toml"
    args, stdin = COMMANDS[command]
    r = support.greenmail(*args, config=missing, stdin=stdin)
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    line = error_line(r)
    assert str(missing) in line, line
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_no_configuration_at_all_is_exit_78(tmp_path: Path, command: str) -> None:
    if Path("/etc/greenmail/greenmail.toml").exists():
        pytest.skip("this machine has /etc/greenmail/greenmail.toml")
    args, stdin = COMMANDS[command]
    r = subprocess.run(
        [*support.GREENMAIL, *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=support.env(),
        cwd=tmp_path,
    )
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    line = error_line(r)
    assert "--config" in line or "GREENMAIL_CONFIG" in line, line
    assert os.listdir(tmp_path) == []


def run_with_env(args: list[str], config_env: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = support.env()
    env["GREENMAIL_CONFIG"] = str(config_env)
    return subprocess.run([*support.GREENMAIL, *args], input=stdin, capture_output=True, timeout=60, env=env)


def test_greenmail_config_environment_variable_is_used(tmp_path: Path) -> None:
    cfg = support.write_config(tmp_path, 2525)
    r = run_with_env(["enqueue", "--from", SENDER, "--to", RCPT], cfg, PLAIN)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    assert support.spool_files(tmp_path / "spool", "outgoing") == [qid]
    r = run_with_env(["queue", "list", "--json"], cfg)
    assert r.returncode == 0, r.stderr
    assert qid in r.stdout.decode()


def test_greenmail_config_environment_variable_bad_config_is_reported(tmp_path: Path) -> None:
    cfg = support.write_config(tmp_path, 2525, relay={"port": 99999})
    for args in (["enqueue", "--from", SENDER, "--to", RCPT], ["run", "--once"], ["queue", "list"]):
        r = run_with_env(args, cfg, PLAIN)
        assert r.returncode == EX_CONFIG, (args, r.stderr)
        assert "relay.port" in error_line(r)
    assert not (tmp_path / "spool").exists()


def test_config_option_wins_over_the_environment_variable(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    bad = support.write_config(tmp_path / "bad", 2525, relay={"port": 99999})
    good = support.write_config(tmp_path / "good", 2525)
    r = run_with_env(["enqueue", "--from", SENDER, "--to", RCPT, "--config", str(good)], bad, PLAIN)
    assert r.returncode == 0, r.stderr
    assert support.spool_files(tmp_path / "good" / "spool", "outgoing") == [r.stdout.decode().strip()]


@pytest.mark.parametrize("args", [["queue", "list", "--json"], ["config", "check"]])
def test_config_before_the_command_beats_the_environment(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    bad = support.write_config(tmp_path / "bad", 2525, relay={"port": 99999})
    good = support.write_config(tmp_path / "good", 2525)
    r = run_with_env(["--config", str(good), *args], bad)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "bad" / "spool").exists()


def test_relative_spool_path_resolves_against_the_config_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    cfg = support.write_config(conf_dir, 2525, spool={"path": "var/spool"})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run(
        [*support.GREENMAIL, "enqueue", "--from", SENDER, "--to", RCPT, "--config", str(cfg)],
        input=PLAIN,
        capture_output=True,
        timeout=60,
        env=support.env(),
        cwd=elsewhere,
    )
    assert r.returncode == 0, r.stderr
    assert support.spool_files(conf_dir / "var" / "spool", "outgoing") == [r.stdout.decode().strip()]
    assert os.listdir(elsewhere) == []


def test_unusable_spool_for_queue_list_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    cfg = support.write_config(tmp_path, support.free_port(), spool={"path": "file/spool"})
    r = support.greenmail("queue", "list", config=cfg)
    assert "file/spool" in error_line(r)
    assert (tmp_path / "file").read_text() == "not a directory\n"


def test_unusable_spool_for_run_is_a_clear_error(tmp_path: Path) -> None:
    """run logs to stderr, so other lines may come first; the error is the last line."""
    (tmp_path / "file").write_text("not a directory\n")
    cfg = support.write_config(tmp_path, support.free_port(), spool={"path": "file/spool"})
    r = support.greenmail("run", "--once", config=cfg)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    assert "file/spool" in err.splitlines()[-1], err
    assert (tmp_path / "file").read_text() == "not a directory\n"


@pytest.mark.parametrize(
    "command",
    [
        ["enqueue"],
        ["run"],
        ["queue", "list"],
        ["queue", "show"],
        ["queue", "delete"],
        ["queue", "retry"],
        ["sink"],
        ["user", "add"],
        ["config", "check"],
        ["relay", "test"],
    ],
)
def test_every_subcommand_takes_config(command: list[str]) -> None:
    """Contract 4/1: every subcommand takes --config PATH."""
    r = support.greenmail(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert b"Usage:" in r.stdout
    assert b"--config" in r.stdout, r.stdout.decode()


def test_user_add_writes_the_configured_users_file(tmp_path: Path) -> None:
    cfg = support.write_config(tmp_path, 2525, listener={"users_file": "users"})
    r = support.greenmail("user", "add", "app", stdin=b"pw\n", config=cfg)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "users").read_text().startswith("app:")
    (tmp_path / "bare").mkdir()
    bare = support.write_config(tmp_path / "bare", 2525)
    r = support.greenmail("user", "add", "app", stdin=b"pw\n", config=bare)
    assert r.returncode == 64 and b"listener.users_file" in r.stderr, r


# -- run --once with corrupt queue files ----------------------------------------------------------


def drop_into_outgoing(spool: Path, name: str, data: bytes) -> None:
    """What another program does: write in tmp/, rename into outgoing/."""
    tmp = spool / "tmp" / f".writer.{name}"
    tmp.write_bytes(data)
    os.rename(tmp, spool / "outgoing" / name)


def test_run_once_moves_corrupt_files_to_corrupt_and_delivers_the_rest(tmp_path: Path) -> None:
    port = support.free_port()
    cfg = support.write_config(tmp_path, port)
    spool = tmp_path / "spool"
    good = {
        support.enqueue(cfg, b"Subject: good-one\n\nfirst\n"): b"good-one",
        support.enqueue(
            cfg, b"Subject: good-two\n\nsecond\n", "<>", "a@example.net", "b@example.net"
        ): b"good-two",
    }
    drop_into_outgoing(spool, "oneline", b"sender@example.org\n")
    drop_into_outgoing(spool, "badenvelope", b"sender@example.org\nnot an address\nSubject: bad\n\nbody\n")
    maildir = tmp_path / "maildir"
    sink = support.sink(port, maildir, tmp_path / "sink.log")
    try:
        r = support.greenmail("run", "--once", config=cfg)
    finally:
        sink.stop()
    log = r.stderr.decode(errors="replace")
    assert r.returncode == 0, log
    assert support.spool_files(spool, "corrupt") == ["badenvelope", "oneline"]
    assert support.spool_files(spool, "outgoing") == []
    assert support.spool_files(spool, "outgoing_active") == []
    assert support.spool_files(spool, "failed") == []
    for name in ("oneline", "badenvelope"):
        assert any(name in line for line in log.splitlines()), log
    assert (spool / "corrupt" / "oneline").read_bytes() == b"sender@example.org\n"
    received = [p.read_bytes() for p in (maildir / "new").iterdir()]
    assert len(received) == 2, received
    for subject in good.values():
        assert sum(subject in m for m in received) == 1, (subject, received)
    assert not any(b"Subject: bad" in m for m in received)


def test_run_once_with_the_relay_down_exits_0_and_keeps_the_message(tmp_path: Path) -> None:
    cfg = support.write_config(tmp_path, support.free_port())  # nothing listens there
    qid = support.enqueue(cfg, PLAIN)
    r = support.greenmail("run", "--once", config=cfg, timeout=30)
    assert r.returncode == 0, r.stderr
    assert [n.split(",")[0] for n in support.spool_files(tmp_path / "spool", "outgoing")] == [qid]
    assert support.spool_files(tmp_path / "spool", "outgoing_active") == []


# -- sink -------------------------------------------------------------------------------------------


def test_sink_address_in_use_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = support.greenmail(
            "sink", "--listen", f"127.0.0.1:{port}", "--maildir", str(tmp_path / "md"), timeout=30
        )
    line = error_line(r)
    assert str(port) in line, line


def test_sink_bad_listen_address_fails_with_one_line(tmp_path: Path) -> None:
    r = support.greenmail("sink", "--listen", "no-port-here", "--maildir", str(tmp_path / "md"), timeout=30)
    line = error_line(r)
    assert "--listen" in line, line


def test_sink_stores_a_delivered_message(tmp_path: Path) -> None:
    port = support.free_port()
    cfg = support.write_config(tmp_path, port)
    support.enqueue(cfg, b"Subject: via sink\n\n.leading dot\nbody\n")
    sink = support.sink(port, tmp_path / "md", tmp_path / "sink.log")
    try:
        r = support.greenmail("run", "--once", config=cfg)
        assert r.returncode == 0, r.stderr
    finally:
        assert sink.stop() is not None
    (stored,) = [p.read_bytes() for p in (tmp_path / "md" / "new").iterdir()]
    assert stored.replace(b"\r\n", b"\n").endswith(b"Subject: via sink\n\n.leading dot\nbody\n")


# -- help ---------------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    r = support.greenmail("--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for command in ("enqueue", "run", "queue", "sink"):
        assert command in out, out


def test_run_help_lists_its_options() -> None:
    r = support.greenmail("run", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for option in ("--config", "--once"):
        assert option in out, out


def test_queue_help_lists_its_subcommands() -> None:
    r = support.greenmail("queue", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for command in ("list", "show", "delete", "retry"):
        assert command in out, out
