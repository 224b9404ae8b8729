"""The receivers the peers deliver to on 127.0.0.1: Postfix's smtp-sink (counts messages and
sessions) and a small asyncio receiver of our own (``run.py _latsink``) that records when
each message's final dot arrived, for the latency workload."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from bench.base import RUN_PY, WORK, BenchError, port_listening
from bench.procs import child_log, spawn, stop_proc


def sink_binary() -> Path:
    """smtp-sink under a name of our own: a `pkill smtp-sink` by some other job on
    the machine (this happened once) must not end a measurement."""
    copy = WORK / "bin" / "gmbench-smtp-sink"
    orig = Path(shutil.which("smtp-sink") or "/usr/sbin/smtp-sink")
    if not copy.exists() or copy.stat().st_size != orig.stat().st_size:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(orig, copy)
    return copy


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1: discards mail; -c writes running
    "sess= quit= mesg=" counters to stdout, which count() reads back."""

    COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")

    def __init__(self, port: int, logfile: Path, delay: int = 0, maxconn: int = 1000) -> None:
        self.port, self.logfile, self.delay, self.maxconn = port, logfile, delay, maxconn
        self.proc: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        if port_listening(self.port):
            raise BenchError(f"port {self.port} is in use: choose another with --port")
        args = [sink_binary(), "-c", "-u", "nobody", "-m", self.maxconn]
        if self.delay:
            args += ["-w", self.delay]
        args += [f"127.0.0.1:{self.port}", 4096]
        self.proc = spawn(args, stdout=child_log(self.logfile), stderr=subprocess.STDOUT)
        for _ in range(200):
            if port_listening(self.port):
                return self
            time.sleep(0.02)
        raise BenchError(f"smtp-sink did not start: {self.logfile.read_text(errors='replace')[-300:]}")

    def counters(self) -> tuple[int, int, int]:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                found = self.COUNTERS.findall(f.read())
        except FileNotFoundError:
            return 0, 0, 0
        return tuple(int(x) for x in found[-1]) if found else (0, 0, 0)

    def count(self) -> int:
        return self.counters()[2]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the sink exited during the measurement (status {self.proc.returncode})")

    def sessions(self) -> int:
        return self.counters()[0]

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def stop(self) -> None:
        stop_proc(self.proc, 5)


class LatencySink:
    """A small SMTP receiver of our own (``run.py _latsink``) that writes
    "<X-Bench-Id> <CLOCK_MONOTONIC seconds>" when a message's final dot arrives.
    smtp-sink cannot say when a given message arrived; this can."""

    def __init__(self, port: int, out: Path) -> None:
        self.port, self.out = port, out
        self.proc: subprocess.Popen | None = None
        self._f: BinaryIO | None = None
        self.seen: dict[str, float] = {}

    def start(self) -> LatencySink:
        if port_listening(self.port):
            raise BenchError(f"port {self.port} is in use")
        self.out.write_bytes(b"")
        self.proc = spawn([sys.executable, RUN_PY, "_latsink", "--port", self.port, "--out", self.out])
        for _ in range(250):
            if port_listening(self.port):
                self._f = open(self.out, "rb")  # noqa: SIM115 - read until stop()
                return self
            time.sleep(0.02)
        raise BenchError("latency sink did not start")

    def wait_for(self, bench_id: str, timeout: float) -> float | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the latency sink exited (status {self.proc.returncode})")
        deadline = time.monotonic() + timeout
        while bench_id not in self.seen:
            for line in self._f.readlines():
                if line.endswith(b"\n"):
                    k, t = line.split()
                    self.seen[k.decode()] = float(t)
                else:  # half-written line: read it again next time
                    self._f.seek(-len(line), os.SEEK_CUR)
            if bench_id in self.seen or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        return self.seen.get(bench_id)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else -1

    def stop(self) -> None:
        stop_proc(self.proc, 5)
        if self._f:
            self._f.close()


def latsink_main(port: int, out: str) -> None:

    rx = re.compile(rb"^X-Bench-Id: *(\S+)", re.M | re.I)
    sink_log = open(out, "ab", buffering=0)  # noqa: SIM115 - the process's lifetime

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 latsink ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-latsink\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with .\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    t = time.monotonic()
                    m = rx.search(data)
                    sink_log.write(b"%s %.6f\n" % (m.group(1) if m else b"-", t))
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:  # HELO MAIL RCPT RSET NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port, limit=1 << 20)
        async with server:
            await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(main())
