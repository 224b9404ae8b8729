"""What a run writes into its results directory: the measurement rows (raw.tsv, one line per
measurement, rewritten after each) and env.txt (machine, versions, the code measured)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from bench.base import MSG, PKG, REPO, WORK, log

Row = dict[str, str]

FIELDS = [
    "workload", "peer", "n", "conns", "delay_s", "run", "status", "delivered", "wall_s", "msg_per_s",
    "first_s", "cpu_s", "db_cpu_s", "peak_rss_mb", "peak_pss_mb", "procs", "sessions", "enqueue_s",
    "enqueue_how",
    "queued_s",
    "call_p50_ms", "call_p99_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "idle_rss_mb", "growth_mb",
    "note", "time",
]  # fmt: skip


class Results:
    """The rows of one run, kept in memory and in ``out``/raw.tsv."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[Row] = []

    def add(self, **row: object) -> None:
        row["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        clean = {k: cell(row.get(k)) for k in FIELDS}
        self.rows.append(clean)
        self.save()
        shown = {k: v for k, v in clean.items() if v != "-" and k not in ("workload", "peer", "time")}
        log(f"   -> {row['workload']} {row['peer']}: " + " ".join(f"{k}={v}" for k, v in shown.items()))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "raw.tsv", "w") as f:
            f.write("\t".join(FIELDS) + "\n")
            for r in self.rows:
                f.write("\t".join(r.get(k, "-") for k in FIELDS) + "\n")

    @staticmethod
    def load(paths: Iterable[Path]) -> list[Row]:
        rows: list[Row] = []
        for p in paths:
            lines = p.read_text().splitlines()
            head = lines[0].split("\t")
            rows += [
                {k: v for k, v in zip(head, line.split("\t"), strict=False)}
                for line in lines[1:]
                if line.strip()
            ]
        return rows


def cell(v: object) -> str:
    """One raw.tsv cell: "-" for nothing, 4 significant digits below 10, one decimal above."""
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("\t", " ").replace("\n", " ")


def write_env(out: Path, argv: list[str], code: str = "", resumed: bool = False) -> None:
    def sh(cmd: str) -> str:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        return r.stdout.strip() or "-"

    import gevent

    import greenmail

    dirty = sh(f"git -C {REPO} status --porcelain -- greenmail") != "-"
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    pf_version = sh("dpkg-query -W -f='${Version}' postfix")
    unpacked = sh(f"cat {PKG}/*/.unpacked | paste -sd' '")
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"command: bench/run.py {' '.join(argv)}",
        f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), {mem} RAM",
        f"kernel: {platform.release()}; os: {sh('. /etc/os-release; echo $PRETTY_NAME')}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"work dir: {WORK} ({sh(f'df -T {WORK} | tail -1 | cut -c1-60')})",
        f"greenmail {greenmail.__version__} at {sh(f'git -C {REPO} rev-parse --short HEAD')}"
        f" ({'with uncommitted changes' if dirty else 'clean'})"
        f"{'; ' + code if code else ''}; loaded from {Path(greenmail.__file__).parent}",
        f"python {platform.python_version()}, gevent {gevent.__version__}",
        f"postfix {pf_version} (smtp-sink, smtp-source from the same package)",
        f"unpacked: {unpacked}",
        f"message: {MSG.stat().st_size} bytes ({MSG.name}), 1 recipient",
    ]
    out.mkdir(parents=True, exist_ok=True)
    if resumed and (out / "env.txt").exists():  # keep the original header, say what the resumption ran on
        lines = [
            (out / "env.txt").read_text().rstrip("\n"),
            f"resumed: {lines[0].removeprefix('date: ')} by `{lines[1].removeprefix('command: ')}`, "
            f"{lines[4]}; {lines[6]}",
        ]
    (out / "env.txt").write_text("\n".join(lines) + "\n")
