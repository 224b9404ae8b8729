"""An aiosmtpd relay for the end-to-end tests, run as a subprocess.

    python tests/aiosmtpd_server.py --port N --out DIR [--delay-data SECONDS]

Listens on 127.0.0.1:N. Every accepted message becomes two files in DIR:
``NNNNNN.eml`` (``envelope.original_content``: the exact bytes received,
un-dot-stuffed) and ``NNNNNN.json`` (mail_from, rcpt_tos, the peer port),
the JSON written last and atomically, so its presence means the message is
complete. ``DIR/stats.json`` is rewritten atomically on every change:
connections (total), active, max_active (the most open at once),
data_started (DATA payloads fully received, before the reply) and messages
(accepted with 250). With ``--delay-data`` the reply to the final "." waits
that long first (asyncio.sleep); a client that hangs up meanwhile gets
nothing stored. Prints READY once listening; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP


class Stats:
    def __init__(self, out: Path) -> None:
        self.path = out / "stats.json"
        self.values = {"connections": 0, "active": 0, "max_active": 0, "data_started": 0, "messages": 0}
        self.write()

    def bump(self, key: str, by: int = 1) -> None:
        self.values[key] += by
        if key == "active":
            self.values["max_active"] = max(self.values["max_active"], self.values["active"])
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(".stats.json.tmp")
        tmp.write_text(json.dumps(self.values))
        os.replace(tmp, self.path)


class Handler:
    def __init__(self, out: Path, stats: Stats, delay: float) -> None:
        self.out = out
        self.stats = stats
        self.delay = delay
        self.count = 0

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        self.stats.bump("data_started")
        if self.delay:
            await asyncio.sleep(self.delay)  # cancelled when the client hangs up
        self.count += 1
        name = f"{self.count:06d}"
        (self.out / f"{name}.eml").write_bytes(envelope.original_content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "peer_port": session.peer[1] if session.peer else None,
        }
        tmp = self.out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.out / f"{name}.json")
        self.stats.bump("messages")
        return "250 2.0.0 Ok: queued as " + name


class CountingSMTP(SMTP):
    stats: Stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stats.bump("connections")
        self.stats.bump("active")
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.stats.bump("active", -1)
        super().connection_lost(error)


async def serve(port: int, out: Path, delay: float) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats(out)
    handler = Handler(out, stats, delay)
    CountingSMTP.stats = stats

    def factory() -> CountingSMTP:
        return CountingSMTP(handler, hostname="aiosmtpd.test", loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--delay-data", type=float, default=0.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.port, args.out, args.delay_data))
    sys.exit(0)


# -- the test side: start the script and read what it received ---------------------------

SCRIPT = Path(__file__).resolve()
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Received:
    name: str
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def message_id(self) -> str | None:
        m = _MESSAGE_ID.search(self.content)
        return m.group(1).decode() if m else None


class Relay:
    """This script as a subprocess (a support.Process), with readers for its output."""

    def __init__(self, port: int, out: Path, log: Path, delay_data: float = 0.0) -> None:
        import support

        self.port = port
        self.out = out
        args = [sys.executable, str(SCRIPT), "--port", str(port), "--out", str(out)]
        if delay_data:
            args += ["--delay-data", str(delay_data)]
        self.process = support.Process(args, log)
        try:
            support.wait_until(self._ready, 15, what=f"aiosmtpd relay on port {port}")
        except BaseException:
            self.process.stop()
            raise

    def _ready(self) -> bool:
        if self.process.proc.poll() is not None:
            raise AssertionError(f"aiosmtpd relay exited: {self.process.text()}")
        return "READY" in self.process.text()

    def stop(self) -> int | None:
        return self.process.stop()

    def stats(self) -> dict[str, int]:
        return json.loads((self.out / "stats.json").read_text())

    def count(self) -> int:
        return sum(1 for n in os.listdir(self.out) if n.endswith(".json") and n != "stats.json")

    def messages(self) -> list[Received]:
        out = []
        for meta in sorted(self.out.glob("[0-9]*.json")):
            m = json.loads(meta.read_text())
            content = meta.with_suffix(".eml").read_bytes()
            out.append(Received(meta.stem, m["mail_from"], m["rcpt_tos"], content))
        return out

    def message_ids(self) -> list[str | None]:
        return [m.message_id for m in self.messages()]


def start_relay(tmp: Path, name: str = "relay", port: int | None = None, delay_data: float = 0.0) -> Relay:
    import support

    port = port or support.free_port()
    return Relay(port, tmp / name, tmp / f"{name}.log", delay_data)


# -- spool and daemon helpers shared by tests/e2e ------------------------------------------


@dataclass
class Queued:
    """A queue file as it lies in the spool: its envelope lines and the message after them."""

    name: str
    sender: str
    recipients: list[str]
    body: bytes

    @property
    def message_id(self) -> str | None:
        m = _MESSAGE_ID.search(self.body)
        return m.group(1).decode() if m else None


def read_queue_file(path: Path) -> Queued:
    sender, rcpts, body = path.read_bytes().split(b"\n", 2)
    return Queued(path.name, sender.rstrip(b"\r").decode(), rcpts.rstrip(b"\r").decode().split(","), body)


def queued(spool: Path, sub: str = "outgoing") -> dict[str, Queued]:
    """Every queue file in spool/sub, by file name."""
    d = spool / sub
    if not d.exists():
        return {}
    return {n: read_queue_file(d / n) for n in sorted(os.listdir(d)) if not n.startswith(".")}


def drop(spool: Path, name: str, body: bytes, sender: str = "app@example.org", *rcpts: str) -> None:
    """Enqueue the way any other program may: write into tmp/, rename into outgoing/."""
    tmp = spool / "tmp" / f".drop-{name}"
    envelope = f"{sender}\n{','.join(rcpts or ('rcpt@example.net',))}\n".encode()
    tmp.write_bytes(envelope + body)
    os.rename(tmp, spool / "outgoing" / name)


def numbered(i: int, tag: str = "bulk") -> bytes:
    return (
        f"From: app@example.org\r\nTo: rcpt@example.net\r\nSubject: {tag} {i}\r\n"
        f"Message-ID: <{tag}-{i}@test>\r\n\r\nmessage number {i}\r\n.dot line {i}\r\n"
    ).encode()


def drop_many(spool: Path, n: int, tag: str = "bulk") -> set[str]:
    """``n`` numbered messages dropped into outgoing/; their Message-IDs."""
    for d in ("tmp", "outgoing"):
        (spool / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        drop(spool, f"{tag}-{i:04d}", numbered(i, tag))
    return {f"<{tag}-{i}@test>" for i in range(n)}


def start_daemon(config: Path, log: Path, *extra: str, metrics_port: int | None = None):  # noqa: ANN201
    """``greenmail run`` started and ready: its metrics port open (when given), else its start line logged.

    The metrics server starts after the signal handlers are installed, so a
    daemon whose port is open is safe to signal.
    """
    import support

    p = support.daemon(config, log, *extra)

    def ready() -> bool:
        if p.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {p.proc.returncode}: {p.text()}")
        if metrics_port is None:
            return "greenmail started" in p.text()
        try:
            import socket

            socket.create_connection(("127.0.0.1", metrics_port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        support.wait_until(ready, 15, what="the daemon to start")
    except BaseException:
        p.stop()
        raise
    return p


if __name__ == "__main__":
    main()
