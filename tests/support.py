"""Helpers for the tests that run real processes: ports, configs, polling, processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GREENMAIL = [sys.executable, "-P", "-m", "greenmail"]  # -P: never the current directory's greenmail/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 10.0) -> None:
    def is_open() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_until(is_open, timeout, what=f"port {port}")


def write_config(directory: Path, relay_port: int, **sections: dict[str, Any]) -> Path:
    """A greenmail.toml in ``directory`` with spool "spool", the relay on 127.0.0.1:relay_port.

    ``sections`` override or add keys, e.g. delivery={"max_connections": 1}.
    Metrics are off unless a metrics section is given.
    """
    cfg: dict[str, dict[str, Any]] = {
        "spool": {"path": "spool"},
        "relay": {"host": "127.0.0.1", "port": relay_port, "helo": "client.test"},
        "delivery": {"check_interval": 60},
        "retry": {"min_backoff": 300},
        "timeouts": {"connect": 5, "banner": 5, "command": 5, "data_init": 5, "data_block": 5, "data_end": 5},
        "metrics": {"listen": ""},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    lines = []
    for name, values in cfg.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    path = directory / "greenmail.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def env() -> dict[str, str]:
    """The environment of greenmail processes: this tree importable, after the caller's PYTHONPATH
    (so that ``PYTHONPATH=/other/checkout pytest ...`` runs another revision's code), no config."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
    e.pop("GREENMAIL_CONFIG", None)
    return e


def python(script: str, *args: str, timeout: float = 90) -> str:
    """Run ``script`` in a fresh interpreter that imports this tree's greenmail; its stdout
    (the script must succeed: its stderr is the assertion's message)."""
    argv = [sys.executable, "-P", "-c", script, *args]
    r = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def greenmail(
    *args: str, config: Path | None = None, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run one greenmail command to completion."""
    cmd = [*GREENMAIL, *args] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=env())


def enqueue(config: Path, message: bytes, sender: str = "sender@example.org", *to: str) -> str:
    r = greenmail(
        "enqueue",
        "--from",
        sender,
        *[a for t in (to or ("rcpt@example.net",)) for a in ("--to", t)],
        config=config,
        stdin=message,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


class Process:
    """A long-running child (daemon, sink, server) whose stderr goes to a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=env())

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        terminate(self.proc)
        self._out.close()
        return self.proc.returncode


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, up to 15 s to exit, then SIGKILL (nothing if it has exited already)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def skip_unless_sysfs_refuses_files() -> None:
    """Tests that point spool/tmp into /sys need a /sys where not even root can create a file."""
    probe = Path("/sys") / f"greenmail-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return
    os.unlink(probe)
    pytest.skip("files can be created in /sys here")


def daemon(config: Path, log: Path, *extra: str) -> Process:
    return Process([*GREENMAIL, "run", "--config", str(config), *extra], log)


def sink(port: int, maildir: Path, log: Path) -> Process:
    p = Process([*GREENMAIL, "sink", "--listen", f"127.0.0.1:{port}", "--maildir", str(maildir)], log)
    wait_port(port)
    return p


def spool_files(spool: Path, sub: str) -> list[str]:
    d = spool / sub
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.exists() else []


def need_tool(tool: str, package: str) -> str:
    """The path of a Debian-packaged ``tool`` (PATH, then /usr/sbin); skip when missing, fail under CI."""
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        message = f"{tool} is not installed (Debian package '{package}'; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
