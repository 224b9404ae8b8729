"""``greenmail enqueue`` as applications run it: the installed command, one process per message.

Its cost is mostly imports. Once a full load of the configuration has left
the settings cache beside it (confcache.py), the command must import nothing
beyond what ``import greenmail`` itself costs and the light submission
modules — no click, tomllib, pathlib, dataclasses, logging — and still write
the exact queue file. Without a cache, or with a stale or untrusted one, it
loads the configuration in full (and rejects a bad one with config.load's
words). Every test runs the real installed script (the interpreter's own
import log tells what it imported).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import support

from greenmail import config
from greenmail.errors import ConfigError
from greenmail.queuefile import HOST

LIGHT = {
    "greenmail.entry",
    "greenmail.submit",
    "greenmail.exits",
    "greenmail.errors",
    "greenmail.address",
    "greenmail.layout",
    "greenmail.dropoff",
    "greenmail.addresses",
    "greenmail.confcache",
    "errno",
}
HEAVY = {  # greenmail's heavy modules and what they bring (pathlib, re: see below)
    "click",
    "tomllib",
    "dataclasses",
    "logging",
    "datetime",
    "json",
    "email",
    "concurrent.futures",
    "gevent",
    "greenmail.config",
    "greenmail.spool",
    "greenmail.queuefile",
    "greenmail.cli",
}
MESSAGE = b"Subject: hello\nFrom: app@example.org\n\n" + b"a line of the body\n" * 100


def installed_script() -> Path:
    """The console script pip installed beside this interpreter (.venv/bin/greenmail)."""
    beside = Path(sys.executable).parent / "greenmail"
    found = beside if beside.exists() else Path(shutil.which("greenmail") or "")
    assert found.name == "greenmail" and found.exists(), "greenmail console script not installed"
    return found


def imports_of(cmd: list[str], stdin: bytes = b"") -> tuple[subprocess.CompletedProcess[bytes], set[str]]:
    """Run ``cmd`` with Python's import log on; the result (log removed from stderr) and the modules."""
    env = support.env() | {"PYTHONPROFILEIMPORTTIME": "1"}
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, env=env)
    modules, rest = set(), []
    for line in r.stderr.decode().splitlines(keepends=True):
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                modules.add(name)
        else:
            rest.append(line)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "".join(rest).encode()), modules


def enqueue(cfg: Path, message: bytes = MESSAGE) -> tuple[subprocess.CompletedProcess[bytes], set[str]]:
    args = ["enqueue", "--config", str(cfg), "--from", "app@example.org", "--to", "rcpt@example.net"]
    return imports_of([str(installed_script()), *args], stdin=message)


@pytest.fixture(scope="module")
def baseline() -> set[str]:
    """What starting this interpreter and ``import greenmail`` import anyway."""
    r, modules = imports_of([sys.executable, "-c", "import greenmail"])
    assert r.returncode == 0, r.stderr
    return modules


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return support.write_config(tmp_path, 2525)


def outgoing(cfg: Path) -> list[Path]:
    return sorted((cfg.parent / "spool" / "outgoing").iterdir())


def test_enqueue_imports_only_the_light_modules(cfg: Path, baseline: set[str]) -> None:
    first, modules = enqueue(cfg)  # no cache yet: the full load, which leaves it
    assert first.returncode == 0, first.stderr
    assert "tomllib" in modules
    r, modules = enqueue(cfg)
    assert r.returncode == 0, r.stderr
    assert modules - baseline <= LIGHT, f"the enqueue path imported {sorted(modules - baseline - LIGHT)}"
    # whatever the installation imports at start-up (the import hook of an editable install in
    # setuptools' default mode brings pathlib, re, ipaddress), greenmail's heavy modules stay out
    assert not modules & HEAVY


def test_enqueue_writes_the_exact_queue_file(cfg: Path) -> None:
    r, _ = enqueue(cfg)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    qid = r.stdout.decode().strip()
    (path,) = outgoing(cfg)
    assert path.name == qid and len(qid) == 24
    sender, rcpts, rest = path.read_bytes().split(b"\n", 2)
    assert (sender, rcpts) == (b"app@example.org", b"rcpt@example.net")
    date, msgid, message = rest.split(b"\n", 2)
    assert date.startswith(b"Date: ")
    assert msgid == f"Message-ID: <{qid}@{HOST}>".encode()
    assert message == MESSAGE
    spool = cfg.parent / "spool"
    assert os.listdir(spool / "tmp") == []
    assert (os.stat(path).st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    "text",
    [
        '[spool]\npath = "spool"\n[relay]\nfoo = 1\n',
        '[spool]\npath = "spool"\n[relay]\nport = 25.0\n',
        '[spool]\npath = "spool"\n[relay]\nhosts = ["a:25"]\nhost = "b"\n',
        '[spool]\npath = "spool"\n[relay]\nusername = "u"\n',
        "[retry]\nmin_backoff = 5000\n",
        "[nosuch]\nx = 1\n",
        "[relay]\nport = \n",
        "[retry]\nmax_lifetime = nan\n",
        "[spool]\npath = 'spool'\nx = 1_000\n",
    ],
    ids=[
        "unknown-key",
        "port-float",
        "hosts-and-host",
        "username-alone",
        "min>max",
        "section",
        "toml",
        "nan",
        "underscores",
    ],
)
def test_bad_configuration_is_rejected_with_config_loads_words(tmp_path: Path, text: str) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as full:
        config.load(path)
    r, _ = enqueue(path)
    assert r.returncode == 78
    assert r.stderr.decode() == f"greenmail: configuration error: {full.value}\n"
    assert not (tmp_path / "spool").exists()


def test_missing_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as full:
        config.load(path)
    r, _ = enqueue(path)
    assert (r.returncode, r.stderr.decode()) == (78, f"greenmail: configuration error: {full.value}\n")


def test_a_changed_configuration_is_loaded_in_full(tmp_path: Path) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_text('[spool]\npath = "one"\n')
    for _ in range(2):
        assert enqueue(path)[0].returncode == 0
    path.write_text('[spool]\npath = "two"  # a longer file: its size changed\n')
    r, modules = enqueue(path)
    assert r.returncode == 0, r.stderr
    assert "tomllib" in modules
    assert len(os.listdir(tmp_path / "one" / "outgoing")) == 2
    assert os.listdir(tmp_path / "two" / "outgoing") == [r.stdout.decode().strip()]
    r, modules = enqueue(path)  # the cache follows
    assert "tomllib" not in modules and len(os.listdir(tmp_path / "two" / "outgoing")) == 2


def test_a_cache_others_could_write_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_text('[spool]\npath = "spool"\n')
    assert enqueue(path)[0].returncode == 0
    cache = tmp_path / ".greenmail.toml.cache"
    assert cache.exists()
    cache.chmod(0o666)
    r, modules = enqueue(path)
    assert r.returncode == 0 and "tomllib" in modules


def test_a_broken_cache_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_text('[spool]\npath = "spool"\n')
    assert enqueue(path)[0].returncode == 0
    (tmp_path / ".greenmail.toml.cache").write_bytes(b"\x00not marshal")
    r, modules = enqueue(path)
    assert r.returncode == 0 and "tomllib" in modules
    assert len(outgoing(path)) == 2
