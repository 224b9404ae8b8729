"""``greenmail config check`` and ``--config`` before the subcommand, as commands run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import support


def write(tmp_path: Path, extra: str = "") -> Path:
    """A configuration; ``extra`` lines before the first table go into [relay]."""
    path = tmp_path / "greenmail.toml"
    path.write_text(f'[spool]\npath = "spool"\n[relay]\nhost = "127.0.0.1"\nport = 2525\n{extra}')
    return path


def test_a_good_configuration_prints_the_settings_and_creates_nothing(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[addresses]\norigin = "example.org"\n')
    r = support.greenmail("config", "check", config=cfg)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"# {cfg}: ok"
    assert f"spool.path = {tmp_path / 'spool'}" in lines and "addresses.origin = example.org" in lines
    assert sorted(os.listdir(tmp_path)) == ["greenmail.toml"]  # no spool, no settings cache


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("[delivery]\nmax_conections = 3\n", b"delivery.max_conections"),
        ('[relay]\nport = "x"\n', b"invalid TOML"),  # a table defined twice
        ('[addresses]\naliases = "aliases"\n', b"aliases:2: backup:"),
        ('username = "u"\npassword_file = "secret"\n', b"chmod 600"),
    ],
    ids=["unknown-key", "bad-toml", "bad-aliases", "password-file-mode"],
)
def test_a_bad_configuration_is_exit_78_with_the_key(tmp_path: Path, extra: str, words: bytes) -> None:
    (tmp_path / "aliases").write_text("root: ops@example.org\nbackup: |/usr/bin/backup\n")
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    cfg = write(tmp_path, extra)
    r = support.greenmail("config", "check", config=cfg)
    assert r.returncode == 78, r
    assert r.stderr.startswith(b"greenmail: configuration error: ") and words in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1
    assert b"pw" not in r.stdout + r.stderr.replace(b"password", b"")


def test_config_before_the_subcommand(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    qid = support.enqueue(cfg, b"Subject: x\n\ny\n")
    r = support.greenmail("--config", str(cfg), "queue", "list")
    assert r.returncode == 0 and qid.encode() in r.stdout, r
    r = support.greenmail("--config", str(cfg), "config", "check")
    assert r.returncode == 0, r.stderr
